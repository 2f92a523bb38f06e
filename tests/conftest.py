import os

# Triton reads TRITON_INTERPRET when a kernel is defined, so it must be set before any test
# module imports a kernel file: Triton kernels then run on CPU tensors.
os.environ.setdefault("TRITON_INTERPRET", "1")

# Shared test helpers (dist_harness, timeline_helpers) import from this folder in every test directory.
import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
