"""The steps of tools/gpu_check.sh stay runnable between GPU sessions: the CUTLASS wheel is installed and
the extension built before the grouped-GEMM step times it, every benchmark's flags are its own, and the
main job's command runs on CPU with ``--device cpu`` (the CUDA run differs only in its device)."""
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _steps():
    text = open(os.path.join(ROOT, "tools", "gpu_check.sh")).read()
    body = text[text.index("STEPS=(") + 7:text.index("\n)\n")]
    steps = {}
    for line in body.splitlines():
        line = line.strip()
        if line.startswith('"'):
            name, limit, cmd = line[1:-1].split("|", 2)
            steps[name] = (int(limit), cmd.replace("\\$", "$"))
    return steps


def test_cutlass_is_built_before_the_grouped_gemm_step_times_it():
    names = list(_steps())
    assert names.index("wheels") < names.index("build") < names.index("bench_grouped_mm")
    build = open(os.path.join(ROOT, "tools", "gpu_build.sh")).read()
    assert "import cutlass_library" in build and "DUALPIPE_EXT_CUDA=1" in build


@pytest.mark.parametrize("name", ["bench_ep", "bench_moe_layer", "bench_graphs", "bench_grouped_mm", "bench_fp8",
                                  "bench_overlap"])
def test_benchmark_steps_pass_flags_their_script_has(name):
    cmd = shlex.split(_steps()[name][1])
    script = os.path.join(ROOT, cmd[1])
    source = open(script).read()
    for flag in [a for a in cmd[2:] if a.startswith("--")]:
        assert re.search(r"add_argument\(\s*\"" + re.escape(flag) + '"', source) or (
            flag in ("--quick", "--json", "--timeout-s", "--cpu-smoke") and "gpu_bench_main" in source), (name, flag)


def test_main_job_flags_parse():
    from dualpipe_ext.demo.__main__ import _parser

    cmd = shlex.split(_steps()["main_job"][1].replace("$FIG", "/tmp/fig.json"))
    args = _parser().parse_args(cmd[3:])
    assert args.device == "cuda" and args.json == "/tmp/fig.json"


@pytest.mark.slow
def test_main_job_step_runs_on_cpu(tmp_path):
    cmd = shlex.split(_steps()["main_job"][1].replace("$FIG", str(tmp_path / "fig.json")))
    cmd = [sys.executable] + ["cpu" if a == "cuda" else a for a in cmd[1:]]
    cmd[cmd.index("--steps") + 1] = "2"
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    fig = json.loads((tmp_path / "fig.json").read_text())
    assert fig["device"] == "cpu" and fig["check_matched"] is True
