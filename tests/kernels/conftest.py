import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (see tests/conftest.py)

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _kernels_through_triton(monkeypatch):
    # impl="auto" runs the Triton kernels (interpreted) in this directory only, so tests
    # elsewhere in the same process keep the fast reference path.
    monkeypatch.setenv("DUALPIPE_EXT_TRITON", "1")


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
