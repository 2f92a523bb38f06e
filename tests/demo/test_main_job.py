"""The main job at small sizes: it trains (the loss falls), its first step matches the untouched
transformers model run in one process, and it says so; DualPipe and DualPipeV, both
expert-parallel paths, with and without the overlap engine."""
import re
import subprocess
import sys

import pytest


def _run(*flags, timeout=300):
    proc = subprocess.run([sys.executable, "-m", "dualpipe_ext.demo", *flags], capture_output=True, text=True,
                          timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def _losses(out):
    return [float(v) for v in re.findall(r"step \d+: loss ([0-9.]+)", out)]


@pytest.mark.parametrize("flags", [
    ("--steps", "8", "--dense-layers", "1"),  # DeepSeek-V3's dense first layer, run inside a component
    ("--steps", "6", "--schedule", "dualpipev", "--two-batch"),
    ("--steps", "5", "--no-overlap"),
])
@pytest.mark.slow
def test_main_job_trains_and_matches_the_unpipelined_model(flags):
    code, out = _run(*flags, "--seq", "32", "--hidden", "32")
    assert code == 0, out
    assert "first step vs the unpipelined model: matched" in out, out
    losses = _losses(out)
    assert len(losses) == int(flags[1]) and losses[-1] < losses[0] - 0.1, losses
    assert re.search(r"held-out loss [0-9.]+", out), out
    pairs = int(re.search(r"(\d+) overlapped pairs per rank and step", out).group(1))
    assert (pairs > 0) == ("--no-overlap" not in flags), out


@pytest.mark.slow
def test_main_job_on_the_epbuffer_path():
    code, out = _run("--steps", "4", "--ep-path", "buffer", "--seq", "16", "--hidden", "32", "--chunks", "4",
                     "--layers", "2", "--eval-batches", "1", timeout=600)
    assert code == 0, out
    assert "first step vs the unpipelined model: matched" in out, out
    assert "(buffer path)" in out


def test_main_job_refuses_impossible_layouts():
    code, out = _run("--pp", "3")
    assert code == 2 and "--pp must be even for DualPipe" in out, out
    code, out = _run("--schedule", "dualpipev", "--layers", "3")
    assert code == 2 and "--layers (3) must be at least the number of stages (4" in out, out
    code, out = _run("--dense-layers", "2")
    assert code == 2 and "--dense-layers must be at least 0 and leave stage 0 an MoE layer: below 2" in out, out
