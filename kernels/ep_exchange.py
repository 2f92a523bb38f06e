"""Device-side expert-parallel exchanges: kernels that write rows into the peers' buffers.

Every rank of an expert-parallel group owns one symmetric buffer (the same layout on every
rank, see ``ExchangeLayout``); a kernel reaches a peer's buffer through ``table``, an int64
tensor of every rank's base address. Two exchange shapes, each with ``num_slots`` slots so
that several exchanges can be in flight:

- **dispatch-shaped** (token owner -> expert ranks): source ``s`` writes token ``t``'s row
  into rank ``r``'s ``dispatch`` region at ``[slot, s, j]``, ``j`` = the rank of ``t``
  among the tokens ``s`` sends to ``r`` (each token once per rank). With routes, the local
  expert indices and weights of the token on ``r`` and ``t`` itself travel beside the row.
  The receiver copies the slot out into capacity-sized outputs (``world * max_tokens``
  rows, segment ``s`` holding what ``s`` sent; rows past a segment's count are padding:
  zero rows, index -1, weight 0).
- **combine-shaped** (expert ranks -> token owner): expert rank ``r`` writes the row of
  received row ``(s, j)`` into ``s``'s ``combine`` region at ``[slot, r, t]``; the owner
  sums, for every token, the rows of the ranks it went to (fp32, rank order), and with
  weight gradients picks each slot's value from the rank holding its expert.

Loads of what peers wrote bypass L1 (``.cg``), which is not coherent with their writes.

Signals instead of collectives: after its puts every program of a sender adds 1 to the
receiver's data counter for ``(shape, slot, sender)`` (release); the receiver waits until
the counter equals ``epoch * num_programs`` (acquire), copies the slot out, and adds 1 to
every sender's ack counter, which the sender waits on before it reuses the slot. Counters
only grow, so a stale signal is never taken for a new one. A row count and an error code
travel in the metadata words before the signal. Every wait is bounded by ``timeout_ns``;
a wait that expires writes which peers are missing into the host-visible ``status`` words.

Under ``TRITON_INTERPRET=1`` the programs of one launch run one after another, so puts
and waits on the receiving side are separate launches; no program waits for a later
program of its own launch. ``*_reference`` functions at the end define what a whole
group's exchange computes, in plain PyTorch.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch

from ._common import cdiv, next_pow2

try:
    import triton
    import triton.language as tl
except ImportError:  # the references work without Triton
    triton = None

__all__ = ["ExchangeLayout", "DISPATCH", "COMBINE", "META_FIELDS", "launch_put_dispatch", "launch_recv_dispatch",
           "launch_put_combine", "launch_recv_combine", "launch_wait", "dispatch_exchange_reference",
           "combine_exchange_reference"]

DISPATCH, COMBINE = 0, 1  # exchange shapes (signal rings)
DATA, ACK = 0, 1  # counter kinds
META_FIELDS = ("num_rows", "error", "num_experts", "num_topk")
# Status words (host-visible): [0, world) missing peers of the last expired wait,
# [world, 2 world) error codes peers sent, 2 world: number of expired waits.
_ALIGN = 128


def _align(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class ExchangeLayout(NamedTuple):
    """Byte offsets of the regions of one rank's symmetric buffer (the same on every rank)."""

    world: int
    max_tokens: int
    hidden: int
    max_topk: int
    num_slots: int
    elem_size: int
    sig: int  # int64 [2 shapes, slots, 2 kinds, world] counters, then one zero word
    meta: int  # int64 [2 shapes, slots, world, len(META_FIELDS)]
    dx: int  # rows [slots, world, max_tokens, hidden]
    didx: int  # int32 [slots, world, max_tokens, max_topk]
    dw: int  # float32 [slots, world, max_tokens, max_topk]
    dsrc: int  # int32 [slots, world, max_tokens]
    cx: int  # rows [slots, world, max_tokens, hidden]
    cw: int  # float32 [slots, world, max_tokens, max_topk]
    nbytes: int

    @staticmethod
    def build(world: int, max_tokens: int, hidden: int, max_topk: int, num_slots: int, elem_size: int
              ) -> "ExchangeLayout":
        rows = world * max_tokens
        sizes = [("sig", 8 * (2 * num_slots * 2 * world + 1)), ("meta", 8 * 2 * num_slots * world * len(META_FIELDS)),
                 ("dx", num_slots * rows * hidden * elem_size), ("didx", num_slots * rows * max_topk * 4),
                 ("dw", num_slots * rows * max_topk * 4), ("dsrc", num_slots * rows * 4),
                 ("cx", num_slots * rows * hidden * elem_size), ("cw", num_slots * rows * max_topk * 4)]
        offsets, at = {}, 0
        for name, size in sizes:
            offsets[name] = at
            at += _align(size)
        return ExchangeLayout(world, max_tokens, hidden, max_topk, num_slots, elem_size, nbytes=at, **offsets)

    def sig_word(self, shape: int, slot: int, kind: int) -> int:
        """Word index (int64 units from the buffer start) of the counter of peer 0."""
        return self.sig // 8 + ((shape * self.num_slots + slot) * 2 + kind) * self.world

    def zero_word(self) -> int:
        return self.sig // 8 + 2 * self.num_slots * 2 * self.world

    def meta_word(self, shape: int, slot: int) -> int:
        return self.meta // 8 + (shape * self.num_slots + slot) * self.world * len(META_FIELDS)

    def slot_offsets(self, slot: int) -> Tuple[int, int, int, int, int, int]:
        """Byte offsets of (dx, didx, dw, dsrc, cx, cw) of ``slot``."""
        rows = self.world * self.max_tokens
        return (self.dx + slot * rows * self.hidden * self.elem_size, self.didx + slot * rows * self.max_topk * 4,
                self.dw + slot * rows * self.max_topk * 4, self.dsrc + slot * rows * 4,
                self.cx + slot * rows * self.hidden * self.elem_size, self.cw + slot * rows * self.max_topk * 4)


