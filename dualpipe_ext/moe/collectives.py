"""Communication pieces of expert parallelism: a differentiable ``all_to_all_single`` with
uneven splits (sync or async), one that carries routing indices and weights together, and
an FP8 one (``all_to_all_fp8``: e4m3 rows and their scales cross, the gradient comes back in the
rows' dtype), and the small control exchanges (row counts, error flags, metadata) that let every rank size its
receive buffers and raise the same error when any rank's input is bad.

With no process group (torch.distributed not initialised) or a group of one rank, every
function here works locally without communication.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
import torch.distributed as dist

from dualpipe_ext._checks import check_group
from dualpipe_ext.faults import checked

__all__ = ["group_size", "group_rank", "exchange_control", "exchange_control_async", "gather_rows",
           "gather_rows_async", "all_to_all", "all_to_all_routes", "all_to_all_async", "all_to_all_fp8"]


def _active(group) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def group_size(group=None) -> int:
    """Ranks in ``group`` (1 when torch.distributed is not initialised). Raises for a ``group`` that is not a
    process group this process belongs to."""
    check_group("the expert-parallel group", group)
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


def exchange_control(rows: torch.Tensor, group=None) -> torch.Tensor:
    """One ``all_to_all_single`` of a small int64 table: row r goes to rank r.

    ``rows``: [world_size, k] int64, what this rank tells each peer (a row count for that peer,
    its error flag, metadata). Returns [world_size, k] int64 on the CPU: row s is what rank s
    sent here. A rank that sends the same value to every peer in some column lets every rank
    see that column of every rank, so all of them can reach the same verdict about it.
    """
    get, work = exchange_control_async(rows, group)
    if work is not None:
        checked("the control exchange of expert parallelism", work.wait)
    return get()


def exchange_control_async(rows: torch.Tensor, group=None):
    """``exchange_control`` issued asynchronously: returns (getter of the [world_size, k] CPU table, work)."""
    if not _active(group):
        table = rows.to(device="cpu", dtype=torch.int64).clone()
        return (lambda: table), None
    device = _comm_device(group, rows.device)
    send = rows.to(device=device, dtype=torch.int64).contiguous()
    recv = torch.empty_like(send)
    work = dist.all_to_all_single(recv, send, group=group, async_op=True)
    return (lambda: recv.cpu()), work


def gather_rows_async(row: torch.Tensor, group=None, device: torch.device = torch.device("cpu")):
    """``gather_rows`` issued asynchronously: returns (getter of the [world_size, k] CPU table, work)."""
    if not _active(group):
        table = row.to(device="cpu", dtype=torch.int64).reshape(1, -1).clone()
        return (lambda: table), None
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    table = torch.zeros(world, row.numel(), dtype=torch.int64, device=_comm_device(group, device))
    table[rank] = row.to(table.device)
    work = dist.all_reduce(table, op=dist.ReduceOp.SUM, group=group, async_op=True)
    return (lambda: table.cpu()), work


def gather_rows(row: torch.Tensor, group=None, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """Every rank's ``row`` ([k] int64) on every rank: [world_size, k] int64 on the CPU.

    One all_reduce (sum) of a [world_size, k] table in which each rank fills its own row.
    """
    get, work = gather_rows_async(row, group, device)
    if work is not None:
        checked("the control all_reduce of expert parallelism", work.wait)
    return get()


def _a2a(x: torch.Tensor, out_splits: List[int], in_splits: List[int], group, async_op: bool):
    """``all_to_all_single`` over dim 0 on the group's device; returns (output, work or None)."""
    comm = _comm_device(group, x.device)
    send = x.to(comm).contiguous()
    out = torch.empty((sum(out_splits),) + tuple(x.shape[1:]), dtype=x.dtype, device=comm)
    work = checked("an expert-parallel all_to_all_single", lambda: dist.all_to_all_single(
        out, send, out_splits, in_splits, group=group, async_op=async_op))
    return out, (work if async_op else None)


def _a2a_pending(x: torch.Tensor, out_splits: List[int], in_splits: List[int], group, pending) -> torch.Tensor:
    """``_a2a`` that queues its work on ``pending`` (async) or completes it; output on ``x``'s device."""
    out, work = _a2a(x, out_splits, in_splits, group, async_op=pending is not None)
    if pending is not None:
        pending.append(work)
    if out.device != x.device:  # gloo moves CPU tensors: only happens for CPU inputs without async
        if work is not None:
            checked("an expert-parallel all_to_all_single", work.wait)
        out = out.to(x.device)
    return out


