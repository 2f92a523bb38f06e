"""Shapes and dtype of the tensors that pipeline stages pass to each other.

Every stage-to-stage message carries one tensor per declared shape, all of one dtype, as in
deepseek-ai/DualPipe. A pipeline owns its declaration (:class:`P2PSpec`): given to its
constructor (``p2p_shapes=``, ``p2p_dtype=``) or to its own ``set_p2p_tensor_shapes`` /
``set_p2p_tensor_dtype`` methods. What a pipeline does not declare itself it takes, at each
step, from the process-wide default that the module functions :func:`set_p2p_tensor_shapes`
and :func:`set_p2p_tensor_dtype` set (the deepseek-compatible way: call them on every rank
before the first step). Receivers allocate their buffers from the declaration; senders
check their outputs against it, so a stage that returns something else fails with a
message naming the mismatch instead of corrupting or hanging its peer.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from functools import cached_property
from typing import List, Optional, Sequence, Tuple, Union

import torch

__all__ = ["P2PSpec", "get_p2p_tensor_dtype", "get_p2p_tensor_shapes", "set_p2p_tensor_dtype",
           "set_p2p_tensor_shapes"]

Shape = Tuple[int, ...]

# The process-wide default (deepseek-ai/DualPipe's names); pipelines read it through resolve().
TENSOR_SHAPES: Optional[List[Shape]] = None
TENSOR_DTYPE: Optional[torch.dtype] = None


def parse_shapes(shapes: Sequence[Sequence[int]], what: str = "set_p2p_tensor_shapes") -> List[Shape]:
    """Check a list of shapes (one per tensor of a message); ``ValueError`` saying what is wrong."""
    if not isinstance(shapes, (list, tuple, torch.Size)):
        raise ValueError(f"{what} expects a list of shapes (one per tensor), e.g. [(micro_batch, hidden)], got "
                         f"{type(shapes).__name__} {shapes!r}")
    if isinstance(shapes, torch.Size) or (len(shapes) > 0 and isinstance(shapes[0], int)):
        raise ValueError(f"{what} expects a list of shapes (one per tensor), got {tuple(shapes)}; "
                         f"wrap a single shape in a list: [{tuple(shapes)}]")
    parsed = []
    for s in shapes:
        try:
            if not isinstance(s, (list, tuple, torch.Size)) or any(isinstance(d, bool) for d in s):
                raise TypeError
            shape = tuple(operator.index(d) for d in s)
        except TypeError:
            raise ValueError(f"{what}: each shape must be a tuple of ints, got {s!r}") from None
        if any(d < 0 for d in shape):
            raise ValueError(f"{what}: negative dimension in {shape}")
        parsed.append(shape)
    if not parsed:
        raise ValueError(f"{what}: at least one shape is needed")
    return parsed


def check_dtype(dtype: torch.dtype, what: str = "set_p2p_tensor_dtype") -> torch.dtype:
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{what} expects a torch.dtype, got {dtype!r}")
    return dtype


def set_p2p_tensor_shapes(shapes: Sequence[Sequence[int]]) -> None:
    """Declare, for every pipeline that declares none itself, the shape of each tensor a stage
    sends, e.g. ``[(micro_batch, seq, hidden)]``."""
    global TENSOR_SHAPES
    TENSOR_SHAPES = parse_shapes(shapes)


def set_p2p_tensor_dtype(dtype: torch.dtype) -> None:
    """Declare, for every pipeline that declares none itself, the dtype of the tensors stages send."""
    global TENSOR_DTYPE
    TENSOR_DTYPE = check_dtype(dtype)


def get_p2p_tensor_shapes() -> Optional[List[Shape]]:
    return TENSOR_SHAPES


def get_p2p_tensor_dtype() -> Optional[torch.dtype]:
    return TENSOR_DTYPE


@dataclass(frozen=True)
class P2PSpec:
    """What every stage-to-stage message of one pipeline carries: one tensor per shape, one dtype."""

    shapes: Tuple[Shape, ...]
    dtype: torch.dtype

    def empty(self, device: torch.device, requires_grad: bool) -> List[torch.Tensor]:
        """Fresh receive buffers, one per shape."""
        return [torch.empty(s, dtype=self.dtype, device=device, requires_grad=requires_grad) for s in self.shapes]

    @cached_property
    def numel(self) -> int:
        """Elements of one message (all its tensors)."""
        n = 0
        for s in self.shapes:
            k = 1
            for d in s:
                k *= d
            n += k
        return n

    def views(self, flat: torch.Tensor, offset: int, requires_grad: bool) -> List[torch.Tensor]:
        """One message's tensors as views of ``flat`` from ``offset`` (leaves of their own for autograd)."""
        out = []
        for s in self.shapes:
            k = 1
            for d in s:
                k *= d
            t = flat.narrow(0, offset, k).view(s).detach()
            out.append(t.requires_grad_() if requires_grad else t)
            offset += k
        return out

    def zeros(self, device: torch.device) -> List[torch.Tensor]:
        return [torch.zeros(s, dtype=self.dtype, device=device) for s in self.shapes]

    def mismatch(self, tensors: Sequence[Optional[torch.Tensor]], what: str) -> Optional[str]:
        """Why ``tensors`` cannot be sent under this declaration, or None if they can (None entries pass)."""
        shapes, dtype = self.shapes, self.dtype
        if len(tensors) != len(shapes):
            return f"{what}: {len(tensors)} tensors, but set_p2p_tensor_shapes declared {len(shapes)}: {list(shapes)}"
        for i, (t, s) in enumerate(zip(tensors, shapes)):
            if t is None:
                continue
            if tuple(t.shape) != s or t.dtype != dtype:
                return (f"{what}: tensor {i} has shape {tuple(t.shape)} and dtype {t.dtype}, declared "
                        f"shape {s} and dtype {dtype} (set_p2p_tensor_shapes / set_p2p_tensor_dtype)")
        return None


def resolve(shapes: Optional[Sequence[Shape]], dtype: Optional[torch.dtype]) -> Union[P2PSpec, str]:
    """A pipeline's declaration, with what it leaves open taken from the default; or a message
    saying what is declared nowhere."""
    shapes = TENSOR_SHAPES if shapes is None else shapes
    dtype = TENSOR_DTYPE if dtype is None else dtype
    missing = [n for n, v in (("set_p2p_tensor_shapes", shapes), ("set_p2p_tensor_dtype", dtype)) if v is None]
    if missing:
        return (f"p2p tensors are not declared: call {' and '.join(missing)} on every rank before step() "
                f"(e.g. set_p2p_tensor_shapes([(micro_batch_size, hidden)]); set_p2p_tensor_dtype(torch.float32)), "
                f"or give the pipeline p2p_shapes= and p2p_dtype=")
    return P2PSpec(tuple(tuple(s) for s in shapes), dtype)
