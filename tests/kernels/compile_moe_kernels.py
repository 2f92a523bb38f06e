"""Compile every MoE Triton kernel (routing, layout, permute, combine, grouped GEMM, the
device-side exchanges) for an H100/H200 (sm_90) without a GPU.

Run as a script with TRITON_INTERPRET unset: the interpreter accepts programs the compiler
rejects (shape changes of loop-carried values, unsupported casts), so this checks the GPU
path that the CPU tests cannot run. Prints one line per kernel, exits 1 on any failure.
"""
import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run with TRITON_INTERPRET unset"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from dualpipe_ext.kernels import combine, dispatch_layout, ep_exchange, grouped_mm, permute, routing  # noqa: E402

I32, C = "i32", "constexpr"


def signature(fn, types):
    """Map each parameter of ``fn`` to its type: given ones from ``types``, constexpr for UPPER_CASE, else i32."""
    return {name: types.get(name, C if name.isupper() else I32) for name in fn.arg_names}


def kernels():
    for dt in ("bf16", "fp32", "fp16"):
        rows = {"x_ptr": f"*{dt}", "out_ptr": f"*{dt}", "rows_ptr": f"*{dt}", "grad_out_ptr": f"*{dt}",
                "grad_rows_ptr": f"*{dt}", "pos_ptr": "*i64", "w_ptr": "*fp32", "grad_w_ptr": "*fp32"}
        yield permute._permute_kernel, rows, dict(BLOCK_T=1, BLOCK_H=1024)
        yield combine._combine_kernel, rows, dict(HAS_WEIGHTS=True, BLOCK_T=1, BLOCK_H=1024, ACC=tl.float32)
        yield combine._combine_bwd_kernel, rows, dict(HAS_WEIGHTS=True, GRAD_ROWS=True, GRAD_WEIGHTS=True,
                                                      BLOCK_T=4, BLOCK_H=256, C_PAD=8, ACC=tl.float32)
    gate = {"logits_ptr": "*bf16", "bias_ptr": "*fp32", "idx_ptr": "*i64", "w_ptr": "*fp32", "scale": "fp32",
            "grad_w_ptr": "*fp32", "grad_logits_ptr": "*bf16"}
    for sigmoid in (True, False):
        yield routing._route_fwd_kernel, gate, dict(SIGMOID=sigmoid, HAS_BIAS=sigmoid, GROUPED=True, BLOCK_T=16,
                                                    E_PAD=256, K_PAD=8, G_PAD=8)
        yield routing._route_bwd_kernel, gate, dict(SIGMOID=sigmoid, BLOCK_T=16, E_PAD=256)
    layout = {"topk_idx_ptr": "*i64", "block_counts_ptr": "*i64", "num_tokens_per_rank_ptr": "*i64",
              "num_tokens_per_expert_ptr": "*i64", "is_token_in_rank_ptr": "*i1", "send_pos_ptr": "*i64"}
    yield dispatch_layout._layout_count_kernel, layout, dict(BLOCK_T=64, K_PAD=8, COL_BLOCK=32)
    yield dispatch_layout._layout_scan_kernel, layout, dict(SCAN_BLOCK=256)
    yield dispatch_layout._layout_pos_kernel, layout, dict(BLOCK_T=64, K_PAD=8, COL_BLOCK=32)
    gemm = {"x_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "grad_ptr": "*bf16", "dw_ptr": "*bf16",
            "group_ends_ptr": "*i64", "tile_ends_ptr": "*i32", "N": "i32", "K": "i32"}
    yield grouped_mm.grouped_mm_kernel, gemm, dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, UPCAST=False)
    yield grouped_mm.grouped_wgrad_kernel, gemm, dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, UPCAST=False)
    # the device-side exchanges, with the waits inside the kernels as CUDA runs them
    ex = {"table_ptr": "*i64", "status_ptr": "*i64", "x_ptr": "*bf16", "pos_ptr": "*i64", "counts_ptr": "*i64",
          "idx_ptr": "*i64", "w_ptr": "*fp32", "out_x_ptr": "*bf16", "out_idx_ptr": "*i64", "out_w_ptr": "*fp32",
          "out_src_ptr": "*i64", "count_ptr": "*i64", "y_ptr": "*bf16", "src_ptr": "*i64", "gw_ptr": "*fp32",
          "out_ptr": "*bf16", "gw_out_ptr": "*fp32", "timeout_ns": "i64", "epoch_ptr": "*i64", "recv_count_ptr": "*i64",
          **{f"{r}_off": "i64" for r in ("dx", "didx", "dw", "dsrc", "cx", "cw")}}
    blocks = dict(WP=8, KP=8, BLOCK_T=16, BLOCK_H=512, VEC=8)
    for poll in (True, False) if ep_exchange.HAS_POLL else (False,):
        yield ep_exchange._put_dispatch_kernel, ex, dict(ROUTES=True, WAIT_ACK=True, HAS_POLL=poll, **blocks)
        yield ep_exchange._recv_dispatch_kernel, ex, dict(ROUTES=True, WAIT=True, HAS_POLL=poll, FP8=0, **blocks)
        yield ep_exchange._put_combine_kernel, ex, dict(WEIGHTS=True, WAIT_ACK=True, HAS_POLL=poll, **blocks)
        yield ep_exchange._recv_combine_kernel, ex, dict(WEIGHTS=True, ACC=tl.float32, WAIT=True, HAS_POLL=poll,
                                                         **blocks)


def main():
    target = GPUTarget("cuda", 90, 32)
    failures = 0
    for fn, types, constexprs in kernels():
        src = ASTSource(fn=fn, signature=signature(fn, types), constexprs=constexprs)
        try:
            triton.compile(src, target=target)
            print(f"ok   {fn.__name__} {types.get('x_ptr', '')}")
        except Exception as e:  # report every kernel, not only the first failure
            failures += 1
            print(f"FAIL {fn.__name__}: {type(e).__name__}: {e}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
