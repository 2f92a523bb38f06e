import os
import subprocess
import sys

import pytest


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_exchange_kernels_move_rows_as_128_bit_accesses(tmp_path, dtype):
    # peer rows are reached through addresses cast from int64: unless the kernels declare them
    # aligned, every row element is a separate 16- or 32-bit access
    pytest.importorskip("triton.backends.nvidia")
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    script = os.path.join(os.path.dirname(__file__), "compile_ep_kernels.py")
    proc = subprocess.run([sys.executable, script, dtype], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    from dualpipe_ext.kernels.ep_exchange import NUM_WARPS_PUT, NUM_WARPS_RECV

    assert set(got) == {"_put_dispatch_kernel", "_recv_dispatch_kernel", "_put_combine_kernel",
                        "_recv_combine_kernel"}
    for name, kernel in got.items():
        ops = kernel["ops"]
        assert kernel["num_warps"] == (NUM_WARPS_PUT if name.startswith("_put") else NUM_WARPS_RECV)
        # a 16 x 512 tile per step: 16 x 512 x elem / 16 bytes vectors over 32 x num_warps threads
        per_tile = 16 * 512 * (2 if dtype == "bf16" else 4) // 16 // (32 * kernel["num_warps"])
        loads = "ld.global.cg.v4.b32" if name.startswith("_recv") else "ld.global.v4.b32"
        assert ops.get("st.global.v4.b32", 0) >= per_tile, (name, ops)  # rows stored to peers / outputs
        assert ops.get(loads, 0) >= per_tile, (name, ops)  # rows loaded (what peers wrote: bypassing L1)
        if dtype == "bf16":  # no row element moves alone
            assert not any(op.endswith(".b16") for op in ops), (name, ops)


@pytest.mark.slow
@pytest.mark.parametrize("out", ["bf16", "fp32", "fp16"])
def test_fp8_receive_loads_codes_and_stores_rows_as_128_bit_accesses(tmp_path, out):
    # the receive kernel that dequantizes packed FP8 rows: e4m3 codes in 16-byte loads, the rows of the
    # output dtype in 16-byte stores, only the scales loaded byte by byte (4 a scale: they need not be aligned)
    pytest.importorskip("triton.backends.nvidia")
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    script = os.path.join(os.path.dirname(__file__), "compile_ep_kernels.py")
    proc = subprocess.run([sys.executable, script, "fp8-" + out], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    from dualpipe_ext.kernels.ep_exchange import NUM_WARPS_RECV

    ops = got["_recv_dispatch_kernel"]["ops"]
    threads = 32 * NUM_WARPS_RECV
    elem = {"bf16": 2, "fp32": 4, "fp16": 2}[out]
    assert ops.get("ld.global.cg.v4.b32", 0) >= 16 * 512 // 16 // threads, ops  # a 16 x 512 tile of codes
    assert ops.get("st.global.v4.b32", 0) >= 16 * 512 * elem // 16 // threads, ops  # the same tile dequantized
    # nothing but the scales (4 bytes each of a [16, 4] tile) moves in pieces narrower than 32 bits
    assert ops.get("ld.global.cg.b8", 0) <= 8 and not any(op.startswith("st.global") and op.endswith((".b8", ".b16"))
                                                          for op in ops), ops
