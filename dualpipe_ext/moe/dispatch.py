"""Expert-parallel ``dispatch`` and ``combine`` with autograd, over ``all_to_all_single``.

``dispatch`` sends each token once to every rank holding at least one of its chosen experts
(experts split evenly and contiguously over the group), with each token's local expert
indices and weights for that rank. ``combine`` sends the expert outputs back and sums, per
original token, the rows from all ranks. The backward of dispatch is a combine-shaped sum
(through ``permute``'s autograd) and the backward of combine a dispatch-shaped copy.

Order of one dispatch: check inputs and agree on errors (one small all_reduce), layout,
exchange of per-rank counts (one all_to_all of [world_size] int64; needed to size the
receive buffers), pack, then the payload all_to_alls (sync, or async with ``async_op``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Tuple, Union

import torch

from .comm import PendingWorks, agree_on_errors, all_to_all, exchange_counts, group_size

__all__ = ["DispatchHandle", "dispatch", "combine"]

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass(frozen=True)
class DispatchHandle:
    """What ``combine`` needs to send expert outputs back; plain data and one tensor."""

    send_pos: torch.Tensor  # [num_tokens, num_ranks] int64: row of token t in the send buffer, -1 if not sent to r
    num_send_per_rank: Tuple[int, ...]  # rows this rank sent to each rank
    num_recv_per_rank: Tuple[int, ...]  # rows this rank received from each rank (received rows are in this order)
    num_experts: int  # experts over the whole group
    group: Any  # process group (None: default group)

    @property
    def num_tokens(self) -> int:
        return self.send_pos.shape[0]

    @property
    def num_recv(self) -> int:
        return sum(self.num_recv_per_rank)


def _check_dispatch(x, topk_idx, topk_weights, num_experts, world) -> Optional[str]:
    """The first problem with the dispatch inputs of this rank, or None."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype not in _FLOATS:
        return f"x must be a [num_tokens, hidden] float tensor, got {getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}"
    if not isinstance(topk_idx, torch.Tensor) or topk_idx.dim() != 2 or topk_idx.dtype != torch.int64:
        return f"topk_idx must be a [num_tokens, num_topk] int64 tensor, got {getattr(topk_idx, 'dtype', type(topk_idx).__name__)}"
    if not isinstance(topk_weights, torch.Tensor) or topk_weights.dtype != torch.float32:
        return f"topk_weights must be a float32 tensor, got {getattr(topk_weights, 'dtype', type(topk_weights).__name__)}"
    if topk_idx.shape[0] != x.shape[0] or topk_weights.shape != topk_idx.shape:
        return (f"x {tuple(x.shape)}, topk_idx {tuple(topk_idx.shape)} and topk_weights {tuple(topk_weights.shape)} "
                "must agree: [num_tokens, hidden], [num_tokens, num_topk], [num_tokens, num_topk]")
    if len({x.device, topk_idx.device, topk_weights.device}) != 1:
        return f"x, topk_idx, topk_weights must share a device, got {x.device}, {topk_idx.device}, {topk_weights.device}"
    if not isinstance(num_experts, int) or num_experts < 1:
        return f"num_experts must be a positive int, got {num_experts!r}"
    if num_experts % world != 0:
        return f"num_experts ({num_experts}) must be divisible by the expert-parallel size ({world})"
    if topk_idx.shape[1] > num_experts:
        return f"num_topk ({topk_idx.shape[1]}) must not exceed num_experts ({num_experts})"
    if topk_idx.numel():
        bad = (topk_idx < -1) | (topk_idx >= num_experts)
        if bool(bad.any()):
            return f"topk_idx entries must be -1 (no expert) or in [0, {num_experts}), found {topk_idx[bad][0].item()}"
        if not bool(torch.isfinite(topk_weights).all()):
            return "topk_weights contain NaN or infinity"
    return None


def _pack_expert_slots(topk_idx, topk_weights, send_pos, num_rows: int, num_local: int):
    """Per send row (token t going to rank r): t's local expert indices on r (-1 elsewhere) and weights.

    Returns ([num_rows, num_topk] int64, [num_rows, num_topk] float32; weights keep autograd).
    """
    token_idx, rank_idx = (send_pos >= 0).nonzero(as_tuple=True)
    rows = send_pos[token_idx, rank_idx]
    src_token = torch.empty(num_rows, dtype=torch.int64, device=send_pos.device)
    dst_rank = torch.empty(num_rows, dtype=torch.int64, device=send_pos.device)
    src_token[rows] = token_idx
    dst_rank[rows] = rank_idx
    chosen = topk_idx[src_token]
    local = chosen - dst_rank[:, None] * num_local
    mine = (chosen >= 0) & (local >= 0) & (local < num_local)
    send_idx = torch.where(mine, local, torch.full_like(local, -1))
    send_weights = torch.where(mine, topk_weights[src_token], torch.zeros((), dtype=topk_weights.dtype, device=topk_weights.device))
    return send_idx, send_weights


