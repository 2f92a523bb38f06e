"""Asynchronous exchanges of the component-split MoE block, with optional injected latency.

The forward dispatch and combine are ``dualpipe_ext.moe``'s own (``async_op=True``). Their
backward exchanges are issued here on ``all_to_all_single(async_op=True)`` along the routes
of the ``DispatchHandle``: the gradient of combine is a dispatch-shaped copy of the output
gradient, the gradient of dispatch a combine-shaped sum of the received-row gradients.

``delay_s`` makes an exchange complete no earlier than ``delay_s`` after it was issued:
a stand-in for a slow interconnect on a machine where gloo over loopback is nearly free,
so that the overlap of communication with computation becomes measurable. The delay runs
concurrently with whatever the caller does between issue and wait, as a real transfer would.
"""
from __future__ import annotations

import time
from typing import Any, Callable, List, Optional, Sequence

import torch
import torch.distributed as dist

from dualpipe_ext.moe.comm import PendingWorks, group_size
from dualpipe_ext.moe.dispatch import DispatchHandle

__all__ = ["InFlight", "issue", "combine_backward", "dispatch_backward"]


class InFlight:
    """An issued exchange: ``wait()`` blocks until it has completed and returns its result."""

    def __init__(self, pending: Any, delay_s: float = 0.0) -> None:
        self._pending = pending  # an object with wait() -> result
        self.issued_ns = time.perf_counter_ns()
        self._ready_ns = self.issued_ns + int(delay_s * 1e9)
        self._done = False
        self._result = None

    def wait(self):
        if not self._done:
            self._result = self._pending.wait()
            self._pending = None
            remaining = self._ready_ns - time.perf_counter_ns()
            if remaining > 0:
                time.sleep(remaining / 1e9)
            self._done = True
        return self._result


class _Done:
    def __init__(self, result) -> None:
        self.result = result

    def wait(self):
        return self.result


def issue(pending_or_result: Any, delay_s: float = 0.0) -> InFlight:
    """Wrap a ``PendingWorks`` (or an already available result) as an exchange in flight."""
    if not hasattr(pending_or_result, "wait"):
        pending_or_result = _Done(pending_or_result)
    return InFlight(pending_or_result, delay_s)


def _a2a_async(x: torch.Tensor, out_splits: Sequence[int], in_splits: Sequence[int], group,
               works: List[Any]) -> Callable[[], torch.Tensor]:
    """Issue one uneven all-to-all of ``x`` rows; returns a getter valid after ``works`` end."""
    if not (dist.is_available() and dist.is_initialized()) or group_size(group) == 1:
        return lambda: x
    send = x.contiguous()
    if dist.get_backend(group) != "nccl" and send.device.type != "cpu":
        send = send.cpu()
    out = torch.empty((sum(out_splits),) + tuple(x.shape[1:]), dtype=x.dtype, device=send.device)
    works.append(dist.all_to_all_single(out, send, list(out_splits), list(in_splits), group=group, async_op=True))
    return lambda: out.to(x.device)


def combine_backward(grad_out: torch.Tensor, handle: DispatchHandle, num_sms: Optional[int] = None) -> PendingWorks:
    """Gradient of ``combine``: ``grad_out`` [num_tokens, hidden] -> [num_recv, hidden] rows.

    Each token's gradient is copied to every rank it was dispatched to (a dispatch-shaped
    all-to-all); ``wait()`` of the result returns the expert-side row gradients.
    """
    from dualpipe_ext.kernels.permute import permute

    send = permute(grad_out, handle.send_pos, sum(handle.num_send_per_rank), num_sms=num_sms)
    works: List[Any] = []
    rows = _a2a_async(send, handle.num_recv_per_rank, handle.num_send_per_rank, handle.group, works)
    return PendingWorks(works, rows)


def dispatch_backward(grad_recv_x: torch.Tensor, grad_recv_weights: torch.Tensor, handle: DispatchHandle,
                      topk_idx: torch.Tensor, num_sms: Optional[int] = None) -> PendingWorks:
    """Gradient of ``dispatch`` w.r.t. its token rows and routing weights.

    grad_recv_x: [num_recv, hidden]; grad_recv_weights: [num_recv, num_topk] float32;
    topk_idx: [num_tokens, num_topk] int64 as dispatched. ``wait()`` returns
    ``(grad_x [num_tokens, hidden], grad_topk_weights [num_tokens, num_topk] float32)``:
    each token's row gradients summed over the ranks it went to, and each weight's
    gradient from the rank holding its expert (a combine-shaped all-to-all).
    """
    from dualpipe_ext.kernels.combine import combine as combine_rows

    works: List[Any] = []
    rows = _a2a_async(grad_recv_x, handle.num_send_per_rank, handle.num_recv_per_rank, handle.group, works)
    wrows = _a2a_async(grad_recv_weights.contiguous(), handle.num_send_per_rank, handle.num_recv_per_rank,
                       handle.group, works)

    def finish():
        grad_x = combine_rows(rows(), handle.send_pos, None, num_sms=num_sms)
        return grad_x, _weights_grad(wrows(), handle, topk_idx)

    return PendingWorks(works, finish)


def _weights_grad(grad_send_w: torch.Tensor, handle: DispatchHandle, topk_idx: torch.Tensor) -> torch.Tensor:
    """Scatter send-row weight gradients back to ``[num_tokens, num_topk]``: slot k of token t
    takes the value from the row that went to the rank holding expert ``topk_idx[t, k]``."""
    world = handle.send_pos.shape[1]
    owner = torch.where(topk_idx >= 0, topk_idx // (handle.num_experts // world), torch.zeros_like(topk_idx))
    rows = handle.send_pos.gather(1, owner)  # [num_tokens, num_topk]
    valid = (topk_idx >= 0) & (rows >= 0)
    if grad_send_w.shape[0] == 0:
        return torch.zeros(topk_idx.shape, dtype=grad_send_w.dtype, device=topk_idx.device)
    slots = torch.arange(topk_idx.shape[1], device=rows.device).expand_as(rows)
    picked = grad_send_w[rows.clamp_min(0), slots]
    return torch.where(valid, picked, torch.zeros((), dtype=grad_send_w.dtype))