HAS_POLL = triton is not None and hasattr(tl, "atomic_poll")
# Rows per block and row elements per step of the row-moving loops (2 KiB of bf16 per
# step, as in permute/combine; not yet tuned on a GPU).
_BLOCK_T, _BLOCK_H = 16, 512
_NUM_META = len(META_FIELDS)

if triton is not None:
    from .combine import _round_to

    @triton.jit
    def _words(table_ptr, rank, word):
        """int64 pointer to word ``word`` of ``rank``'s buffer (word: int64 units)."""
        return (tl.load(table_ptr + rank) + word.to(tl.int64) * 8).to(tl.pointer_type(tl.int64))

    @triton.jit
    def _region(table_ptr, rank, offset, ELEM: tl.constexpr):
        return (tl.load(table_ptr + rank) + offset).to(tl.pointer_type(ELEM))

    @triton.jit
    def _wait_counters(table_ptr, me, world, word, zero_word, target, status_ptr, timeout_ns, max_spins,
                       WP: tl.constexpr, HAS_POLL: tl.constexpr):
        """Wait until counters ``word + p`` (p < world) of my buffer equal ``target``; record the missing."""
        p = tl.arange(0, WP)
        live = p < world
        base = tl.load(table_ptr + me)
        addr = tl.where(live, base + (word + p).to(tl.int64) * 8, base + zero_word.to(tl.int64) * 8)
        ptrs = addr.to(tl.pointer_type(tl.int64))
        expected = tl.where(live, target, 0).to(tl.int64)
        if HAS_POLL:
            ok = tl.atomic_poll(ptrs, expected, sem="acquire", scope="sys", timeout_ns=timeout_ns)
        else:
            v = tl.atomic_add(ptrs, 0, sem="acquire", scope="sys")
            spins = 0
            while (tl.sum((v != expected).to(tl.int32)) > 0) & (spins < max_spins):
                v = tl.atomic_add(ptrs, 0, sem="acquire", scope="sys")
                spins += 1
            ok = v == expected
        missing = live & (ok == 0)
        status = tl.load(status_ptr).to(tl.pointer_type(tl.int64))
        tl.store(status + p, 1, mask=missing)
        if tl.sum(missing.to(tl.int32)) > 0:  # a plain store: host memory may not take device atomics
            tl.store(status + 2 * world, 1)

    @triton.jit
    def _signal_all(table_ptr, me, world, word, WP: tl.constexpr):
        """Add 1 to counter ``word + me`` in every rank's buffer, after this program's stores."""
        p = tl.arange(0, WP)
        live = p < world
        bases = tl.load(table_ptr + p, mask=live, other=0)
        ptrs = (bases + (word + me).to(tl.int64) * 8).to(tl.pointer_type(tl.int64))
        tl.debug_barrier()
        tl.atomic_add(ptrs, tl.full([WP], 1, tl.int64), mask=live, sem="release", scope="sys")

    @triton.jit
    def _write_meta(table_ptr, me, world, meta_word, counts_ptr, error, num_experts, num_topk, WP: tl.constexpr,
                    COUNTS: tl.constexpr):
        """Program 0: tell every peer its row count, this rank's error code and its metadata
        (the ``len(META_FIELDS)`` = 4 words of cell ``[shape, slot, me]`` in every peer's buffer)."""
        p = tl.arange(0, WP)
        live = p < world
        bases = tl.load(table_ptr + p, mask=live, other=0)
        cell = (bases + (meta_word + me * 4).to(tl.int64) * 8).to(tl.pointer_type(tl.int64))
        counts = tl.zeros([WP], dtype=tl.int64)
        if COUNTS:
            counts = tl.where(error == 0, tl.load(counts_ptr + p, mask=live, other=0), 0)
        tl.store(cell, counts, mask=live)
        tl.store(cell + 1, tl.full([WP], 0, tl.int64) + error, mask=live)
        tl.store(cell + 2, tl.full([WP], 0, tl.int64) + num_experts, mask=live)
        tl.store(cell + 3, tl.full([WP], 0, tl.int64) + num_topk, mask=live)

    @triton.jit
    def _read_meta(table_ptr, me, world, meta_word, status_ptr, num_experts, num_topk, count_out_ptr,
                   WP: tl.constexpr):
        """Program 0 of a receiver: row counts into ``count_out``; error codes into the status."""
        p = tl.arange(0, WP)
        live = p < world
        cell = _words(table_ptr, me, meta_word) + p * 4
        counts = tl.load(cell, mask=live, other=0, cache_modifier=".cg")
        error = tl.load(cell + 1, mask=live, other=0, cache_modifier=".cg")
        differ = ((tl.load(cell + 2, mask=live, other=0, cache_modifier=".cg") != num_experts)
                  | (tl.load(cell + 3, mask=live, other=0, cache_modifier=".cg") != num_topk))
        error = tl.where((error == 0) & differ & live & (num_experts >= 0), 99, error)  # -1: this rank's input was bad
        tl.store(count_out_ptr + p, counts, mask=live)
        status = tl.load(status_ptr).to(tl.pointer_type(tl.int64))
        tl.store(status + world + p, error, mask=live & (error != 0))

    @triton.jit
    def _put_dispatch_kernel(table_ptr, status_ptr, x_ptr, pos_ptr, counts_ptr, idx_ptr, w_ptr, me, world,
                             num_tokens, hidden, num_topk, num_local, max_tokens, max_topk, num_experts, error,
                             dx_off, didx_off, dw_off, dsrc_off, sig_word, ack_word, meta_word, zero_word, ack_target,
                             timeout_ns, max_spins, ROUTES: tl.constexpr, WP: tl.constexpr, KP: tl.constexpr,
                             BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, WAIT_ACK: tl.constexpr,
                             HAS_POLL: tl.constexpr):
        pid, num_programs = tl.program_id(0), tl.num_programs(0)
        if WAIT_ACK:  # the receivers have copied out this slot's previous exchange
            _wait_counters(table_ptr, me, world, ack_word, zero_word, ack_target, status_ptr, timeout_ns, max_spins,
                           WP, HAS_POLL)
        k = tl.arange(0, KP)
        k_ok = k < num_topk
        if error == 0:
            for tb in range(pid, tl.cdiv(num_tokens, BLOCK_T), num_programs):
                t = (tb * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
                t_ok = t < num_tokens
                for h0 in range(0, hidden, BLOCK_H):
                    h = h0 + tl.arange(0, BLOCK_H)
                    h_ok = h < hidden
                    row = tl.load(x_ptr + t[:, None] * hidden + h[None, :], mask=t_ok[:, None] & h_ok[None, :])
                    for r in range(world):
                        j = tl.load(pos_ptr + t * world + r, mask=t_ok, other=-1)
                        dest = _region(table_ptr, r, dx_off, x_ptr.dtype.element_ty)
                        cell = ((me * max_tokens + j) * hidden).to(tl.int64)
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
    def _recv_dispatch_kernel(table_ptr, status_ptr, out_x_ptr, out_idx_ptr, out_w_ptr, out_src_ptr, count_ptr, me,
                              world, hidden, num_topk, max_tokens, max_topk, num_experts, dx_off, didx_off, dw_off,
                              dsrc_off, sig_word, ack_word, meta_word, zero_word, data_target, timeout_ns, max_spins,
                              ROUTES: tl.constexpr, WP: tl.constexpr, KP: tl.constexpr, BLOCK_T: tl.constexpr,
                              BLOCK_H: tl.constexpr, WAIT: tl.constexpr, HAS_POLL: tl.constexpr):
        pid, num_programs = tl.program_id(0), tl.num_programs(0)
        if WAIT:
            _wait_counters(table_ptr, me, world, sig_word, zero_word, data_target, status_ptr, timeout_ns, max_spins,
                           WP, HAS_POLL)
        if pid == 0:
            _read_meta(table_ptr, me, world, meta_word, status_ptr, num_experts, num_topk, count_ptr, WP)
        meta = _words(table_ptr, me, meta_word)
        src_x = _region(table_ptr, me, dx_off, out_x_ptr.dtype.element_ty)
        k = tl.arange(0, KP)
        k_ok = k < num_topk
        blocks = tl.cdiv(max_tokens, BLOCK_T)
        for item in range(pid, world * blocks, num_programs):
            s = item // blocks
            j = (item % blocks) * BLOCK_T + tl.arange(0, BLOCK_T)
            j_ok = j < max_tokens
            valid = j < tl.load(meta + s * 4, cache_modifier=".cg")
            row = (s * max_tokens + j).to(tl.int64)
            for h0 in range(0, hidden, BLOCK_H):
                h = h0 + tl.arange(0, BLOCK_H)
                h_ok = h < hidden
                v = tl.load(src_x + row[:, None] * hidden + h[None, :], mask=valid[:, None] & h_ok[None, :], other=0.0,
                            cache_modifier=".cg")
                tl.store(out_x_ptr + row[:, None] * hidden + h[None, :], v, mask=j_ok[:, None] & h_ok[None, :])
            if ROUTES:
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

    @triton.jit
    def _put_combine_kernel(table_ptr, status_ptr, y_ptr, src_ptr, gw_ptr, me, world, hidden, num_topk, max_tokens,
                            max_topk, num_experts, error, cx_off, cw_off, sig_word, ack_word, meta_word, zero_word,
                            ack_target, timeout_ns, max_spins, WEIGHTS: tl.constexpr, WP: tl.constexpr,
                            KP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, WAIT_ACK: tl.constexpr,
                            HAS_POLL: tl.constexpr):
        pid, num_programs = tl.program_id(0), tl.num_programs(0)
        if WAIT_ACK:
            _wait_counters(table_ptr, me, world, ack_word, zero_word, ack_target, status_ptr, timeout_ns, max_spins,
                           WP, HAS_POLL)
        k = tl.arange(0, KP)
        k_ok = k < num_topk
        blocks = tl.cdiv(max_tokens, BLOCK_T)
        if error == 0:
            for item in range(pid, world * blocks, num_programs):
                s = item // blocks
                j = (item % blocks) * BLOCK_T + tl.arange(0, BLOCK_T)
                row = (s * max_tokens + j).to(tl.int64)
                t = tl.load(src_ptr + row, mask=j < max_tokens, other=-1)
                valid = t >= 0
                cell = (me * max_tokens + t).to(tl.int64)
                dest = _region(table_ptr, s, cx_off, y_ptr.dtype.element_ty)
                for h0 in range(0, hidden, BLOCK_H):
                    h = h0 + tl.arange(0, BLOCK_H)
                    h_ok = h < hidden
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

    @triton.jit
    def _recv_combine_kernel(table_ptr, status_ptr, out_ptr, pos_ptr, idx_ptr, gw_out_ptr, count_ptr, me, world,
                             num_tokens, hidden, num_topk, num_local, max_tokens, max_topk, num_experts, cx_off, cw_off,
                             sig_word, ack_word, meta_word, zero_word, data_target, timeout_ns, max_spins,
                             WEIGHTS: tl.constexpr, WP: tl.constexpr, KP: tl.constexpr, BLOCK_T: tl.constexpr,
                             BLOCK_H: tl.constexpr, ACC: tl.constexpr, WAIT: tl.constexpr, HAS_POLL: tl.constexpr):
        pid, num_programs = tl.program_id(0), tl.num_programs(0)
        if WAIT:
            _wait_counters(table_ptr, me, world, sig_word, zero_word, data_target, status_ptr, timeout_ns, max_spins,
                           WP, HAS_POLL)
        if pid == 0:
            _read_meta(table_ptr, me, world, meta_word, status_ptr, num_experts, num_topk, count_ptr, WP)
        rows = _region(table_ptr, me, cx_off, out_ptr.dtype.element_ty)
        k = tl.arange(0, KP)
        k_ok = k < num_topk
        for tb in range(pid, tl.cdiv(num_tokens, BLOCK_T), num_programs):
            t = (tb * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
            t_ok = t < num_tokens
            for h0 in range(0, hidden, BLOCK_H):
                h = h0 + tl.arange(0, BLOCK_H)
                h_ok = h < hidden
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

    @triton.jit
    def _wait_kernel(table_ptr, status_ptr, me, world, word, zero_word, target, timeout_ns, max_spins,
                     WP: tl.constexpr, HAS_POLL: tl.constexpr):
        _wait_counters(table_ptr, me, world, word, zero_word, target, status_ptr, timeout_ns, max_spins, WP, HAS_POLL)


class Channel(NamedTuple):
    """Where one exchange runs: the group's buffers and this exchange's slot and epoch."""

    table: torch.Tensor  # [world] int64: base address of every rank's buffer, on the kernels' device
    status: torch.Tensor  # [1] int64: address of the host-visible status words, on the kernels' device
    layout: ExchangeLayout
    me: int  # this rank
    slot: int
    epoch: int  # uses of (shape, slot) so far, this one included (1 for the first)
    num_programs: int  # programs of every put and receive kernel, the same on every rank
    timeout_ns: int
    max_spins: int  # bound of the spin loop where Triton has no atomic_poll
    fused_wait: bool  # True: kernels wait inside (GPU); False: separate wait launches (interpreter)
    has_poll: bool = HAS_POLL


def _common(ch: Channel, shape: int) -> dict:
    lay = ch.layout
    return dict(sig_word=lay.sig_word(shape, ch.slot, DATA), ack_word=lay.sig_word(shape, ch.slot, ACK),
                meta_word=lay.meta_word(shape, ch.slot), zero_word=lay.zero_word(), timeout_ns=ch.timeout_ns,
                max_spins=ch.max_spins)


def _consts(ch: Channel, num_topk: int) -> dict:
    return dict(WP=next_pow2(ch.layout.world), KP=next_pow2(max(1, num_topk)), BLOCK_T=_BLOCK_T,
                BLOCK_H=min(_BLOCK_H, next_pow2(ch.layout.hidden)), HAS_POLL=ch.has_poll)


def launch_wait(ch: Channel, shape: int, kind: int) -> None:
    """Wait (one program) until every peer's ``kind`` counter of this slot reaches its target."""
    target = ch.epoch * ch.num_programs if kind == DATA else (ch.epoch - 1) * ch.num_programs
    c = _common(ch, shape)
    _wait_kernel[(1,)](ch.table, ch.status, ch.me, ch.layout.world, ch.layout.sig_word(shape, ch.slot, kind),
                       c["zero_word"], target, c["timeout_ns"], c["max_spins"], WP=next_pow2(ch.layout.world),
                       HAS_POLL=ch.has_poll)


def launch_put_dispatch(ch: Channel, x: torch.Tensor, pos: torch.Tensor, counts: torch.Tensor,
                        routes: Optional[Tuple[torch.Tensor, torch.Tensor]], num_experts: int, num_topk: int,
                        error: int = 0) -> None:
    """Put ``x`` [num_tokens, hidden] rows where ``pos`` [num_tokens, world] (compact row per rank, -1: not
    sent) says, with the routes ``(topk_idx [num_tokens, num_topk] int64, topk_weights float32)`` if given.
    ``counts`` [world] int64: rows per rank. With ``error`` only the error code travels."""
    lay = ch.layout
    dx, didx, dw, dsrc, _, _ = lay.slot_offsets(ch.slot)
    idx, w = routes if routes is not None else (pos, x)
    wait_ack = ch.fused_wait and ch.epoch > 1
    if not ch.fused_wait and ch.epoch > 1:
        launch_wait(ch, DISPATCH, ACK)
    _put_dispatch_kernel[(ch.num_programs,)](
        ch.table, ch.status, x, pos, counts, idx, w, ch.me, lay.world, x.shape[0], lay.hidden, num_topk,
        max(1, num_experts // lay.world), lay.max_tokens, lay.max_topk, num_experts, error, dx, didx, dw, dsrc,
        ack_target=(ch.epoch - 1) * ch.num_programs, ROUTES=routes is not None, WAIT_ACK=wait_ack,
        **_common(ch, DISPATCH), **_consts(ch, num_topk))


def launch_recv_dispatch(ch: Channel, out_x: torch.Tensor, routes_out: Optional[Tuple[torch.Tensor, ...]],
                         count_out: torch.Tensor, num_experts: int, num_topk: int) -> None:
    """Copy this slot's dispatch-shaped rows out into ``out_x`` [world * max_tokens, hidden] (and, with
    ``routes_out = (idx [rows, num_topk] int64, weights float32, src [rows] int64)``, the routes);
    ``count_out`` [world] int64 gets the rows each rank sent."""
    lay = ch.layout
    dx, didx, dw, dsrc, _, _ = lay.slot_offsets(ch.slot)
    if not ch.fused_wait:
        launch_wait(ch, DISPATCH, DATA)
    idx, w, src = routes_out if routes_out is not None else (count_out, out_x, count_out)
    _recv_dispatch_kernel[(ch.num_programs,)](
        ch.table, ch.status, out_x, idx, w, src, count_out, ch.me, lay.world, lay.hidden, num_topk, lay.max_tokens,
        lay.max_topk, num_experts, dx, didx, dw, dsrc, data_target=ch.epoch * ch.num_programs,
        ROUTES=routes_out is not None, WAIT=ch.fused_wait, **_common(ch, DISPATCH), **_consts(ch, num_topk))


def launch_put_combine(ch: Channel, y: torch.Tensor, src: torch.Tensor, grad_w: Optional[torch.Tensor],
                       num_experts: int, num_topk: int, error: int = 0) -> None:
    """Put ``y`` [world * max_tokens, hidden] rows back to their tokens' owners (``src`` [rows] int64: the
    token of each row, -1 for padding), with ``grad_w`` [rows, num_topk] float32 if given."""
    lay = ch.layout
    _, _, _, _, cx, cw = lay.slot_offsets(ch.slot)
    if not ch.fused_wait and ch.epoch > 1:
        launch_wait(ch, COMBINE, ACK)
    _put_combine_kernel[(ch.num_programs,)](
        ch.table, ch.status, y, src, grad_w if grad_w is not None else y, ch.me, lay.world, lay.hidden, num_topk,
        lay.max_tokens, lay.max_topk, num_experts, error, cx, cw, ack_target=(ch.epoch - 1) * ch.num_programs,
        WEIGHTS=grad_w is not None, WAIT_ACK=ch.fused_wait and ch.epoch > 1, **_common(ch, COMBINE),
        **_consts(ch, num_topk))


def launch_recv_combine(ch: Channel, out: torch.Tensor, pos: torch.Tensor,
                        weights: Optional[Tuple[torch.Tensor, torch.Tensor]], count_out: torch.Tensor,
                        num_experts: int, num_topk: int) -> None:
    """Sum this slot's combine-shaped rows into ``out`` [num_tokens, hidden]: token t gets the rows of the
    ranks r with ``pos[t, r] >= 0``. With ``weights = (topk_idx [num_tokens, num_topk] int64, grad_w_out
    float32)``, slot k of token t gets the value sent by the rank holding expert ``topk_idx[t, k]``."""
    lay = ch.layout
    _, _, _, _, cx, cw = lay.slot_offsets(ch.slot)
    if not ch.fused_wait:
        launch_wait(ch, COMBINE, DATA)
    idx, gw = weights if weights is not None else (pos, out)
    acc = tl.float64 if out.dtype == torch.float64 else tl.float32
    _recv_combine_kernel[(ch.num_programs,)](
        ch.table, ch.status, out, pos, idx, gw, count_out, ch.me, lay.world, out.shape[0], lay.hidden, num_topk,
        max(1, num_experts // lay.world), lay.max_tokens, lay.max_topk, num_experts, cx, cw,
        data_target=ch.epoch * ch.num_programs, WEIGHTS=weights is not None, ACC=acc, WAIT=ch.fused_wait,
        **_common(ch, COMBINE), **_consts(ch, num_topk))


# torch reference


def compact_positions(topk_idx: torch.Tensor, num_experts: int, world: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(pos [num_tokens, world] int64: rank of token t among the tokens sent to rank r, or -1;
    counts [world] int64: tokens sent to each rank), experts split evenly and contiguously."""
    local = num_experts // world
    owner = torch.where(topk_idx >= 0, topk_idx // local, -1)
    sent = (owner.unsqueeze(-1) == torch.arange(world, device=topk_idx.device)).any(1)
    counts = sent.sum(0, dtype=torch.int64)
    pos = torch.where(sent, torch.cumsum(sent.to(torch.int64), 0) - 1, -1)
    return pos, counts


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
