"""Compile the device-side exchange kernels for an H100/H200 (sm_90) as a launch would, and print, as
JSON, the global memory instructions of each one's PTX: ``{kernel: {instruction: count}}``.

As a launch does: tensor pointers 16-byte aligned (what PyTorch allocates), the arguments of
``DO_NOT_SPECIALIZE`` unspecialised, ``num_warps`` from the kernel module. Run with
TRITON_INTERPRET unset; ``test_compile_sm90.py`` reads the result.
"""
import collections
import json
import os
import re
import sys

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run with TRITON_INTERPRET unset"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from dualpipe_ext.kernels import ep_exchange as kx  # noqa: E402

_ROWS = {"x_ptr", "out_x_ptr", "y_ptr", "out_ptr"}
_INTS64 = {"timeout_ns", "max_spins"}


def compile_one(fn, dtype: str, constexprs: dict, num_warps: int):
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            elem = dtype if name in _ROWS else ("fp32" if name in ("w_ptr", "out_w_ptr", "gw_ptr", "gw_out_ptr")
                                                else "i64")
            sig[name] = f"*{elem}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "i64" if (name in _INTS64 or name.endswith("_off")) else "i32"
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))


def global_ops(ptx: str) -> dict:
    return dict(collections.Counter(re.findall(r"\b((?:ld|st)\.global[\w.]*)", ptx)))


def fp8_receive(out: str) -> dict:
    """The dispatch receive kernel that dequantizes packed FP8 rows into ``out`` rows ("bf16": stored as
    their int16 bits, "fp32", "fp16"), with 16-byte code loads (VEC 16: hidden a multiple of 16)."""
    kind = {"fp32": 0, "bf16": 1, "fp16": 2}[out]
    consts = dict(WP=8, KP=8, BLOCK_T=16, BLOCK_H=512, VEC=16, HAS_POLL=False, ROUTES=True, WAIT=True, FP8=1 + kind)
    k = compile_one(kx._recv_dispatch_kernel, "i16" if out == "bf16" else out, consts, kx.NUM_WARPS_RECV)
    return {"_recv_dispatch_kernel": dict(ops=global_ops(k.asm["ptx"]), num_warps=k.metadata.num_warps)}


def main():
    dtype = sys.argv[1] if len(sys.argv) > 1 else "bf16"
    if dtype.startswith("fp8-"):  # e.g. fp8-bf16: the FP8 receive variant into bf16 rows
        print(json.dumps(fp8_receive(dtype[4:])))
        return
    vec = 16 // {"bf16": 2, "fp16": 2, "fp32": 4}[dtype]
    blocks = dict(WP=8, KP=8, BLOCK_T=16, BLOCK_H=512, VEC=vec, HAS_POLL=False)
    kernels = [(kx._put_dispatch_kernel, dict(ROUTES=True, WAIT_ACK=True), kx.NUM_WARPS_PUT),
               (kx._recv_dispatch_kernel, dict(ROUTES=True, WAIT=True, FP8=0), kx.NUM_WARPS_RECV),
               (kx._put_combine_kernel, dict(WEIGHTS=True, WAIT_ACK=True), kx.NUM_WARPS_PUT),
               (kx._recv_combine_kernel, dict(WEIGHTS=True, ACC=tl.float32, WAIT=True), kx.NUM_WARPS_RECV)]
    out = {}
    for fn, consts, warps in kernels:
        k = compile_one(fn, dtype, {**blocks, **consts}, warps)
        out[fn.__name__] = dict(ops=global_ops(k.asm["ptx"]), num_warps=k.metadata.num_warps)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
