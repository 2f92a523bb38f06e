"""Shapes and dtype of the tensors that pipeline stages pass to each other.

Every stage-to-stage message carries one tensor per declared shape, all of one dtype,
as in deepseek-ai/DualPipe: call :func:`set_p2p_tensor_shapes` and
:func:`set_p2p_tensor_dtype` on every rank before the first step. Receivers allocate
their buffers from these declarations; senders check their outputs against them, so a
stage that returns something else fails with a message naming the mismatch instead of
corrupting or hanging its peer.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

__all__ = ["set_p2p_tensor_shapes", "set_p2p_tensor_dtype", "get_p2p_tensor_shapes", "get_p2p_tensor_dtype"]

TENSOR_SHAPES: Optional[List[Tuple[int, ...]]] = None
TENSOR_DTYPE: Optional[torch.dtype] = None


def set_p2p_tensor_shapes(shapes: Sequence[Sequence[int]]) -> None:
    """Declare the shape of each tensor a stage sends, e.g. ``[(micro_batch, seq, hidden)]``."""
    global TENSOR_SHAPES
    if isinstance(shapes, torch.Size) or (len(shapes) > 0 and isinstance(shapes[0], int)):
        raise ValueError(f"set_p2p_tensor_shapes expects a list of shapes (one per tensor), got {tuple(shapes)}; "
                         f"wrap a single shape in a list: [{tuple(shapes)}]")
    parsed = []
    for s in shapes:
        shape = tuple(int(d) for d in s)
        if any(d < 0 for d in shape):
            raise ValueError(f"set_p2p_tensor_shapes: negative dimension in {shape}")
        parsed.append(shape)
    if not parsed:
        raise ValueError("set_p2p_tensor_shapes: at least one shape is needed")
    TENSOR_SHAPES = parsed


def set_p2p_tensor_dtype(dtype: torch.dtype) -> None:
    """Declare the dtype of every tensor that stages send to each other."""
    global TENSOR_DTYPE
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"set_p2p_tensor_dtype expects a torch.dtype, got {dtype!r}")
    TENSOR_DTYPE = dtype


def get_p2p_tensor_shapes() -> Optional[List[Tuple[int, ...]]]:
    return TENSOR_SHAPES


def get_p2p_tensor_dtype() -> Optional[torch.dtype]:
    return TENSOR_DTYPE


def missing_declaration() -> Optional[str]:
    """A message saying what is not declared yet, or None when both are set."""
    missing = [n for n, v in (("set_p2p_tensor_shapes", TENSOR_SHAPES), ("set_p2p_tensor_dtype", TENSOR_DTYPE))
               if v is None]
    if not missing:
        return None
    return (f"p2p tensors are not declared: call {' and '.join(missing)} on every rank before step() "
            f"(e.g. set_p2p_tensor_shapes([(micro_batch_size, hidden)]); set_p2p_tensor_dtype(torch.float32))")


def empty_buffers(device: torch.device, requires_grad: bool) -> List[torch.Tensor]:
    """Fresh receive buffers, one per declared shape."""
    return [torch.empty(s, dtype=TENSOR_DTYPE, device=device, requires_grad=requires_grad) for s in TENSOR_SHAPES]


def zero_buffers(device: torch.device) -> List[torch.Tensor]:
    return [torch.zeros(s, dtype=TENSOR_DTYPE, device=device) for s in TENSOR_SHAPES]


def mismatch(tensors: Sequence[Optional[torch.Tensor]], what: str) -> Optional[str]:
    """Why ``tensors`` cannot be sent under the declared shapes and dtype, or None if they can."""
    shapes, dtype = TENSOR_SHAPES, TENSOR_DTYPE
    if len(tensors) != len(shapes):
        return f"{what}: {len(tensors)} tensors, but set_p2p_tensor_shapes declared {len(shapes)}: {shapes}"
    for i, (t, s) in enumerate(zip(tensors, shapes)):
        if t is None:
            continue
        if tuple(t.shape) != s or t.dtype != dtype:
            return (f"{what}: tensor {i} has shape {tuple(t.shape)} and dtype {t.dtype}, declared "
                    f"shape {s} and dtype {dtype} (set_p2p_tensor_shapes / set_p2p_tensor_dtype)")
    return None
