"""Without an optional package (matplotlib, triton, transformers, the CUDA extension, even the C++
core), what needs it fails with one line naming the package and how to install it, what does not
need it works, and the SVG picture of a schedule needs nothing at all. Missing packages are
simulated in a fresh interpreter with ``sys.modules[name] = None``."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

_PRELUDE = """
import io, json, sys, contextlib
for name in {blocked!r}:
    sys.modules[name] = None
out = {{}}
def error(fn):
    try:
        fn()
    except Exception as e:
        return [type(e).__name__, str(e)]
    return None
"""


def _run(blocked, body: str) -> dict:
    code = _PRELUDE.format(blocked=list(blocked)) + textwrap.dedent(body) + "\nprint(json.dumps(out))\n"
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _one_line(err, *needles):
    assert err is not None, "no error raised"
    kind, msg = err
    assert kind in ("ImportError", "ModuleNotFoundError"), err
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg


@pytest.fixture(scope="module")
def without_optional(tmp_path_factory):
    d = tmp_path_factory.mktemp("no_optional")
    return _run(["matplotlib", "triton", "transformers"], f"""
    import os, tempfile
    from dualpipe_ext.cli import main
    def cli(*argv):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(list(argv))
        return [code, err.getvalue()]
    d = {str(d)!r}
    out["svg"] = cli("schedule", "dualpipe", "--ranks", "8", "--chunks", "20", "--out", os.path.join(d, "x.svg"))
    out["svg_text"] = open(os.path.join(d, "x.svg")).read()[:200]
    out["png"] = cli("schedule", "dualpipe", "--ranks", "4", "--chunks", "8", "--out", os.path.join(d, "x.png"))
    from dualpipe_ext.viz import draw_timeline
    from dualpipe_ext.schedules import get_plan, simulate
    tl = simulate(get_plan("dualpipev", 2, 4)).timeline
    out["pdf"] = error(lambda: draw_timeline(tl, os.path.join(d, "x.pdf")))

    import torch
    from dualpipe_ext import moe
    logits = torch.randn(5, 8)
    out["route_auto"] = list(moe.route(logits, 2)[0].shape)
    out["route_triton"] = error(lambda: moe.route(logits, 2, impl="triton"))
    layer = moe.MoE(moe.MoEConfig(hidden=4, moe_intermediate=4, num_experts=4, topk=2))
    out["moe_layer"] = list(layer(torch.randn(3, 4)).shape)
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method="file://" + os.path.join(d, "pg"), rank=0, world_size=1)
    out["ep_buffer"] = error(lambda: moe.EPBuffer(None, max_tokens=4, hidden=4, dtype=torch.float32))
    dist.destroy_process_group()

    import dualpipe_ext.integrations as integrations
    out["hf"] = error(lambda: integrations.replace_moe)
    out["hf_module"] = error(lambda: __import__("dualpipe_ext.integrations.hf"))
    """)


def test_the_svg_of_a_schedule_needs_no_optional_package(without_optional):
    code, err = without_optional["svg"]
    assert code == 0 and err == "", err
    assert without_optional["svg_text"].startswith("<svg ")


def test_png_and_pdf_name_matplotlib_and_its_extra(without_optional):
    code, err = without_optional["png"]
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "matplotlib" in err and 'pip install -e ".[plot]"' in err, err
    _one_line(without_optional["pdf"], "matplotlib", 'pip install -e ".[plot]"')


def test_kernels_fall_back_without_triton_and_say_what_to_install_when_forced(without_optional):
    assert without_optional["route_auto"] == [5, 2]
    assert without_optional["moe_layer"] == [3, 4]
    _one_line(without_optional["route_triton"], "'triton'", 'pip install -e ".[triton]"')
    _one_line(without_optional["ep_buffer"], "EPBuffer needs the 'triton' package", 'pip install -e ".[triton]"')


def test_the_transformers_integration_names_transformers_and_its_extra(without_optional):
    for key in ("hf", "hf_module"):
        _one_line(without_optional[key], "'transformers'", 'pip install -e ".[hf]"')


def test_the_cutlass_backend_says_how_to_build_the_cuda_extension(monkeypatch):
    from dualpipe_ext.moe import grouped_mm

    monkeypatch.setattr(grouped_mm, "cuda_extension", lambda: None)
    with pytest.raises(ImportError) as info:
        grouped_mm.require_cuda_extension()
    _one_line(("ImportError", str(info.value)), "dualpipe_ext._cuda", "DUALPIPE_EXT_CUDA=1 pip install")


def test_without_the_cpp_core_imports_and_the_cli_say_how_to_build_it():
    got = _run(["dualpipe_ext._C"], """
    import dualpipe_ext
    out["import"] = "ok"
    out["pipeline"] = error(lambda: dualpipe_ext.DualPipe)
    out["schedules"] = error(lambda: __import__("dualpipe_ext.schedules"))
    from dualpipe_ext.cli import main
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["schedule", "dualpipe", "--ranks", "4", "--chunks", "8", "--out", "x.svg"])
    out["cli"] = [code, err.getvalue()]
    """)
    assert got["import"] == "ok"
    for key in ("pipeline", "schedules"):
        _one_line(got[key], "dualpipe_ext._C", "pip install -e .")
    code, err = got["cli"]
    assert code == 2 and len(err.strip().splitlines()) == 1 and "pip install -e ." in err, err
