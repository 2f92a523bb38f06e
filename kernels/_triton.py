"""The kernel modules' one import of Triton (``triton`` and ``tl``, both None without it) and
the index helper they share.

Without Triton only the PyTorch references run. Importing a kernel module imports Triton,
so ``TRITON_INTERPRET=1`` must be set before the first kernel module is imported.
"""
if not __name__.startswith("dualpipe_ext.kernels."):
    # Every kernel module imports this one: the folder is only ever the package dualpipe_ext.kernels.
    raise ImportError(f"{__name__!r}: the Triton sources in kernels/ are imported as dualpipe_ext.kernels")
try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

__all__ = ["triton", "tl", "block_range"]

if triton is not None:

    @triton.jit
    def block_range(start, BLOCK: tl.constexpr, limit):
        """Indices ``start .. start + BLOCK`` as int64 (offsets past 2**31 stay exact) and which are ``< limit``."""
        i = (start + tl.arange(0, BLOCK)).to(tl.int64)
        return i, i < limit

else:
    block_range = None
