"""The main job with FP8 dispatch at small sizes: it trains through the overlap engine, its first
step matches the unpipelined model run with the same FP8 rounding, its loss follows the
unquantized run's, and it prints the bytes it dispatched."""
import re
import subprocess
import sys

import pytest

# the loss of each step of the FP8 run stays this close to the unquantized run's (measured: below 0.01)
LOSS_MARGIN = 0.05


def _run(*flags, timeout=600):
    proc = subprocess.run([sys.executable, "-m", "dualpipe_ext.demo", *flags], capture_output=True, text=True,
                          timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def _losses(out):
    return [float(v) for v in re.findall(r"step \d+: loss ([0-9.]+)", out)]


@pytest.mark.slow
def test_main_job_with_fp8_dispatch_follows_the_unquantized_run():
    small = ("--steps", "5", "--seq", "32", "--hidden", "32", "--eval-batches", "1")
    code, out = _run("--fp8-dispatch", *small)
    assert code == 0, out
    assert "first step vs the unpipelined model, FP8 dispatch rounding in both: matched" in out, out
    pairs = int(re.search(r"(\d+) overlapped pairs per rank and step", out).group(1))
    assert pairs > 0, out  # the overlap engine issued the FP8 dispatches
    # hidden 32: one partial group, 32 e4m3 bytes + one float32 scale
    assert "36 B per token row (e4m3 + float32 scale per 128 columns; 0.28x float32 rows, 0.56x bfloat16" in out, out
    step_bytes = re.findall(r"step \d+: loss [0-9.]+ .* dispatch ([0-9.]+) MiB", out)
    assert len(step_bytes) == 5 and all(float(b) > 0 for b in step_bytes), out
    fp8 = _losses(out)
    code, out = _run(*small)
    assert code == 0, out
    assert "128 B per token row (float32" in out, out
    plain = _losses(out)
    assert len(fp8) == len(plain) == 5 and fp8[-1] < fp8[0] - 0.1
    assert max(abs(a - b) for a, b in zip(fp8, plain)) < LOSS_MARGIN, (fp8, plain)
    assert fp8 != plain  # the rounding is really there


@pytest.mark.slow
def test_main_job_with_fp8_dispatch_on_the_buffer_path():
    code, out = _run("--fp8-dispatch", "--ep-path", "buffer", "--steps", "2", "--seq", "32", "--hidden", "32",
                     "--eval-batches", "1")
    assert code == 0, out
    assert "first step vs the unpipelined model, FP8 dispatch rounding in both: matched" in out, out
    # hidden 32 through EPBuffer: 32 e4m3 bytes + one float32 scale, padded to 48 for 128-bit accesses
    assert "48 B per token row (e4m3 + float32 scale per 128 columns" in out, out
    assert len(_losses(out)) == 2, out
