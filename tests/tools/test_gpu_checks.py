"""The GPU check script runs its checks on CPU too (kernels under Triton's interpreter, EPBuffer
on shared memory), so it keeps working between GPU sessions; every check must pass."""
import pytest
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_gpu_checks_pass_on_cpu(tmp_path):
    out = tmp_path / "checks.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu_checks.py"), "--device", "cpu",
                           "--json", str(out)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())
    assert len(results) == 4 and all(r["ok"] for r in results), results


def test_gpu_check_script_is_valid_bash():
    proc = subprocess.run(["bash", "-n", os.path.join(ROOT, "tools", "gpu_check.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