def dispatch(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    num_experts: int,
    group=None,
    async_op: bool = False,
    *,
    num_sms: Optional[int] = None,
) -> Union[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, DispatchHandle], PendingWorks]:
    """Send tokens to the ranks holding their experts.

    Args:
        x: [num_tokens, hidden] float (any float dtype; the same on every rank).
        topk_idx: [num_tokens, num_topk] int64, global expert ids; -1 marks an unused slot.
        topk_weights: [num_tokens, num_topk] float32; gradients flow back to it.
        num_experts: experts over the whole group, divisible by its size.
        group: process group (None: the default group; no torch.distributed: one rank).
        async_op: return a handle whose ``wait()`` gives the results once the transfer ends.
        num_sms: SM budget of the packing kernel on CUDA (None: unbounded).
    Returns:
        ``(recv_x [num_recv, hidden], recv_idx [num_recv, num_topk] int64 (local expert or -1),
        recv_weights [num_recv, num_topk] float32, handle)``; received tokens ordered by source
        rank, then token index. With ``async_op`` a handle whose ``wait()`` returns that tuple.
    Raises:
        ValueError on every rank, before any payload moves, if any rank's input is bad.
    """
    world = group_size(group)
    device = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
    agree_on_errors(_check_dispatch(x, topk_idx, topk_weights, num_experts, world), "dispatch", group, device)
    _check_same_across_ranks("dispatch", group, device, hidden=x.shape[1], num_topk=topk_idx.shape[1],
                             num_experts=num_experts, dtype=_FLOATS.index(x.dtype))

    from dualpipe_ext.kernels.dispatch_layout import dispatch_layout
    from dualpipe_ext.kernels.permute import permute

    layout = dispatch_layout(topk_idx, num_experts, world, check_indices=False)
    num_send = [int(c) for c in layout.num_tokens_per_rank.tolist()]
    num_recv = exchange_counts(layout.num_tokens_per_rank, group)
    total_send = sum(num_send)
    send_x = permute(x, layout.send_pos, total_send, num_sms=num_sms)
    send_idx, send_weights = _pack_expert_slots(topk_idx, topk_weights, layout.send_pos, total_send, num_experts // world)

    handle = DispatchHandle(layout.send_pos, tuple(num_send), tuple(num_recv), num_experts, group)
    pending: Optional[list] = [] if async_op else None
    recv_x = all_to_all(send_x, num_recv, num_send, group, pending)
    recv_idx = all_to_all(send_idx, num_recv, num_send, group, pending)
    recv_weights = all_to_all(send_weights, num_recv, num_send, group, pending)
    result = (recv_x, recv_idx, recv_weights, handle)
    if async_op:
        return PendingWorks(pending, lambda: result)
    return result


def combine(
    y: torch.Tensor,
    handle: DispatchHandle,
    async_op: bool = False,
    *,
    num_sms: Optional[int] = None,
) -> Union[torch.Tensor, PendingWorks]:
    """Send expert outputs back and sum, for every original token, its rows from all ranks.

    Args:
        y: [num_recv, hidden] float, one row per token received by ``dispatch``.
        handle: the ``DispatchHandle`` of that dispatch.
        async_op: return a handle whose ``wait()`` gives the result once the transfer ends.
        num_sms: SM budget of the reduction kernel on CUDA (None: unbounded).
    Returns:
        [num_tokens, hidden], dtype of ``y`` (or a handle with ``async_op``).
    """
    error = None
    if not isinstance(handle, DispatchHandle):
        error = f"handle must be the DispatchHandle returned by dispatch, got {type(handle).__name__}"
    elif not isinstance(y, torch.Tensor) or y.dim() != 2 or y.dtype not in _FLOATS:
        error = f"y must be a [num_recv, hidden] float tensor, got {getattr(y, 'dtype', type(y).__name__)}"
    elif y.shape[0] != handle.num_recv:
        error = f"y has {y.shape[0]} rows but dispatch delivered {handle.num_recv} tokens to this rank"
    elif y.device != handle.send_pos.device:
        error = f"y is on {y.device} but the dispatched tokens were on {handle.send_pos.device}"
    group = handle.group if isinstance(handle, DispatchHandle) else None
    device = y.device if isinstance(y, torch.Tensor) else torch.device("cpu")
    agree_on_errors(error, "combine", group, device)
    _check_same_across_ranks("combine", group, device, hidden=y.shape[1], dtype=_FLOATS.index(y.dtype))

    from dualpipe_ext.kernels.combine import combine as combine_rows

    pending: Optional[list] = [] if async_op else None
    rows = all_to_all(y, list(handle.num_send_per_rank), list(handle.num_recv_per_rank), group, pending)

    def finish() -> torch.Tensor:
        return combine_rows(rows, handle.send_pos, None, num_sms=num_sms)

    if async_op:
        return PendingWorks(pending, finish)
    return finish()


def _check_same_across_ranks(op: str, group, device, **values: int) -> None:
    """Raise on every rank if the named integers differ between ranks (one all_reduce of min and max)."""
    if group_size(group) == 1:
        return
    import torch.distributed as dist

    from .comm import _comm_device

    v = torch.tensor(list(values.values()), dtype=torch.int64, device=_comm_device(group, device))
    both = torch.cat([v, -v])
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    hi, lo = both[: len(v)].tolist(), (-both[len(v):]).tolist()
    differ = [f"{name} ranges over [{a}, {b}]" for name, a, b in zip(values, lo, hi) if a != b]
    if differ:
        raise ValueError(f"{op}: ranks of the group disagree: " + "; ".join(differ))
