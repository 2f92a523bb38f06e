"""Dispatch-shaped exchanges: token owners put rows (and routes) into the expert ranks' slots.

Source ``s`` writes token ``t``'s row into rank ``r``'s ``dispatch`` region at ``[slot, s, j]``,
``j`` the rank of ``t`` among the tokens ``s`` sends to ``r``; the receiver copies the slot
out into capacity-sized outputs. Used by ``EPBuffer.dispatch`` (with routes) and by the
backward of its combine (rows only). ``dispatch_exchange_reference`` at the end defines it.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch

from .ep_common import (_BLOCK_H, NUM_WARPS_PUT, NUM_WARPS_RECV, DISPATCH, Channel, ExchangeLayout, _common, _consts,
                        advance_epoch, row_geometry, row_vec)

from ._triton import block_range, tl, triton  # None without Triton: the references run without it

if triton is not None:
    from .ep_common import (_begin_recv, _received_block, _region, _signal_all, _uses, _wait_counters, _write_meta,
                            exchange_kernel)
    from .fp8 import dequantize_value

__all__ = ["launch_put_dispatch", "launch_recv_dispatch", "fp8_row_geometry", "dispatch_exchange_reference"]

_FP8_OUT = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # fp8.dequantize_value's OUT_KIND

if triton is not None:

    @exchange_kernel
    def _put_dispatch_kernel(table_ptr, status_ptr, epoch_ptr, x_ptr, pos_ptr, counts_ptr, idx_ptr, w_ptr, me, world,
                             num_tokens, hidden, stride, num_topk, num_local, max_tokens, max_topk, num_experts, error,
                             dx_off, didx_off, dw_off, dsrc_off, sig_word, ack_word, meta_word, zero_word, epoch_word,
                             timeout_ns, max_spins, ROUTES: tl.constexpr, WP: tl.constexpr, KP: tl.constexpr,
                             BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, VEC: tl.constexpr, WAIT_ACK: tl.constexpr,
                             HAS_POLL: tl.constexpr):
        pid, num_programs = tl.program_id(0), tl.num_programs(0)
        if WAIT_ACK:  # the receivers have copied out this slot's previous exchange
            _wait_counters(table_ptr, me, world, ack_word, zero_word, _uses(epoch_ptr, epoch_word) * num_programs,
                           status_ptr, timeout_ns, max_spins, WP, HAS_POLL)
        hidden = hidden // VEC * VEC  # exact: VEC divides hidden and stride; tells the compiler rows are VEC-aligned
        stride = stride // VEC * VEC
        k = tl.arange(0, KP)
        k_ok = k < num_topk
        if error == 0:
            for tb in range(pid, tl.cdiv(num_tokens, BLOCK_T), num_programs):
                t, t_ok = block_range(tb * BLOCK_T, BLOCK_T, num_tokens)
                for h0 in range(0, hidden, BLOCK_H):
                    h, h_ok = block_range(h0, BLOCK_H, hidden)
                    row = tl.load(x_ptr + t[:, None] * hidden + h[None, :], mask=t_ok[:, None] & h_ok[None, :])
                    for r in range(world):
                        j = tl.load(pos_ptr + t * world + r, mask=t_ok, other=-1)
                        dest = _region(table_ptr, r, dx_off, x_ptr.dtype.element_ty)
                        cell = (me * max_tokens + j).to(tl.int64) * stride
                        tl.store(dest + cell[:, None] + h[None, :], row, mask=(j >= 0)[:, None] & h_ok[None, :])
                if ROUTES:
                    idx = tl.load(idx_ptr + t[:, None] * num_topk + k[None, :], mask=t_ok[:, None] & k_ok[None, :],
                                  other=-1)
                    w = tl.load(w_ptr + t[:, None] * num_topk + k[None, :], mask=t_ok[:, None] & k_ok[None, :],
                                other=0.0)
                    for r in range(world):
                        j = tl.load(pos_ptr + t * world + r, mask=t_ok, other=-1)
                        local = idx - r * num_local
                        mine = (idx >= 0) & (local >= 0) & (local < num_local)
                        sent = (j >= 0)[:, None] & k_ok[None, :]
                        cell = (me * max_tokens + j).to(tl.int64)
                        dest_idx = _region(table_ptr, r, didx_off, tl.int32)
                        dest_w = _region(table_ptr, r, dw_off, tl.float32)
                        tl.store(dest_idx + cell[:, None] * max_topk + k[None, :],
                                 tl.where(mine, local, -1).to(tl.int32), mask=sent)
                        tl.store(dest_w + cell[:, None] * max_topk + k[None, :], tl.where(mine, w, 0.0), mask=sent)
                        tl.store(_region(table_ptr, r, dsrc_off, tl.int32) + cell, t.to(tl.int32), mask=j >= 0)
        if pid == 0:
            _write_meta(table_ptr, me, world, meta_word, counts_ptr, error, num_experts, num_topk, WP, True)
        _signal_all(table_ptr, me, world, sig_word, WP)

    @triton.jit
    def _recv_fp8_rows(src, out_ptr, counts, nb, ends, pid, num_programs, hidden, stride, max_tokens, WP: tl.constexpr,
                       BLOCK_T: tl.constexpr, NG: tl.constexpr, OUT_KIND: tl.constexpr):
        """Dequantize the received packed rows of byte pointer ``src`` (row pitch ``stride`` bytes) into
        ``out_ptr`` [rows, hidden] as ``fp8.dequantize`` does, ``NG`` groups of 128 columns at a time."""
        c = tl.arange(0, 128)
        num_groups = tl.cdiv(hidden, 128)
        for item in range(pid, tl.sum(nb), num_programs):
            s, j = _received_block(item, nb, ends, BLOCK_T, WP)
            valid = j < tl.sum(tl.where(tl.arange(0, WP) == s, counts, 0))
            row = (s * max_tokens + j).to(tl.int64)
            base = src + row * stride  # [BLOCK_T] row starts
            for g0 in range(0, num_groups, NG):
                g = g0 + tl.arange(0, NG)
                col = g[:, None] * 128 + c[None, :]  # [NG, 128]
                m = valid[:, None, None] & (col < hidden)[None, :, :]
                code = tl.load(base[:, None, None] + col[None, :, :], mask=m, other=0, cache_modifier=".cg")
                # the scales: 4 little-endian bytes each, at byte hidden + 4 g (not always 4-byte aligned)
                sp = base[:, None] + hidden + 4 * g[None, :]
                sm = valid[:, None] & (g < num_groups)[None, :]
                bits = tl.load(sp, mask=sm, other=0, cache_modifier=".cg").to(tl.int32)
                for b in tl.static_range(1, 4):
                    bits |= tl.load(sp + b, mask=sm, other=0, cache_modifier=".cg").to(tl.int32) << (8 * b)
                scale = bits.to(tl.float32, bitcast=True)
                v = dequantize_value(code.to(tl.int32), scale[:, :, None], OUT_KIND)
                tl.store(out_ptr + row[:, None, None] * hidden + col[None, :, :], v, mask=m)

    @exchange_kernel
    def _recv_dispatch_kernel(table_ptr, status_ptr, epoch_ptr, out_x_ptr, out_idx_ptr, out_w_ptr, out_src_ptr,
                              count_ptr, me, world, hidden, stride, num_topk, max_tokens, max_topk, dx_off, didx_off, dw_off,
                              dsrc_off, sig_word, ack_word, meta_word, zero_word, epoch_word, timeout_ns, max_spins,
                              ROUTES: tl.constexpr, WP: tl.constexpr, KP: tl.constexpr, BLOCK_T: tl.constexpr,
                              BLOCK_H: tl.constexpr, VEC: tl.constexpr, WAIT: tl.constexpr, HAS_POLL: tl.constexpr,
                              FP8: tl.constexpr):
        pid, num_programs = tl.program_id(0), tl.num_programs(0)
        counts = _begin_recv(table_ptr, status_ptr, me, world, sig_word, zero_word,
                             (_uses(epoch_ptr, epoch_word) + 1) * num_programs, meta_word, count_ptr, timeout_ns,
                             max_spins, WP, WAIT, HAS_POLL)
        hidden = hidden // VEC * VEC  # exact: VEC divides hidden and stride; tells the compiler rows are VEC-aligned
        stride = stride // VEC * VEC
        src_x = _region(table_ptr, me, dx_off, out_x_ptr.dtype.element_ty)
        # the rows: only the blocks that hold received rows, spread evenly over the programs
        nb = tl.cdiv(counts, BLOCK_T)
        ends = tl.cumsum(nb, 0)
        if FP8 == 0:  # copy the rows as they are
            for item in range(pid, tl.sum(nb), num_programs):
                s, j = _received_block(item, nb, ends, BLOCK_T, WP)
                valid = j < tl.sum(tl.where(tl.arange(0, WP) == s, counts, 0))
                row = (s * max_tokens + j).to(tl.int64)
                for h0 in range(0, hidden, BLOCK_H):
                    h, h_ok = block_range(h0, BLOCK_H, hidden)
                    m = valid[:, None] & h_ok[None, :]
                    v = tl.load(src_x + row[:, None] * stride + h[None, :], mask=m, cache_modifier=".cg")
                    tl.store(out_x_ptr + row[:, None] * hidden + h[None, :], v, mask=m)
        else:  # packed FP8 rows (``hidden`` e4m3 bytes, then float32 scales, ``stride`` bytes apart): dequantize
            _recv_fp8_rows(src_x.to(tl.pointer_type(tl.uint8)), out_x_ptr, counts, nb, ends, pid, num_programs,
                           hidden, stride, max_tokens, WP, BLOCK_T, BLOCK_H // 128, FP8 - 1)
        if ROUTES:  # indices, weights and sources of every row: padding rows get -1, 0, -1
            k = tl.arange(0, KP)
            k_ok = k < num_topk
            blocks = tl.cdiv(max_tokens, BLOCK_T)
            for item in range(pid, world * blocks, num_programs):
                s = item // blocks
                j = (item % blocks) * BLOCK_T + tl.arange(0, BLOCK_T)
                j_ok = j < max_tokens
                valid = j < tl.sum(tl.where(tl.arange(0, WP) == s, counts, 0))
                row = (s * max_tokens + j).to(tl.int64)
                m = valid[:, None] & k_ok[None, :]
                idx = tl.load(_region(table_ptr, me, didx_off, tl.int32) + row[:, None] * max_topk + k[None, :],
                              mask=m, other=-1, cache_modifier=".cg")
                w = tl.load(_region(table_ptr, me, dw_off, tl.float32) + row[:, None] * max_topk + k[None, :],
                            mask=m, other=0.0, cache_modifier=".cg")
                out = j_ok[:, None] & k_ok[None, :]
                tl.store(out_idx_ptr + row[:, None] * num_topk + k[None, :], idx.to(tl.int64), mask=out)
                tl.store(out_w_ptr + row[:, None] * num_topk + k[None, :], w, mask=out)
                src = tl.load(_region(table_ptr, me, dsrc_off, tl.int32) + row, mask=valid, other=-1,
                              cache_modifier=".cg")
                tl.store(out_src_ptr + row, src.to(tl.int64), mask=j_ok)
        _signal_all(table_ptr, me, world, ack_word, WP)


def launch_put_dispatch(ch: Channel, x: torch.Tensor, pos: torch.Tensor, counts: torch.Tensor,
                        routes: Optional[Tuple[torch.Tensor, torch.Tensor]], num_experts: int, num_topk: int,
                        error: int = 0) -> None:
    """Put ``x`` [num_tokens, hidden] rows (or narrower rows of raw bytes, see ``row_geometry``) where ``pos`` [num_tokens, world] (compact row per rank, -1: not
    sent) says, with the routes ``(topk_idx [num_tokens, num_topk] int64, topk_weights float32)`` if given.
    ``counts`` [world] int64: rows per rank. With ``error`` only the error code travels."""
    lay = ch.layout
    dx, didx, dw, dsrc, _, _ = lay.slot_offsets(ch.slot)
    idx, w = routes if routes is not None else (pos, x)
    width, stride, rows = row_geometry(lay, x)
    _put_dispatch_kernel[(ch.num_programs,)](
        ch.table, ch.status, ch.epochs, x, pos, counts, idx, w, ch.me, lay.world, x.shape[0], width, stride, num_topk,
        max(1, num_experts // lay.world), lay.max_tokens, lay.max_topk, num_experts, error, dx, didx, dw, dsrc,
        ROUTES=routes is not None, WAIT_ACK=ch.fused_wait, num_warps=NUM_WARPS_PUT, **_common(ch, DISPATCH),
        **{**_consts(ch, num_topk), **rows})


def launch_recv_dispatch(ch: Channel, out_x: torch.Tensor, routes_out: Optional[Tuple[torch.Tensor, ...]],
                         count_out: torch.Tensor, num_topk: int, *, packed_fp8: bool = False) -> None:
    """Copy the rows received in this slot into ``out_x`` [world * max_tokens, hidden] (or the narrower rows
    of raw bytes that the put sent, see ``row_geometry``; rows past a sender's count are not written) and,
    with ``routes_out = (idx [rows, num_topk] int64, weights float32, src [rows] int64)``, the routes of
    every row (padding: -1, 0, -1); ``count_out`` [world] int64 gets the rows each rank sent. Then one
    more completed use of the slot.

    ``packed_fp8``: the slot holds packed FP8 rows (``hidden`` e4m3 bytes, ``4 * ceil(hidden / 128)``
    bytes of float32 scales, zero padding) and ``out_x`` [world * max_tokens, hidden] float32, bfloat16
    or float16 gets them dequantized, bit for bit as ``fp8.dequantize`` does."""
    lay = ch.layout
    dx, didx, dw, dsrc, _, _ = lay.slot_offsets(ch.slot)
    idx, w, src = routes_out if routes_out is not None else (count_out, out_x, count_out)
    if packed_fp8:
        width, stride, rows = fp8_row_geometry(lay, out_x)
        target = out_x.view(torch.int16) if out_x.dtype == torch.bfloat16 else out_x  # bf16 stored as its bits
    else:
        width, stride, rows = row_geometry(lay, out_x)
        rows["FP8"], target = 0, out_x
    _recv_dispatch_kernel[(ch.num_programs,)](
        ch.table, ch.status, ch.epochs, target, idx, w, src, count_out, ch.me, lay.world, width, stride, num_topk,
        lay.max_tokens, lay.max_topk, dx, didx, dw, dsrc, ROUTES=routes_out is not None, WAIT=ch.fused_wait,
        num_warps=NUM_WARPS_RECV, **_common(ch, DISPATCH), **{**_consts(ch, num_topk), **rows})
    advance_epoch(ch, DISPATCH)


def fp8_row_geometry(lay: "ExchangeLayout", out_x: torch.Tensor) -> Tuple[int, int, dict]:
    """How the receive kernel walks packed FP8 slot rows into ``out_x`` [n, hidden]: ``(hidden, slot row
    pitch in bytes, consts)``. ``VEC`` (at most 16 bytes: one 128-bit load of codes) divides both, so the
    code loads vectorise; ``BLOCK_H`` is a whole number of 128-column groups."""
    if out_x.dim() != 2 or out_x.shape[1] != lay.hidden or out_x.dtype not in _FP8_OUT:
        raise ValueError(f"FP8 rows dequantize into [n, {lay.hidden}] float32/bfloat16/float16, got "
                         f"{out_x.dtype} {tuple(out_x.shape)}")
    pitch = lay.hidden * lay.elem_size
    groups = -(-lay.hidden // 128)
    if lay.hidden + 4 * groups > pitch:
        raise ValueError(f"FP8 rows of {lay.hidden + 4 * groups} bytes do not fit a slot row of {pitch} bytes")
    group_block = min(_BLOCK_H // 128, 1 << (groups - 1).bit_length())
    return lay.hidden, pitch, dict(BLOCK_H=128 * group_block, VEC=row_vec(math.gcd(lay.hidden, pitch), 1),
                                   FP8=1 + _FP8_OUT[out_x.dtype])


# torch reference


def dispatch_exchange_reference(xs: Sequence[torch.Tensor], topk_idxs: Sequence[torch.Tensor],
                                topk_weights: Sequence[torch.Tensor], num_experts: int, max_tokens: int
                                ) -> List[Tuple[torch.Tensor, ...]]:
    """What every rank receives from a dispatch-shaped exchange, given every rank's inputs.

    Returns per rank ``(recv_x [world * max_tokens, hidden], recv_idx [rows, num_topk] int64,
    recv_weights float32, recv_src [rows] int64, recv_count [world] int64)``.
    """
    world = len(xs)
    local = num_experts // world
    hidden, num_topk = xs[0].shape[1], topk_idxs[0].shape[1]
    out = []
    for r in range(world):
        recv_x = xs[0].new_zeros(world * max_tokens, hidden)
        recv_idx = torch.full((world * max_tokens, num_topk), -1, dtype=torch.int64)
        recv_w = torch.zeros(world * max_tokens, num_topk)
        recv_src = torch.full((world * max_tokens,), -1, dtype=torch.int64)
        count = torch.zeros(world, dtype=torch.int64)
        for s in range(world):
            idx = topk_idxs[s]
            local_idx = idx - r * local
            mine = (idx >= 0) & (local_idx >= 0) & (local_idx < local)
            tokens = mine.any(1).nonzero().flatten()
            rows = s * max_tokens + torch.arange(tokens.numel())
            recv_x[rows] = xs[s][tokens]
            recv_idx[rows] = torch.where(mine, local_idx, -1)[tokens]
            recv_w[rows] = torch.where(mine, topk_weights[s], 0.0)[tokens]
            recv_src[rows] = tokens
            count[s] = tokens.numel()
        out.append((recv_x, recv_idx, recv_w, recv_src, count))
    return out


