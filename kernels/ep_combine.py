"""Combine-shaped exchanges: expert ranks put rows back into the token owners' slots.

Expert rank ``r`` writes the row of received row ``(s, j)`` into ``s``'s ``combine`` region at
``[slot, r, t]``; the owner sums each token's rows over the ranks it went to (fp32, rank
order), and with weight gradients picks each slot's value from the rank holding its expert.
Used by ``EPBuffer.combine`` and by the backward of its dispatch.
``combine_exchange_reference`` at the end defines it.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from .ep_common import NUM_WARPS_PUT, NUM_WARPS_RECV, COMBINE, Channel, _common, _consts, advance_epoch

from ._triton import block_range, tl, triton  # None without Triton: the references run without it

if triton is not None:
    from .combine import _round_to
    from .ep_common import (_begin_recv, _received_block, _region, _signal_all, _uses, _wait_counters, _write_meta,
                            exchange_kernel)

__all__ = ["launch_put_combine", "launch_recv_combine", "combine_exchange_reference"]

if triton is not None:

    @exchange_kernel
    def _put_combine_kernel(table_ptr, status_ptr, epoch_ptr, y_ptr, src_ptr, recv_count_ptr, gw_ptr, me, world,
                            hidden, num_topk, max_tokens, max_topk, num_experts, error, cx_off, cw_off, sig_word,
                            ack_word, meta_word, zero_word, epoch_word, timeout_ns, max_spins, WEIGHTS: tl.constexpr,
                            WP: tl.constexpr, KP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
                            VEC: tl.constexpr, WAIT_ACK: tl.constexpr, HAS_POLL: tl.constexpr):
        pid, num_programs = tl.program_id(0), tl.num_programs(0)
        if WAIT_ACK:
            _wait_counters(table_ptr, me, world, ack_word, zero_word, _uses(epoch_ptr, epoch_word) * num_programs,
                           status_ptr, timeout_ns, max_spins, WP, HAS_POLL)
        hidden = hidden // VEC * VEC  # exact: VEC divides hidden; tells the compiler rows are VEC-aligned
        k = tl.arange(0, KP)
        k_ok = k < num_topk
        if error == 0:  # only the blocks that hold rows this rank received, spread evenly over the programs
            p = tl.arange(0, WP)
            nb = tl.cdiv(tl.load(recv_count_ptr + p, mask=p < world, other=0), BLOCK_T)
            ends = tl.cumsum(nb, 0)
            for item in range(pid, tl.sum(nb), num_programs):
                s, j = _received_block(item, nb, ends, BLOCK_T, WP)
                row = (s * max_tokens + j).to(tl.int64)
                t = tl.load(src_ptr + row, mask=j < max_tokens, other=-1)
                valid = t >= 0
                cell = (me * max_tokens + t).to(tl.int64)
                dest = _region(table_ptr, s, cx_off, y_ptr.dtype.element_ty)
                for h0 in range(0, hidden, BLOCK_H):
                    h, h_ok = block_range(h0, BLOCK_H, hidden)
                    v = tl.load(y_ptr + row[:, None] * hidden + h[None, :], mask=valid[:, None] & h_ok[None, :])
                    tl.store(dest + cell[:, None] * hidden + h[None, :], v, mask=valid[:, None] & h_ok[None, :])
                if WEIGHTS:
                    m = valid[:, None] & k_ok[None, :]
                    g = tl.load(gw_ptr + row[:, None] * num_topk + k[None, :], mask=m)
                    tl.store(_region(table_ptr, s, cw_off, tl.float32) + cell[:, None] * max_topk + k[None, :], g,
                             mask=m)
        if pid == 0:
            _write_meta(table_ptr, me, world, meta_word, src_ptr, error, num_experts, num_topk, WP, False)
        _signal_all(table_ptr, me, world, sig_word, WP)

    @exchange_kernel
    def _recv_combine_kernel(table_ptr, status_ptr, epoch_ptr, out_ptr, pos_ptr, idx_ptr, gw_out_ptr, count_ptr, me,
                             world, num_tokens, hidden, num_topk, num_local, max_tokens, max_topk, cx_off, cw_off,
                             sig_word, ack_word, meta_word, zero_word, epoch_word, timeout_ns, max_spins,
                             WEIGHTS: tl.constexpr, WP: tl.constexpr, KP: tl.constexpr, BLOCK_T: tl.constexpr,
                             BLOCK_H: tl.constexpr, VEC: tl.constexpr, ACC: tl.constexpr, WAIT: tl.constexpr,
                             HAS_POLL: tl.constexpr):
        pid, num_programs = tl.program_id(0), tl.num_programs(0)
        _begin_recv(table_ptr, status_ptr, me, world, sig_word, zero_word,
                    (_uses(epoch_ptr, epoch_word) + 1) * num_programs, meta_word, count_ptr, timeout_ns, max_spins,
                    WP, WAIT, HAS_POLL)
        hidden = hidden // VEC * VEC  # exact: VEC divides hidden; tells the compiler rows are VEC-aligned
        rows = _region(table_ptr, me, cx_off, out_ptr.dtype.element_ty)
        k = tl.arange(0, KP)
        k_ok = k < num_topk
        for tb in range(pid, tl.cdiv(num_tokens, BLOCK_T), num_programs):
            t, t_ok = block_range(tb * BLOCK_T, BLOCK_T, num_tokens)
            for h0 in range(0, hidden, BLOCK_H):
                h, h_ok = block_range(h0, BLOCK_H, hidden)
                acc = tl.zeros([BLOCK_T, BLOCK_H], dtype=ACC)
                for r in range(world):
                    sent = tl.load(pos_ptr + t * world + r, mask=t_ok, other=-1) >= 0
                    cell = (r * max_tokens + t) * hidden
                    acc += tl.load(rows + cell[:, None] + h[None, :], mask=sent[:, None] & h_ok[None, :],
                                   other=0.0, cache_modifier=".cg").to(ACC)
                tl.store(out_ptr + t[:, None] * hidden + h[None, :], _round_to(acc, out_ptr.dtype.element_ty),
                         mask=t_ok[:, None] & h_ok[None, :])
            if WEIGHTS:
                m = t_ok[:, None] & k_ok[None, :]
                idx = tl.load(idx_ptr + t[:, None] * num_topk + k[None, :], mask=m, other=-1)
                owner = tl.where(idx >= 0, idx // num_local, 0)
                cell = (owner * max_tokens + t[:, None]) * max_topk + k[None, :]
                g = tl.load(_region(table_ptr, me, cw_off, tl.float32) + cell, mask=m & (idx >= 0), other=0.0,
                            cache_modifier=".cg")
                tl.store(gw_out_ptr + t[:, None] * num_topk + k[None, :], g, mask=m)
        _signal_all(table_ptr, me, world, ack_word, WP)


def launch_put_combine(ch: Channel, y: torch.Tensor, src: torch.Tensor, recv_count: torch.Tensor,
                       grad_w: Optional[torch.Tensor], num_experts: int, num_topk: int, error: int = 0) -> None:
    """Put ``y`` [world * max_tokens, hidden] rows back to their tokens' owners (``src`` [rows] int64: the
    token of each row, -1 for padding; ``recv_count`` [world] int64: rows received from each rank), with
    ``grad_w`` [rows, num_topk] float32 if given."""
    lay = ch.layout
    _, _, _, _, cx, cw = lay.slot_offsets(ch.slot)
    _put_combine_kernel[(ch.num_programs,)](
        ch.table, ch.status, ch.epochs, y, src, recv_count, grad_w if grad_w is not None else y, ch.me, lay.world,
        lay.hidden, num_topk, lay.max_tokens, lay.max_topk, num_experts, error, cx, cw, WEIGHTS=grad_w is not None,
        WAIT_ACK=ch.fused_wait, num_warps=NUM_WARPS_PUT, **_common(ch, COMBINE), **_consts(ch, num_topk))


def launch_recv_combine(ch: Channel, out: torch.Tensor, pos: torch.Tensor,
                        weights: Optional[Tuple[torch.Tensor, torch.Tensor]], count_out: torch.Tensor,
                        num_experts: int, num_topk: int) -> None:
    """Sum this slot's combine-shaped rows into ``out`` [num_tokens, hidden]: token t gets the rows of the
    ranks r with ``pos[t, r] >= 0``. With ``weights = (topk_idx [num_tokens, num_topk] int64, grad_w_out
    float32)``, slot k of token t gets the value sent by the rank holding expert ``topk_idx[t, k]``.
    Then one more completed use of the slot."""
    lay = ch.layout
    _, _, _, _, cx, cw = lay.slot_offsets(ch.slot)
    idx, gw = weights if weights is not None else (pos, out)
    acc = tl.float64 if out.dtype == torch.float64 else tl.float32
    _recv_combine_kernel[(ch.num_programs,)](
        ch.table, ch.status, ch.epochs, out, pos, idx, gw, count_out, ch.me, lay.world, out.shape[0], lay.hidden,
        num_topk, max(1, num_experts // lay.world), lay.max_tokens, lay.max_topk, cx, cw,
        WEIGHTS=weights is not None, ACC=acc, WAIT=ch.fused_wait, num_warps=NUM_WARPS_RECV, **_common(ch, COMBINE),
        **_consts(ch, num_topk))
    advance_epoch(ch, COMBINE)


# torch reference


def combine_exchange_reference(ys: Sequence[torch.Tensor], recv_srcs: Sequence[torch.Tensor],
                               num_tokens: Sequence[int], max_tokens: int,
                               grad_ws: Optional[Sequence[torch.Tensor]] = None,
                               topk_idxs: Optional[Sequence[torch.Tensor]] = None, num_experts: int = 0):
    """What every token owner gets from a combine-shaped exchange.

    ``ys[r]`` [world * max_tokens, hidden]: rank r's rows, row ``s * max_tokens + j`` going back to
    token ``recv_srcs[r][row]`` of rank s (-1: padding). Returns per rank ``out [num_tokens, hidden]``
    (fp32 sum in rank order, cast to the rows' dtype), and with ``grad_ws`` also ``grad_w
    [num_tokens, num_topk]`` picked from the rank holding each slot's expert.
    """
    world = len(ys)
    out = []
    for s in range(world):
        acc_dtype = torch.float64 if ys[0].dtype == torch.float64 else torch.float32
        acc = torch.zeros(num_tokens[s], ys[0].shape[1], dtype=acc_dtype)
        grad_w = None if grad_ws is None else torch.zeros(topk_idxs[s].shape)
        for r in range(world):
            rows = torch.arange(s * max_tokens, (s + 1) * max_tokens)
            tok = recv_srcs[r][rows]
            keep = tok >= 0
            acc[tok[keep]] += ys[r][rows[keep]].to(acc_dtype)
            if grad_ws is not None:
                idx = topk_idxs[s]
                owner = torch.where(idx >= 0, idx // (num_experts // world), -1)
                picked = torch.zeros(idx.shape)
                picked[tok[keep]] = grad_ws[r][rows[keep]]
                grad_w = torch.where(owner == r, picked, grad_w)
        out.append(acc.to(ys[0].dtype) if grad_ws is None else (acc.to(ys[0].dtype), grad_w))
    return out

