import os
import subprocess
import sys

import pytest


def test_kernels_compile_for_sm90(tmp_path):
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from a cache
    script = os.path.join(os.path.dirname(__file__), "compile_moe_kernels.py")
    proc = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    from dualpipe_ext.kernels.ep_exchange import HAS_POLL

    # 3 dtypes x 3 row kernels, 2 x 2 gate, 3 layout, 2 grouped GEMM, 4 exchange kernels per wait variant
    assert proc.stdout.count("ok ") == 16 + 2 + 4 * (2 if HAS_POLL else 1), proc.stdout
