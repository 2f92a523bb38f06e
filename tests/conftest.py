import os

# Triton reads TRITON_INTERPRET when a kernel is defined, so it must be set before any test
# module imports a kernel file: Triton kernels then run on CPU tensors.
os.environ.setdefault("TRITON_INTERPRET", "1")

# Shared test helpers (dist_harness, timeline_helpers) import from this folder in every test directory.
import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip, saying why, where torch sees no CUDA device."""
    if not any(item.get_closest_marker("gpu") for item in items):
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; its CPU twin runs the same code through the interpreter")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)
