"""Expert-parallel ``dispatch`` and ``combine`` with autograd, over ``all_to_all_single``.

``dispatch`` sends each token once to every rank holding at least one of its chosen experts
(experts split evenly and contiguously over the group), with each token's local expert
indices and weights for that rank. ``combine`` sends the expert outputs back and sums, per
original token, the rows from all ranks. The backward of dispatch is a combine-shaped sum
(through ``permute``'s autograd) and the backward of combine a dispatch-shaped copy.

Collectives of one dispatch: one control exchange (``all_to_all_single`` of a [world_size, 7] int64
table: to each peer its row count, this rank's error code, hidden size, dtype, top-k, number of
experts and FP8 mode; it sizes the receive buffers and lets every rank raise the same error before
any payload moves), then two payload all-to-alls: the token rows (with ``fp8``: their e4m3 bytes
and float32 group scales, as uint8), and the local expert indices with the weights bit-cast beside
them in one int32 buffer. Combine: one control all_reduce of a [world_size, 3 + 2 * world_size]
int64 table (error codes, hidden size, dtype and every rank's row counts, so that every rank checks
that all the handles come from the same dispatch), then one payload all-to-all. Every exchange is
issued asynchronously; the payload follows its control exchange at ``InFlight.progress()`` (the
overlap engine calls it after the next computation, at the same point on every rank) or at
``wait()``. Backward: two all-to-alls for dispatch (row and weight gradients), one for combine;
``combine_backward`` and ``dispatch_backward`` issue them asynchronously for the overlap engine.

Their autograd comes from the differentiable all-to-alls of ``collectives.py``
(``torch.autograd.Function``s) and the kernels under them, not from ``torch.library.custom_op``s:
output shapes depend on the data (how many rows each rank receives is known only after the
control exchange), a handle carries Python data and a process group, and with ``async_op`` the
result is an object whose ``wait()`` produces the tensors. The fixed-shape kernels under them
(``permute``, ``unpermute``, ``combine``) are registered custom ops.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from dualpipe_ext.inflight import InFlight
from dualpipe_ext.kernels._common import WIRE_DTYPES, code_dtype, dtype_code

from .collectives import (all_to_all, all_to_all_async, all_to_all_fp8, all_to_all_routes, exchange_control_async,
                          gather_rows_async, group_rank, group_size)
from .ep_errors import EPError

__all__ = ["DispatchHandle", "dispatch", "combine", "combine_backward", "dispatch_backward"]



@dataclass(frozen=True)
class DispatchHandle:
    """What ``combine`` needs to send expert outputs back; plain data and one tensor."""

    send_pos: torch.Tensor  # [num_tokens, world] int64: row of token t in the send buffer, -1 if not sent to r
    num_send_per_rank: Tuple[int, ...]  # rows this rank sent to each rank
    num_recv_per_rank: Tuple[int, ...]  # rows this rank received from each rank (received rows are in this order)
    num_experts: int  # experts over the whole group
    group: Any  # process group (None: default group)
    topk_idx: Optional[torch.Tensor] = None  # [num_tokens, num_topk] int64 as dispatched (for the weights' gradient)

    @property
    def num_tokens(self) -> int:
        return self.send_pos.shape[0]

    @property
    def num_recv(self) -> int:
        return sum(self.num_recv_per_rank)


# What a rank's error code names in the message every rank raises (code = index + 1).
_DISPATCH_ERRORS = {EPError.X: "x", EPError.TOPK_IDX: "topk_idx", EPError.TOPK_WEIGHTS: "topk_weights",
                    EPError.SHAPES: "shapes", EPError.DEVICE: "devices", EPError.NUM_EXPERTS: "num_experts",
                    EPError.TOPK_IDX_VALUES: "topk_idx values", EPError.TOPK_WEIGHTS_VALUES: "topk_weights values",
                    EPError.FP8_DTYPE: "x dtype for fp8"}
_COMBINE_ERRORS = {EPError.HANDLE: "handle", EPError.Y: "y", EPError.ROWS: "y shape", EPError.DEVICE: "y device"}
# Columns of the dispatch control table (row r: what this rank tells rank r).
_DISPATCH_CONTROL = ("num_rows", "error", "hidden", "dtype", "num_topk", "num_experts", "fp8")
_FP8_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_dispatch(x, topk_idx, topk_weights, num_experts, world, fp8=False) -> Tuple[int, Optional[str]]:
    """(error code, message) of the first problem with the dispatch inputs of this rank, or (0, None)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype not in WIRE_DTYPES:
        return EPError.X, f"x must be a [num_tokens, hidden] float tensor, got {getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}"
    if not isinstance(topk_idx, torch.Tensor) or topk_idx.dim() != 2 or topk_idx.dtype != torch.int64:
        return EPError.TOPK_IDX, f"topk_idx must be a [num_tokens, num_topk] int64 tensor, got {getattr(topk_idx, 'dtype', type(topk_idx).__name__)}"
    if not isinstance(topk_weights, torch.Tensor) or topk_weights.dtype != torch.float32:
        return EPError.TOPK_WEIGHTS, f"topk_weights must be a float32 tensor, got {getattr(topk_weights, 'dtype', type(topk_weights).__name__)}"
    if topk_idx.shape[0] != x.shape[0] or topk_weights.shape != topk_idx.shape:
        return EPError.SHAPES, (f"x {tuple(x.shape)}, topk_idx {tuple(topk_idx.shape)} and topk_weights {tuple(topk_weights.shape)} "
                   "must agree: [num_tokens, hidden], [num_tokens, num_topk], [num_tokens, num_topk]")
    if len({x.device, topk_idx.device, topk_weights.device}) != 1:
        return EPError.DEVICE, f"x, topk_idx, topk_weights must share a device, got {x.device}, {topk_idx.device}, {topk_weights.device}"
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or not 1 <= num_experts < 2 ** 31:
        return EPError.NUM_EXPERTS, f"num_experts must be a positive int below 2**31, got {num_experts!r}"
    if num_experts % world != 0:
        return EPError.NUM_EXPERTS, f"num_experts ({num_experts}) must be divisible by the expert-parallel size ({world})"
    if topk_idx.shape[1] > num_experts:
        return EPError.TOPK_IDX, f"num_topk ({topk_idx.shape[1]}) must not exceed num_experts ({num_experts})"
    if fp8 and x.dtype not in _FP8_DTYPES:
        return EPError.FP8_DTYPE, f"fp8 dispatch quantizes float32, bfloat16 or float16 rows, got {x.dtype}"
    return EPError.OK, None


