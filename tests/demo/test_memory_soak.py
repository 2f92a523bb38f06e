"""200 steps of the main job on CPU: the resident memory after step 200 is within 5 % of its
value after step 20 (no leak per step)."""
import pytest
import re
import subprocess
import sys


@pytest.mark.slow
def test_resident_memory_flat_over_200_steps():
    proc = subprocess.run([sys.executable, "-m", "dualpipe_ext.demo", "--steps", "200", "--hidden", "16", "--seq", "16",
                           "--chunks", "4", "--layers", "2", "--no-check", "--eval-batches", "1"],
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    m = re.search(r"([0-9]+) MiB after step 20, ([0-9]+) MiB after step 200", out)
    assert m, out
    at20, at200 = float(m.group(1)), float(m.group(2))
    assert abs(at200 - at20) / at20 < 0.05, out
