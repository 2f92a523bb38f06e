"""Communication pieces of expert parallelism: a differentiable ``all_to_all_single`` with
uneven splits (sync or async), the exchange of per-rank counts, and an agreement step that
makes every rank raise the same error when any rank's input is bad.

With no process group (torch.distributed not initialised) or a group of one rank, every
function here works locally without communication.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ["group_size", "group_rank", "agree_on_errors", "exchange_counts", "all_to_all", "PendingWorks"]


def _active(group) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def group_size(group=None) -> int:
    """Ranks in ``group`` (1 when torch.distributed is not initialised)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group)
    return 1


def group_rank(group=None) -> int:
    """This process's rank in ``group`` (0 when torch.distributed is not initialised)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group)
    return 0


def _comm_device(group, device: torch.device) -> torch.device:
    """Device on which ``group``'s backend moves tensors (gloo: CPU; NCCL: the CUDA device)."""
    if not _active(group):
        return device
    backend = dist.get_backend(group)
    if backend == "nccl":
        return device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree_on_errors(error: Optional[str], op: str, group=None, device: torch.device = torch.device("cpu")) -> None:
    """Raise ``ValueError`` on every rank of ``group`` if any rank passes a non-None ``error``.

    One all_reduce of a [world_size] flag vector: each rank marks its own slot. A rank with a
    bad input raises its own message; the others raise one that names the bad ranks. Costs one
    small collective, and keeps ranks from waiting forever on an exchange a bad rank skipped.
    """
    if not _active(group):
        if error is not None:
            raise ValueError(f"{op}: {error}")
        return
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    flags = torch.zeros(world, dtype=torch.int32, device=_comm_device(group, device))
    if error is not None:
        flags[rank] = 1
    dist.all_reduce(flags, op=dist.ReduceOp.SUM, group=group)
    bad = [r for r, f in enumerate(flags.tolist()) if f]
    if error is not None:
        raise ValueError(f"{op} on rank {rank}: {error}")
    if bad:
        raise ValueError(f"{op}: rank(s) {bad} of the group passed bad input (see their errors); nothing was exchanged")


def exchange_counts(num_send_per_rank: torch.Tensor, group=None) -> List[int]:
    """All-to-all of per-destination counts: returns how many rows each rank will send here.

    ``num_send_per_rank``: [world_size] int64, rows this rank sends to each rank.
    """
    if not _active(group):
        return [int(c) for c in num_send_per_rank.tolist()]
    device = _comm_device(group, num_send_per_rank.device)
    send = num_send_per_rank.to(device=device, dtype=torch.int64).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return [int(c) for c in recv.tolist()]


class PendingWorks:
    """Outstanding async collectives plus a finisher that produces the results after they end.

    ``wait()`` waits for every collective, then returns ``finish()``'s result (once; later
    calls return the same result). Results are not exposed before ``wait()``.
    """

    def __init__(self, works: Sequence, finish) -> None:
        self._works = [w for w in works if w is not None]
        self._finish = finish
        self._done = False
        self._result = None

    def is_completed(self) -> bool:
        """True when every collective has finished (``wait()`` then does not block on them)."""
        return all(w.is_completed() for w in self._works)

    def wait(self):
        if not self._done:
            for w in self._works:
                w.wait()
            self._works = []
            self._result = self._finish()
            self._finish = None
            self._done = True
        return self._result


def _a2a(x: torch.Tensor, out_splits: List[int], in_splits: List[int], group, async_op: bool):
    """``all_to_all_single`` over dim 0 on the group's device; returns (output, work or None)."""
    comm = _comm_device(group, x.device)
    send = x.to(comm).contiguous()
    out = torch.empty((sum(out_splits),) + tuple(x.shape[1:]), dtype=x.dtype, device=comm)
    work = dist.all_to_all_single(out, send, out_splits, in_splits, group=group, async_op=async_op)
    return out, (work if async_op else None)


class _AllToAll(torch.autograd.Function):
    """Differentiable uneven all-to-all; the backward sends gradients back along the same routes."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, pending):
        ctx.out_splits, ctx.in_splits, ctx.group, ctx.device = out_splits, in_splits, group, x.device
        out, work = _a2a(x, out_splits, in_splits, group, async_op=pending is not None)
        if pending is not None:
            pending.append(work)
        if out.device != x.device:  # gloo moves CPU tensors: only happens for CPU inputs without async
            if work is not None:
                work.wait()
            out = out.to(x.device)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad_in, _ = _a2a(grad, ctx.in_splits, ctx.out_splits, ctx.group, async_op=False)
        return grad_in.to(ctx.device), None, None, None, None


def all_to_all(
    x: torch.Tensor,
    out_splits: List[int],
    in_splits: List[int],
    group=None,
    pending: Optional[list] = None,
) -> torch.Tensor:
    """Send ``x[rows of segment r]`` to rank r; returns the rows received, ordered by source rank.

    ``x``: [sum(in_splits), ...]; result: [sum(out_splits), ...], same dtype. Differentiable.
    With ``pending`` (a list), the transfer is issued asynchronously and its work appended to
    it: the result must not be read until that work is waited on.
    """
    if not _active(group):
        return x
    return _AllToAll.apply(x, out_splits, in_splits, group, pending)
