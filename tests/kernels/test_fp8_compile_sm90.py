import glob
import os
import subprocess
import sys

import pytest

# about 9 s on 2 cores with a cold cache


@pytest.mark.slow
def test_fp8_kernels_compile_for_sm90(tmp_path):
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # compile for real, not from a cache
    ptx_dir = tmp_path / "ptx"
    ptx_dir.mkdir()
    script = os.path.join(os.path.dirname(__file__), "compile_fp8_kernels.py")
    proc = subprocess.run([sys.executable, script, "--ptx", str(ptx_dir)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("ok ") == 6 + 3, proc.stdout  # 3 dtypes x 2 scale forms, 3 output dtypes
    ptx = {int(os.path.basename(p)[:-4]): open(p).read() for p in glob.glob(str(ptx_dir / "*.ptx"))}
    for i in range(6):  # the quantize kernels divide with IEEE rounding, never the approximate division
        assert "div.rn.f32" in ptx[i] and "div.full" not in ptx[i] and "div.approx" not in ptx[i]
    for i in range(6, 9):  # dequantize: no division at all
        assert "div.rn.f32" not in ptx[i] and "cvt.rn.f16.f32" in ptx[8]