class _AllToAll(torch.autograd.Function):
    """Differentiable uneven all-to-all; the backward sends gradients back along the same routes."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, pending):
        ctx.out_splits, ctx.in_splits, ctx.group, ctx.device = out_splits, in_splits, group, x.device
        return _a2a_pending(x, out_splits, in_splits, group, pending)

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


class _RoutesAllToAll(torch.autograd.Function):
    """Indices and weights of the send rows in one int32 all-to-all; differentiable in the weights.

    The buffer is [rows, 2 * num_topk] int32: the local expert indices, then the float32 weights
    bit-cast to int32. Bit-casting is exact: the received weights are the sent ones bit for bit
    (NaN payloads and signed zeros included), and the indices fit int32 (checked by the caller).
    The received buffer goes to ``sink``; the output is the float32 view of its weight columns.
    Backward: the weight gradients go back in one float32 all-to-all along the same routes.
    """

    @staticmethod
    def forward(ctx, weights, idx, out_splits, in_splits, group, pending, sink):
        ctx.out_splits, ctx.in_splits, ctx.group, ctx.device = out_splits, in_splits, group, weights.device
        k = idx.shape[1]
        packed = torch.empty(idx.shape[0], 2 * k, dtype=torch.int32, device=idx.device)
        packed[:, :k] = idx
        packed[:, k:] = weights.detach().contiguous().view(torch.int32)
        out = _a2a_pending(packed, out_splits, in_splits, group, pending)
        sink.append(out)
        return out[:, k:].view(torch.float32)

    @staticmethod
    def backward(ctx, grad):
        grad_in, _ = _a2a(grad.contiguous(), ctx.in_splits, ctx.out_splits, ctx.group, async_op=False)
        return grad_in.to(ctx.device), None, None, None, None, None, None


def all_to_all_routes(
    idx: torch.Tensor,
    weights: torch.Tensor,
    out_splits: List[int],
    in_splits: List[int],
    group=None,
    pending: Optional[list] = None,
):
    """Send per-row expert indices and weights along the routes of ``all_to_all``, in one transfer.

    ``idx``: [sum(in_splits), num_topk] int64 with values in int32 range; ``weights``: the same
    shape, float32, differentiable. Returns a function that gives ``(recv_idx [sum(out_splits),
    num_topk] int64, recv_weights float32)``; with ``pending`` it may only be called after the
    work appended there is waited on.
    """
    if not _active(group):
        return lambda: (idx, weights)
    sink: list = []
    recv_weights = _RoutesAllToAll.apply(weights, idx, out_splits, in_splits, group, pending, sink)
    k = idx.shape[1]
    return lambda: (sink[0][:, :k].to(torch.int64), recv_weights.contiguous())


def all_to_all_async(x: torch.Tensor, out_splits: Sequence[int], in_splits: Sequence[int], group,
                     works: List) -> Callable[[], torch.Tensor]:
    """Issue one uneven all-to-all of ``x`` rows (no autograd); its work goes to ``works``.

    Returns a getter of the received rows (on ``x``'s device), valid once the works end.
    """
    if not _active(group):
        return lambda: x
    out, work = _a2a(x, list(out_splits), list(in_splits), group, async_op=True)
    works.append(work)
    return lambda: out.to(x.device)


class _StraightThrough(torch.autograd.Function):
    """The received dequantized rows, differentiable in the sent rows as if they had crossed unquantized:
    the backward sends the row gradients back along the same routes, in their own dtype."""

    @staticmethod
    def forward(ctx, x, results: List[torch.Tensor], out_splits, in_splits, group):
        ctx.out_splits, ctx.in_splits, ctx.group, ctx.device = out_splits, in_splits, group, x.device
        return results[0]

    @staticmethod
    def backward(ctx, grad):
        if _active(ctx.group):
            grad, _ = _a2a(grad.contiguous(), ctx.in_splits, ctx.out_splits, ctx.group, async_op=False)
        return grad.to(ctx.device), None, None, None, None


def all_to_all_fp8(
    x: torch.Tensor,
    out_splits: List[int],
    in_splits: List[int],
    group=None,
    pending: Optional[list] = None,
    *,
    ue8m0: bool = False,
) -> Callable[[], torch.Tensor]:
    """``all_to_all`` of ``x``'s rows quantized to FP8 (``kernels/fp8.py``: e4m3, a float32 scale per
    1x128 group, ``ue8m0``: power-of-two scales); each row crosses as ``hidden + 4 * ceil(hidden / 128)``
    bytes, in one uint8 all-to-all.

    ``x``: [sum(in_splits), hidden] float32/bfloat16/float16. Returns a getter of the received rows
    dequantized to ``x``'s dtype ([sum(out_splits), hidden]); with ``pending`` it may only be called
    after the work appended there is waited on. Differentiable in ``x`` (straight-through: the
    gradient of the dequantized rows goes back unquantized). With one rank the rows are still
    rounded, so the numbers do not depend on the group's size.
    """
    from dualpipe_ext.kernels import fp8

    hidden = x.shape[1]
    q, scales = fp8.quantize(x.detach(), ue8m0=ue8m0)
    packed = fp8.pack(q, scales)
    recv = _a2a_pending(packed, out_splits, in_splits, group, pending) if _active(group) else packed
    grad_mode = torch.is_grad_enabled()

    def get() -> torch.Tensor:
        rows = fp8.dequantize(*fp8.unpack(recv, hidden), x.dtype)
        with torch.set_grad_enabled(grad_mode):
            return _StraightThrough.apply(x, [rows], out_splits, in_splits, group)

    return get
