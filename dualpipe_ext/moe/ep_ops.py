"""``EPBuffer.dispatch`` and ``EPBuffer.combine``: the autograd operations over the buffer's exchanges.

The backward of dispatch is a combine-shaped exchange through the same buffers (row and
weight gradients back to the tokens' owners), the backward of combine a dispatch-shaped
one (each token's output gradient to the ranks it went to). With ``async_op`` the
autograd node is created when ``wait()`` returns the results, in the grad mode of the issue.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from dualpipe_ext.debug import checks_enabled
from dualpipe_ext.kernels._common import new_output

from .dispatch import routing_values_problem
from .ep_buffer import EPBuffer, EPHandle
from .ep_errors import EPError

__all__ = ["dispatch_op", "combine_op", "fp8_mode"]

_FP8_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def fp8_mode(fp8: bool, ue8m0: bool) -> int:
    """0: rows in the buffer's dtype; 1: FP8 rows; 2: FP8 rows with power-of-two scales."""
    return int(bool(fp8)) * (1 + int(bool(ue8m0)))


def _pack_fp8(x: torch.Tensor, row_bytes: int, ue8m0: bool) -> torch.Tensor:
    """x [num_tokens, hidden] -> [num_tokens, row_bytes // 4] int32: each row's e4m3 bytes, its float32
    scales' bytes, zero bytes up to ``row_bytes`` (a multiple of 16: the kernels move 128-bit vectors)."""
    from dualpipe_ext.kernels import fp8

    q, scales = fp8.quantize(x, ue8m0=ue8m0)
    hidden, t = x.shape[1], x.shape[0]
    packed = torch.zeros(t, row_bytes, dtype=torch.uint8, device=x.device)
    packed[:, :hidden] = q.view(torch.uint8)
    packed[:, hidden:fp8.packed_row_bytes(hidden)] = scales.contiguous().view(torch.uint8)
    return packed.view(torch.int32)


