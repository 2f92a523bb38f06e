"""Helpers shared by the MoE kernels: choosing Triton or the reference, grid sizing, checks.

Triton is imported lazily here, so importing a kernel module's reference path never
needs it, and ``TRITON_INTERPRET`` may still be set before Triton is first imported.
"""
from __future__ import annotations

if not __name__.startswith("dualpipe_ext.kernels."):
    # The folder is only ever the package dualpipe_ext.kernels (see dualpipe_ext/kernels/__init__.py).
    raise ImportError(f"{__name__!r}: the Triton sources in kernels/ are imported as dualpipe_ext.kernels")

import contextlib
import math
import os
from typing import Iterator, Optional, Sequence

import torch

from dualpipe_ext._checks import check_tensor  # noqa: F401  (the one tensor check; kernels take it from here)

IMPLS = ("auto", "triton", "reference")


def triton_available() -> bool:
    """True when ``import triton`` succeeds (made once, by ``kernels/_triton.py``)."""
    from . import _triton

    return _triton.triton is not None


def checks_enabled() -> bool:
    """True when ``DUALPIPE_EXT_CHECKS=1``: the value checks that read the host run (debug mode)."""
    return os.environ.get("DUALPIPE_EXT_CHECKS", "0") not in ("", "0")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(impl: str, *tensors: torch.Tensor) -> bool:
    """Decide whether a call runs its Triton kernels (True) or its PyTorch reference (False).

    "auto" picks Triton when the tensors are on CUDA and Triton imports, or when
    ``DUALPIPE_EXT_TRITON=1`` is set (with ``TRITON_INTERPRET=1`` that runs the kernels on
    CPU tensors); "triton" and "reference" force one side.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "reference":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if impl == "triton":
        if not triton_available():
            raise ImportError("impl='triton' needs the 'triton' package, which is not installed: "
                              "pip install -e \".[triton]\" (impl='auto' and 'reference' run the PyTorch reference "
                              "without it)")
        if not on_cuda and not _interpreting():
            raise ValueError(
                "impl='triton' needs CUDA tensors, or TRITON_INTERPRET=1 (set before importing triton) for CPU tensors"
            )
        return True
    forced = os.environ.get("DUALPIPE_EXT_TRITON", "0") == "1"
    return triton_available() and (on_cuda or forced)


def persistent_grid(num_items: int, num_sms: Optional[int]) -> int:
    """Number of programs of a grid-stride kernel over ``num_items`` work items.

    ``num_sms`` caps the grid (communication kernels leave the other SMs to the GEMMs);
    None launches one program per item.
    """
    check_num_sms(num_sms)
    if num_sms is None:
        return max(1, num_items)
    return max(1, min(num_items, num_sms))


def check_num_sms(num_sms: Optional[int], name: str = "num_sms") -> None:
    """A kernel's grid argument: the one SM-budget validator (``dualpipe_ext.sm_budget``)."""
    from dualpipe_ext.sm_budget import check_num_comm_sms

    check_num_comm_sms(num_sms, name)


def next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def check_same_device(**tensors: Optional[torch.Tensor]) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"tensors must be on one device, got {devices}")


def check_positions(name: str, pos: torch.Tensor, num_rows: int) -> None:
    """Raise ValueError unless every entry of ``pos`` is -1 or a row in [0, num_rows)."""
    if pos.numel() and bool(((pos < -1) | (pos >= num_rows)).any()):
        bad = pos[(pos < -1) | (pos >= num_rows)][0].item()
        raise ValueError(f"{name} entries must be -1 or in [0, {num_rows}), found {bad}")


# Elements of one row chunk in the row-moving kernels (permute, combine): 1024 bf16 =
# 2 KiB = 16 B per thread over 4 warps, the widest vector access; hidden 7168 is 7 chunks.
# Not yet tuned on a GPU.
MAX_BLOCK_H = 1024


def row_tile(hidden: int) -> tuple:
    """(BLOCK_T, BLOCK_H): tokens and row elements one program moves per step.

    Short rows are packed several tokens to a tile of about ``MAX_BLOCK_H`` elements, so
    small hidden sizes do not launch one tiny program per token.
    """
    block_h = min(next_pow2(hidden), MAX_BLOCK_H)
    return max(1, MAX_BLOCK_H // block_h), block_h


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# The dtype wire table: the float dtypes rows may have, a dtype crossing between ranks as its index here.
WIRE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
FLOAT_DTYPES = WIRE_DTYPES


def dtype_code(dtype: torch.dtype) -> int:
    """A float dtype's code on the wire (its index in ``WIRE_DTYPES``); ValueError for another dtype."""
    if dtype not in WIRE_DTYPES:
        raise ValueError(f"dtype must be one of {WIRE_DTYPES}, got {dtype!r}")
    return WIRE_DTYPES.index(dtype)


def code_dtype(code: int) -> torch.dtype:
    """Inverse of ``dtype_code``."""
    return WIRE_DTYPES[code]

# Test hook: when set, kernel outputs are allocated pre-filled with a poison value
# (NaN for floats, -7 for integers, True for bools) so that an element a kernel fails
# to write shows up in a comparison.
_POISON = False


@contextlib.contextmanager
def poison_outputs(enabled: bool = True) -> Iterator[None]:
    """Within the block, fill every output a kernel allocates with a poison value first."""
    global _POISON
    previous, _POISON = _POISON, enabled
    try:
        yield
    finally:
        _POISON = previous


def new_output(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised output tensor (poisoned under ``poison_outputs``)."""
    out = torch.empty(tuple(shape), dtype=dtype, device=device)
    if _POISON:
        if dtype.is_floating_point:
            out.fill_(float("nan"))
        elif dtype == torch.bool:
            out.fill_(True)
        else:
            out.fill_(-7)
    return out
