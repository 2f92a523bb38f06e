"""The main job stops and resumes without losing a step: bitwise on the same layout, within fp32 on another
PP or EP size; bad --resume folders get one line before any process starts."""
import json
import os
import re
import subprocess
import sys

import pytest

SMALL = ("--seq", "16", "--hidden", "32", "--layers", "4", "--eval-batches", "1", "--no-check")


def _run(*flags, timeout=600):
    proc = subprocess.run([sys.executable, "-m", "dualpipe_ext.demo", *SMALL, *flags], capture_output=True,
                          text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def _losses(out):
    m = re.search(r"losses from step (\d+): (\[.*\])", out)
    assert m, out
    return int(m.group(1)), json.loads(m.group(2))


@pytest.mark.slow
def test_stopped_and_resumed_run_gives_the_uninterrupted_losses_bitwise(tmp_path):
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    code, out = _run("--chunks", "4", "--steps", "4", "--save", whole, "--save-every", "2")
    assert code == 0, out
    _, uninterrupted = _losses(out)
    assert sorted(os.listdir(whole)) == ["latest", "step-000002", "step-000004"]
    code, out = _run("--chunks", "4", "--steps", "2", "--save", cut)
    assert code == 0, out
    code, out = _run("--chunks", "4", "--steps", "4", "--resume", cut)
    assert code == 0, out
    first, resumed = _losses(out)
    assert first == 2 and resumed == uninterrupted[2:], (resumed, uninterrupted)  # float reprs: bitwise
    assert f"resumed from {os.path.join(cut, 'step-000002')} at step 2" in out


@pytest.mark.slow
def test_resume_on_another_pp_or_ep_gives_the_same_losses(tmp_path):
    root = str(tmp_path / "ck")
    code, out = _run("--chunks", "8", "--steps", "3", "--save", root, "--save-every", "2")
    assert code == 0, out
    _, uninterrupted = _losses(out)
    step2 = os.path.join(root, "step-000002")
    for flags in (("--ep", "1", "--chunks", "16"), ("--pp", "4", "--chunks", "8")):
        code, out = _run("--steps", "3", "--resume", step2, *flags)
        assert code == 0, out
        first, resumed = _losses(out)
        assert first == 2 and resumed == pytest.approx(uninterrupted[2:], rel=1e-5), (flags, resumed, uninterrupted)


def test_bad_resume_folders_get_one_clear_line(tmp_path):
    code, out = _run("--resume", str(tmp_path))
    assert code == 2 and "the folder holds no checkpoint" in out.splitlines()[-1], out
    step = tmp_path / "step-000002"
    step.mkdir()
    from dataclasses import asdict

    from dualpipe_ext.demo.lm import LMConfig

    lm = asdict(LMConfig(hidden=32, moe_intermediate=32, layers=2, seq=16))
    (step / "meta.json").write_text(json.dumps({"lm": lm, "step": 2}))
    (tmp_path / "step-000004.tmp").mkdir()  # a save that died: not published, not used
    (tmp_path / "latest").write_text("step-000002")
    code, out = _run("--resume", str(tmp_path))
    last = out.splitlines()[-1]
    assert code == 2 and "step-000002: saved from another model config (layers 2 there, 4 here)" in last, out
    code, out = _run("--resume", str(step), "--layers", "2", "--steps", "1")
    assert code == 2 and "at step 2, beyond --steps 1" in out.splitlines()[-1], out