def _check_dispatch(ep: EPBuffer, x, topk_idx, topk_weights, num_experts, fp8: bool = False
                    ) -> Tuple[int, Optional[str]]:
    """(error code, detail) of this rank's dispatch inputs, decided from shapes (values in debug mode)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        return EPError.X, f"x must be a [num_tokens, {ep.hidden}] tensor, got {tuple(getattr(x, 'shape', ()))}"
    if x.shape[0] > ep.max_tokens:
        return EPError.TOO_MANY_TOKENS, (
            f"x has {x.shape[0]} tokens, the buffer holds at most max_tokens={ep.max_tokens}")
    code, detail = ep.check_payload(x, "x")
    if code:
        return code, detail
    if (not isinstance(topk_idx, torch.Tensor) or topk_idx.dtype != torch.int64 or topk_idx.dim() != 2
            or topk_idx.shape[0] != x.shape[0] or topk_idx.device != ep.device):
        return EPError.TOPK_IDX, (
            f"topk_idx must be a [{x.shape[0]}, num_topk] int64 tensor on {ep.device}, got "
            f"{getattr(topk_idx, 'dtype', type(topk_idx).__name__)} {tuple(getattr(topk_idx, 'shape', ()))}")
    if (not isinstance(topk_weights, torch.Tensor) or topk_weights.dtype != torch.float32
            or topk_weights.shape != topk_idx.shape or topk_weights.device != ep.device):
        return EPError.TOPK_WEIGHTS, (
            f"topk_weights must be a float32 tensor of shape {tuple(topk_idx.shape)} on {ep.device}, got "
            f"{getattr(topk_weights, 'dtype', type(topk_weights).__name__)} "
            f"{tuple(getattr(topk_weights, 'shape', ()))}")
    if topk_idx.shape[1] > ep.max_topk or topk_idx.shape[1] == 0:
        return EPError.NUM_TOPK, f"num_topk is {topk_idx.shape[1]}, the buffer takes 1 to max_topk={ep.max_topk}"
    if (not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 1
            or num_experts % ep.world):
        return EPError.NUM_EXPERTS, (
            f"num_experts must be a positive multiple of the group size {ep.world}, got {num_experts!r}")
    if fp8 and x.dtype not in _FP8_DTYPES:
        return EPError.FP8_DTYPE, f"fp8 dispatch quantizes float32, bfloat16 or float16 rows, got {x.dtype}"
    if fp8 and ep.fp8_row_bytes > ep.hidden * x.element_size():
        return EPError.FP8_ROW_BYTES, (
            f"an FP8 row takes {ep.fp8_row_bytes} bytes (padded to 16), more than a slot row of "
            f"{ep.hidden} x {x.dtype}")
    bad = routing_values_problem(topk_idx, topk_weights, num_experts) if checks_enabled() else None
    if bad is not None:
        return (EPError.TOPK_IDX_VALUES if bad.startswith("topk_idx") else EPError.TOPK_WEIGHTS_VALUES), bad
    return EPError.OK, None


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, topk_weights, results: List[torch.Tensor], handle: EPHandle):
        ctx.handle = handle
        return results[0], results[1]

    @staticmethod
    def backward(ctx, grad_recv_x, grad_recv_w):
        handle = ctx.handle
        ep = handle.buffer
        if grad_recv_x is None:
            grad_recv_x = torch.zeros(ep.recv_capacity, ep.hidden, dtype=ep.dtype, device=ep.device)
        if grad_recv_w is None:
            grad_recv_w = torch.zeros(ep.recv_capacity, handle.num_topk, dtype=torch.float32, device=ep.device)
        grad_x, grad_w = ep.dispatch_backward(grad_recv_x.contiguous(), grad_recv_w.contiguous(), handle)
        return grad_x, grad_w, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, results: List[torch.Tensor], handle: EPHandle):
        ctx.handle = handle
        return results[0]

    @staticmethod
    def backward(ctx, grad_out):
        return ctx.handle.buffer.combine_backward(grad_out.contiguous(), ctx.handle), None, None


def dispatch_op(ep: EPBuffer, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, num_experts: int,
                async_op: bool, fp8: bool = False, ue8m0: bool = False):
    """``EPBuffer.dispatch`` (see there), ``ep`` first."""
    kx = ep.kernels
    code, detail = _check_dispatch(ep, x, topk_idx, topk_weights, num_experts, fp8)
    cap = ep.recv_capacity
    mode = fp8_mode(fp8, ue8m0)
    if code == 0:
        num_topk = topk_idx.shape[1]
        pos, counts = kx.compact_positions(topk_idx, num_experts, ep.world)
        rows, idx, weights = x.detach().contiguous(), topk_idx.contiguous(), topk_weights.detach().contiguous()
        if fp8:
            rows = _pack_fp8(rows, ep.fp8_row_bytes, ue8m0)
    else:
        num_topk, num_experts = 0, 0
        pos = ep.placeholder_pos()
        counts = torch.zeros(ep.world, dtype=torch.int64, device=ep.device)
        rows = ep.placeholder_rows()
        idx, weights = pos, torch.zeros(0, 0, device=ep.device)
    recv_x = new_output((cap, ep.hidden), ep.dtype, ep.device)  # FP8: the receive kernel dequantizes into it
    recv_idx = new_output((cap, max(num_topk, 1)), torch.int64, ep.device)
    recv_w = new_output((cap, max(num_topk, 1)), torch.float32, ep.device)
    recv_src = new_output((cap,), torch.int64, ep.device)
    recv_count = new_output((ep.world,), torch.int64, ep.device)
    grad_mode = torch.is_grad_enabled()

    def put(ch):
        kx.launch_put_dispatch(ch, rows, pos, counts, (idx, weights), num_experts, num_topk, int(code))

    def recv(ch):
        kx.launch_recv_dispatch(ch, recv_x, (recv_idx, recv_w, recv_src), recv_count, num_topk,
                                packed_fp8=fp8 and code == 0)

    def result():
        handle = EPHandle(pos, counts, idx, recv_src, recv_count, num_experts, ep)
        with torch.set_grad_enabled(grad_mode):
            out_x, out_w = _Dispatch.apply(x, topk_weights, [recv_x, recv_w], handle)
        return out_x, recv_idx, out_w, handle

    keep = (rows, pos, counts, idx, weights, recv_x, recv_idx, recv_w, recv_src, recv_count)
    return ep.exchange(kx.DISPATCH, "dispatch", code, detail, (num_experts, num_topk + (mode << 16)), put, recv,
                       result, keep, async_op)


def combine_op(ep: EPBuffer, y: torch.Tensor, handle: EPHandle, async_op: bool):
    """``EPBuffer.combine`` (see there), ``ep`` first."""
    code, detail = ep.check_rows(y, ep.recv_capacity, "y", handle)
    grad_mode = torch.is_grad_enabled()

    def wrap(out: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(grad_mode):
            return _Combine.apply(y, [out], handle)

    rows = y.detach() if code == 0 else y
    return ep.combine_shaped("combine", rows, None, handle, code, detail, async_op, wrap)


def _dispatch(self: EPBuffer, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, num_experts: int,
              async_op: bool = False, *, fp8: bool = False, ue8m0: bool = False):
    """Send tokens to the ranks holding their experts (autograd through x and topk_weights).

    Args:
        x: [num_tokens <= max_tokens, hidden], the buffer's dtype and device.
        topk_idx: [num_tokens, num_topk <= max_topk] int64 global expert ids, -1 for an unused slot;
            experts split evenly and contiguously over the group.
        topk_weights: [num_tokens, num_topk] float32.
        num_experts: experts over the group, a multiple of its size.
        fp8: send the rows as FP8 (``kernels/fp8.py``: e4m3 and a float32 scale per 1x128 group, packed
            into ``fp8_row_bytes`` bytes that cross in the slot of one ``hidden``-wide row); ``recv_x``
            holds the dequantized rows in the buffer's dtype, exactly those of a plain dispatch of
            ``fp8.round_trip(x)``; the gradient of ``x`` goes straight through, and ``combine`` and
            every backward exchange stay in the buffer's dtype. Every rank must pass the same ``fp8``
            and ``ue8m0``. Needs a float32/bfloat16/float16 buffer whose row holds ``fp8_row_bytes``.
        ue8m0: with ``fp8``, scales rounded up to powers of two.
    Returns:
        ``(recv_x [recv_capacity, hidden], recv_idx [recv_capacity, num_topk] int64 local expert or -1,
        recv_weights [recv_capacity, num_topk] float32, handle)``, or with ``async_op`` an ``InFlight``
        whose ``wait()`` returns them.
    """
    return dispatch_op(self, x, topk_idx, topk_weights, num_experts, async_op, fp8, ue8m0)


def _combine(self: EPBuffer, y: torch.Tensor, handle: EPHandle, async_op: bool = False):
    """Send expert outputs back and sum each token's rows (autograd through y).

    ``y``: [recv_capacity, hidden], row i for received row i (padding rows are ignored).
    Returns [num_tokens, hidden] in the buffer's dtype, or an ``InFlight`` with ``async_op``.
    """
    return combine_op(self, y, handle, async_op)


# The user-facing entry points are methods of the buffer; they live here, beside the autograd they run,
# so that ep_buffer never imports this module.
_dispatch.__name__, _dispatch.__qualname__ = "dispatch", "EPBuffer.dispatch"
_combine.__name__, _combine.__qualname__ = "combine", "EPBuffer.combine"
EPBuffer.dispatch = _dispatch
EPBuffer.combine = _combine
