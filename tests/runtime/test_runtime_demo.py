"""The packaged demo runs, checks itself against the sequential reference and says so."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_demo_passes_its_own_check():
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "dualpipe_demo.py"), "--ranks", "2", "--chunks", "4",
         "--steps", "1", "--timeout", "90"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("every gradient 1 - cos < 1e-12: OK") == 2, proc.stdout
