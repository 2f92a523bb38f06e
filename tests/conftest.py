import os

# Triton reads TRITON_INTERPRET when a kernel is defined, so it must be set before any test
# module imports a kernel file: Triton kernels then run on CPU tensors.
os.environ.setdefault("TRITON_INTERPRET", "1")
