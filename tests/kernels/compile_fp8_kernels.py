"""Compile the FP8 quantize/dequantize Triton kernels for an H100/H200 (sm_90) without a GPU.

Run as a script with TRITON_INTERPRET unset. Prints one ``ok`` line per kernel variant and, with
``--ptx DIR``, writes each variant's PTX there; exits 1 on any failure.
"""
import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run with TRITON_INTERPRET unset"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from dualpipe_ext.kernels import fp8  # noqa: E402


def signature(fn, types):
    return {name: types.get(name, "constexpr" if name.isupper() else "i32") for name in fn.arg_names}


def kernels():
    for dt in ("bf16", "fp32", "fp16"):
        for ue8m0 in (False, True):
            yield (f"quantize {dt} ue8m0={ue8m0}", fp8._quantize_kernel,
                   {"x_ptr": f"*{dt}", "q_ptr": "*u8", "s_ptr": "*fp32"},
                   dict(UE8M0=ue8m0, BLOCK_T=fp8.BLOCK_T, GROUP=fp8.GROUP))
    for kind, out in ((0, "*fp32"), (1, "*i16"), (2, "*fp16")):
        yield (f"dequantize out={out}", fp8._dequantize_kernel, {"q_ptr": "*u8", "s_ptr": "*fp32", "out_ptr": out},
               dict(OUT_KIND=kind, BLOCK_T=fp8.BLOCK_T, GROUP=fp8.GROUP))


def main(argv):
    ptx_dir = argv[argv.index("--ptx") + 1] if "--ptx" in argv else None
    target = GPUTarget("cuda", 90, 32)
    failures = 0
    for i, (name, fn, types, constexprs) in enumerate(kernels()):
        src = ASTSource(fn=fn, signature=signature(fn, types), constexprs=constexprs)
        try:
            compiled = triton.compile(src, target=target)
            if ptx_dir is not None:
                with open(os.path.join(ptx_dir, f"{i}.ptx"), "w") as f:
                    f.write(compiled.asm["ptx"])
            print(f"ok   {name}")
        except Exception as e:  # report every kernel, not only the first failure
            failures += 1
            print(f"FAIL {name}: {type(e).__name__}: {e}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