def _routing_flags(topk_idx: torch.Tensor, topk_weights: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[3] int64 on the routing's device, computed there (no host read): any topk_idx entry out of
    [-1, num_experts), the first such entry (0 if none), any non-finite weight."""
    flat = topk_idx.flatten()
    if flat.numel() == 0:
        return torch.zeros(3, dtype=torch.int64, device=topk_idx.device)
    bad = (flat < -1) | (flat >= num_experts)
    return torch.stack([bad.any().long(), flat[bad.to(torch.uint8).argmax()],
                        (~torch.isfinite(topk_weights)).any().long()])


def _routing_problem(flags: List[int], num_experts: int) -> Tuple[int, Optional[str]]:
    """(error code, message) from ``_routing_flags`` read on the host, as ``routing_values_problem`` says it."""
    if flags[0]:
        return EPError.TOPK_IDX_VALUES, f"topk_idx entries must be -1 (no expert) or in [0, {num_experts}), found {flags[1]}"
    if flags[2]:
        return EPError.TOPK_WEIGHTS_VALUES, "topk_weights contain NaN or infinity"
    return EPError.OK, None


def routing_values_problem(topk_idx: torch.Tensor, topk_weights: torch.Tensor, num_experts: int) -> Optional[str]:
    """What is wrong with the values of a routing (reads them on the host), or None."""
    if topk_idx.numel():
        bad = (topk_idx < -1) | (topk_idx >= num_experts)
        if bool(bad.any()):
            return f"topk_idx entries must be -1 (no expert) or in [0, {num_experts}), found {int(topk_idx[bad][0])}"
        if not bool(torch.isfinite(topk_weights).all()):
            return "topk_weights contain NaN or infinity"
    return None


def _raise_on_errors(op: str, codes: List[int], names: Dict[EPError, str], rank: int, detail: Optional[str]) -> None:
    """Raise ``ValueError`` if any rank's error code is non-zero; the same first sentence on every rank.

    ``codes``: every rank's code, as every rank received them. The ranks that passed bad input
    add their own detailed message.
    """
    bad = [r for r, c in enumerate(codes) if c]
    if not bad:
        return
    what = "; ".join(f"rank {r}: {names[EPError(codes[r])]}" for r in bad)
    msg = f"{op}: rank(s) {bad} of the group passed bad input ({what}); nothing was exchanged"
    if detail is not None:
        msg += f". On rank {rank}: {detail}"
    raise ValueError(msg)


def _raise_on_disagreement(op: str, table: torch.Tensor, columns: Tuple[str, ...]) -> None:
    """Raise on every rank if a column of ``table`` ([world_size, len(columns)], one row per rank) differs."""
    differ = []
    for j, name in enumerate(columns):
        col = table[:, j].tolist()
        if len(set(col)) > 1:
            if name == "dtype":
                differ.append("dtype differs (" + ", ".join(f"rank {r}: {code_dtype(c)}" for r, c in enumerate(col)) + ")")
            else:
                per_rank = ", ".join(f"rank {r}: {v}" for r, v in enumerate(col))
                differ.append(f"{name} ranges over [{min(col)}, {max(col)}] ({per_rank})")
    if differ:
        raise ValueError(f"{op}: ranks of the group disagree: " + "; ".join(differ))


def _pack_expert_slots(topk_idx, topk_weights, send_pos, num_rows: int, num_local: int):
    """Per send row (token t going to rank r): t's local expert indices on r (-1 elsewhere) and weights.

    Returns ([num_rows, num_topk] int64, [num_rows, num_topk] float32; weights keep autograd).
    """
    # every (token, rank) entry scatters its token and rank to its send row; entries not sent go to one
    # extra row, dropped: no host read (a nonzero would be a second one after the counts')
    num_tokens, world = send_pos.shape
    dev = send_pos.device
    flat = send_pos.flatten()
    rows = torch.where(flat >= 0, flat, num_rows)
    tokens = torch.arange(num_tokens, device=dev).repeat_interleave(world, output_size=num_tokens * world)
    ranks = torch.arange(world, device=dev).repeat(num_tokens)
    src_token = torch.empty(num_rows + 1, dtype=torch.int64, device=dev).scatter_(0, rows, tokens)[:num_rows]
    dst_rank = torch.empty(num_rows + 1, dtype=torch.int64, device=dev).scatter_(0, rows, ranks)[:num_rows]
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
    num_comm_sms: Optional[int] = None,
    fp8: bool = False,
    ue8m0: bool = False,
) -> Union[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, DispatchHandle], InFlight]:
    """Send tokens to the ranks holding their experts.

    Args:
        x: [num_tokens, hidden] float (any float dtype; the same on every rank).
        topk_idx: [num_tokens, num_topk] int64, global expert ids; -1 marks an unused slot.
        topk_weights: [num_tokens, num_topk] float32; gradients flow back to it.
        num_experts: experts over the whole group, divisible by its size.
        group: process group (None: the default group; no torch.distributed: one rank).
        async_op: return a handle whose ``wait()`` gives the results once the transfer ends.
        num_comm_sms: the communication's SM budget, the grid of the packing kernel (None: unbounded).
        fp8: send the rows as FP8 (DeepSeek-V3's dispatch: e4m3, one float32 scale per 1x128 group,
            ``hidden + 4 * ceil(hidden / 128)`` bytes a row; see ``kernels/fp8.py``); ``recv_x`` is
            then the dequantized rows, in ``x``'s dtype, exactly those of a plain dispatch of
            ``fp8.round_trip(x)``. Gradients (and ``combine``) stay in ``x``'s dtype: straight-through.
            Every rank must pass the same ``fp8`` and ``ue8m0``.
        ue8m0: with ``fp8``, round the scales up to powers of two.
    Returns:
        ``(recv_x [num_recv, hidden], recv_idx [num_recv, num_topk] int64 (local expert or -1),
        recv_weights [num_recv, num_topk] float32, handle)``; received tokens ordered by source
        rank, then token index. With ``async_op`` a handle whose ``wait()`` returns that tuple.
    Raises:
        ValueError on every rank, before any payload moves, if any rank's input is bad.
    """
    world, rank = group_size(group), group_rank(group)
    code, detail = _check_dispatch(x, topk_idx, topk_weights, num_experts, world, fp8)
    control = torch.full((world, len(_DISPATCH_CONTROL)), -1, dtype=torch.int64)
    control[:, 1] = int(code)
    layout = None
    if code == 0:
        from dualpipe_ext.kernels.dispatch_layout import dispatch_layout

        # the routing's values are checked on the device and read with the counts (one transfer, which
        # the all-to-all sizes need anyway); bad entries are left out of the layout meanwhile
        flags = _routing_flags(topk_idx, topk_weights, num_experts)
        in_range = (topk_idx >= -1) & (topk_idx < num_experts)
        layout = dispatch_layout(torch.where(in_range, topk_idx, -1), num_experts, world, check_indices=False)
        host = torch.cat([layout.num_tokens_per_rank.to(torch.int64), flags]).cpu()
        control[:, 0] = host[:world]
        code, detail = _routing_problem(host[world:].tolist(), num_experts)
        control[:, 1] = int(code)
        control[:, 2:] = torch.tensor([x.shape[1], dtype_code(x.dtype), topk_idx.shape[1], num_experts,
                                       int(bool(fp8)) * (1 + int(bool(ue8m0)))])
    get_received, control_work = exchange_control_async(control, group)
    grad_mode = torch.is_grad_enabled()

    def advance():  # the counts have arrived: check, pack and send the payload
        received = get_received()  # row s: what rank s told this rank
        _raise_on_errors("dispatch", received[:, 1].tolist(), _DISPATCH_ERRORS, rank, detail)
        _raise_on_disagreement("dispatch", received[:, 2:], _DISPATCH_CONTROL[2:])

        from dualpipe_ext.kernels.permute import permute

        num_send = control[:, 0].tolist()
        num_recv = received[:, 0].tolist()
        total_send = sum(num_send)
        with torch.set_grad_enabled(grad_mode):
            send_x = permute(x, layout.send_pos, total_send, num_sms=num_comm_sms)
            send_idx, send_weights = _pack_expert_slots(topk_idx, topk_weights, layout.send_pos, total_send,
                                                        num_experts // world)
            handle = DispatchHandle(layout.send_pos, tuple(num_send), tuple(num_recv), num_experts, group, topk_idx)
            works: list = []
            if fp8:  # quantized after packing: the rows are the same, each quantized on its own
                get_x = all_to_all_fp8(send_x, num_recv, num_send, group, works, ue8m0=ue8m0)
            else:
                recv_x = all_to_all(send_x, num_recv, num_send, group, works)
                get_x = lambda: recv_x  # noqa: E731
            recv_routes = all_to_all_routes(send_idx, send_weights, num_recv, num_send, group, works)

        def finish():
            recv_idx, recv_weights = recv_routes()
            return get_x(), recv_idx, recv_weights, handle

        return works, finish

    pending = InFlight(works=[control_work], advance=advance, what="moe.dispatch")
    return pending if async_op else pending.wait()


def combine(
    y: torch.Tensor,
    handle: DispatchHandle,
    async_op: bool = False,
    *,
    num_comm_sms: Optional[int] = None,
) -> Union[torch.Tensor, InFlight]:
    """Send expert outputs back and sum, for every original token, its rows from all ranks.

    Args:
        y: [num_recv, hidden] float, one row per token received by ``dispatch``.
        handle: the ``DispatchHandle`` of that dispatch.
        async_op: return a handle whose ``wait()`` gives the result once the transfer ends.
        num_comm_sms: the communication's SM budget, the grid of the reduction kernel (None: unbounded).
    Returns:
        [num_tokens, hidden], dtype of ``y`` (or a handle with ``async_op``).
    """
    code, detail = 0, None
    if not isinstance(handle, DispatchHandle):
        code, detail = EPError.HANDLE, f"handle must be the DispatchHandle returned by dispatch, got {type(handle).__name__}"
    elif not isinstance(y, torch.Tensor) or y.dim() != 2 or y.dtype not in WIRE_DTYPES:
        code, detail = EPError.Y, f"y must be a [num_recv, hidden] float tensor, got {getattr(y, 'dtype', type(y).__name__)}"
    elif y.shape[0] != handle.num_recv:
        code, detail = EPError.ROWS, f"y has {y.shape[0]} rows but dispatch delivered {handle.num_recv} tokens to this rank"
    elif y.device != handle.send_pos.device:
        code, detail = EPError.DEVICE, f"y is on {y.device} but the dispatched tokens were on {handle.send_pos.device}"
    group = handle.group if isinstance(handle, DispatchHandle) else None
    world, rank = group_size(group), group_rank(group)
    # this rank's row: error code, hidden, dtype, rows it sends each rank, rows it expects from each rank
    row = torch.full((3 + 2 * world,), -1, dtype=torch.int64)
    row[0] = int(code)
    if code == 0 and len(handle.num_recv_per_rank) == world:
        row[1:3] = torch.tensor([y.shape[1], dtype_code(y.dtype)])
        row[3:3 + world] = torch.tensor(handle.num_recv_per_rank)
        row[3 + world:] = torch.tensor(handle.num_send_per_rank)
    elif code == 0:
        code, detail = EPError.HANDLE, f"handle is for {len(handle.num_recv_per_rank)} ranks, the group has {world}"
        row[0] = int(code)
    get_table, control_work = gather_rows_async(row, group, y.device if isinstance(y, torch.Tensor)
                                                else torch.device("cpu"))
    grad_mode = torch.is_grad_enabled()

    def advance():  # every rank's handle and rows have been compared: send the payload
        table = get_table()
        _raise_on_errors("combine", table[:, 0].tolist(), _COMBINE_ERRORS, rank, detail)
        _raise_on_disagreement("combine", table[:, 1:3], ("hidden", "dtype"))
        sends, expects = table[:, 3:3 + world], table[:, 3 + world:]
        if not torch.equal(sends, expects.t()):
            s, r = (sends != expects.t()).nonzero()[0].tolist()
            raise ValueError(f"combine: the handles of the ranks come from different dispatches: rank {s} would send "
                             f"{int(sends[s, r])} rows to rank {r}, which expects {int(expects[r, s])}; nothing was "
                             f"exchanged")

        from dualpipe_ext.kernels.combine import combine as combine_rows

        works: list = []
        with torch.set_grad_enabled(grad_mode):
            rows = all_to_all(y, list(handle.num_send_per_rank), list(handle.num_recv_per_rank), group, works)

        def finish() -> torch.Tensor:
            with torch.set_grad_enabled(grad_mode):
                return combine_rows(rows, handle.send_pos, None, num_sms=num_comm_sms)

        return works, finish

    pending = InFlight(works=[control_work], advance=advance, what="moe.combine")
    return pending if async_op else pending.wait()


def combine_backward(grad_out: torch.Tensor, handle: DispatchHandle, async_op: bool = False, *,
                     num_comm_sms: Optional[int] = None):
    """Gradient of ``combine``: ``grad_out`` [num_tokens, hidden] -> [num_recv, hidden] row gradients.

    Each token's gradient is copied to every rank it was dispatched to (a dispatch-shaped
    all-to-all). With ``async_op`` an ``InFlight`` whose ``wait()`` returns the rows.
    """
    from dualpipe_ext.kernels.permute import permute

    _check_handle("combine_backward", handle)
    _check_rows("combine_backward", "grad_out", grad_out, handle.num_tokens)
    send = permute(grad_out, handle.send_pos, sum(handle.num_send_per_rank), num_sms=num_comm_sms)
    works: list = []
    rows = all_to_all_async(send, handle.num_recv_per_rank, handle.num_send_per_rank, handle.group, works)
    pending = InFlight(rows, works=works, what="moe.combine_backward")
    return pending if async_op else pending.wait()


def dispatch_backward(grad_recv_x: torch.Tensor, grad_recv_weights: torch.Tensor, handle: DispatchHandle,
                      topk_idx: torch.Tensor, async_op: bool = False, *, num_comm_sms: Optional[int] = None):
    """Gradient of ``dispatch`` w.r.t. its token rows and routing weights.

    grad_recv_x: [num_recv, hidden]; grad_recv_weights: [num_recv, num_topk] float32;
    topk_idx: [num_tokens, num_topk] int64 as dispatched. Returns ``(grad_x [num_tokens, hidden],
    grad_topk_weights [num_tokens, num_topk] float32)``: each token's row gradients summed over
    the ranks it went to (a combine-shaped all-to-all), and each weight's gradient from the
    rank holding its expert. With ``async_op`` an ``InFlight`` whose ``wait()`` returns them.
    """
    from dualpipe_ext.kernels.combine import combine as combine_rows

    _check_handle("dispatch_backward", handle)
    _check_rows("dispatch_backward", "grad_recv_x", grad_recv_x, handle.num_recv)
    if not isinstance(topk_idx, torch.Tensor) or topk_idx.dtype != torch.int64 or topk_idx.dim() != 2 \
            or topk_idx.shape[0] != handle.num_tokens:
        raise ValueError(f"dispatch_backward: topk_idx must be the dispatched [{handle.num_tokens}, num_topk] int64 "
                         f"tensor, got {getattr(topk_idx, 'dtype', type(topk_idx).__name__)} "
                         f"{tuple(getattr(topk_idx, 'shape', ()))}")
    want = (handle.num_recv, topk_idx.shape[1])
    if (not isinstance(grad_recv_weights, torch.Tensor) or grad_recv_weights.dtype != torch.float32
            or tuple(grad_recv_weights.shape) != want):
        raise ValueError(f"dispatch_backward: grad_recv_weights must be [{want[0]}, {want[1]}] float32, got "
                         f"{getattr(grad_recv_weights, 'dtype', type(grad_recv_weights).__name__)} "
                         f"{tuple(getattr(grad_recv_weights, 'shape', ()))}")
    works: list = []
    rows = all_to_all_async(grad_recv_x, handle.num_send_per_rank, handle.num_recv_per_rank, handle.group, works)
    wrows = all_to_all_async(grad_recv_weights.contiguous(), handle.num_send_per_rank, handle.num_recv_per_rank,
                             handle.group, works)

    def finish():
        grad_x = combine_rows(rows(), handle.send_pos, None, num_sms=num_comm_sms)
        return grad_x, _weights_grad(wrows(), handle, topk_idx)

    pending = InFlight(finish, works=works, what="moe.dispatch_backward")
    return pending if async_op else pending.wait()


def _check_handle(op: str, handle: Any) -> None:
    if not isinstance(handle, DispatchHandle):
        raise ValueError(f"{op}: handle must be the DispatchHandle returned by dispatch, got {type(handle).__name__}")


def _check_rows(op: str, name: str, t: Any, rows: int) -> None:
    """``t`` must be a [rows, hidden] float tensor (shape and dtype only: no host read)."""
    if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] != rows or t.dtype not in WIRE_DTYPES:
        raise ValueError(f"{op}: {name} must be a [{rows}, hidden] float tensor, got "
                         f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")


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
