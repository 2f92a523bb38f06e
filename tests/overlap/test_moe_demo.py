"""The MoE demo (DualPipe PP=2 x EP=2 on four processes) trains, and checks the overlap engine
against plain stages on its first step."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_moe_demo_trains_and_passes_its_check():
    steps = 5
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "moe_dualpipe_demo.py"), "--steps", str(steps),
         "--layers", "1", "--hidden", "16", "--chunks", "4", "--timeout", "25"],
        capture_output=True, text=True, timeout=30)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "check OK: first step, overlapped vs plain MoEStage: losses bitwise equal, every gradient " \
           "1 - cos < 1e-12" in out, out
    assert "weight copies identical on all ranks" in out, out
    pairs = int(re.search(r"(\d+) forward\+backward pairs through the overlap engine", out).group(1))
    assert pairs > 0, out
    losses = [float(v) for v in re.findall(r"^step \d+: loss ([0-9.]+)  time [0-9.]+ ms$", out, re.M)]
    assert len(losses) == steps, out
    assert losses[-1] < losses[0], out
