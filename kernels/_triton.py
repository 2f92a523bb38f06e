"""The kernel modules' one import of Triton: ``triton`` and ``tl``, both None without it.

Without Triton only the PyTorch references run. Importing a kernel module imports Triton,
so ``TRITON_INTERPRET=1`` must be set before the first kernel module is imported.
"""
try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

__all__ = ["triton", "tl"]
