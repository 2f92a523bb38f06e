"""Shared pieces of the device-side exchanges (``ep_dispatch``, ``ep_combine``): the layout of a
rank's symmetric buffer, the channel of one exchange, signalling and bounded waits.

See ``ep_exchange`` for how an exchange runs.
"""
from __future__ import annotations

from typing import NamedTuple, Tuple

import torch

from ._common import next_pow2

from ._triton import tl, triton  # None without Triton: the references run without it

__all__ = ["ExchangeLayout", "Channel", "DISPATCH", "COMBINE", "DATA", "ACK", "META_FIELDS", "HAS_POLL", "launch_wait",
           "compact_positions"]

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
    def _begin_recv(table_ptr, status_ptr, me, world, sig_word, zero_word, data_target, meta_word, num_experts,
                    num_topk, count_out_ptr, timeout_ns, max_spins, WP: tl.constexpr, WAIT: tl.constexpr,
                    HAS_POLL: tl.constexpr):
        """Start of every receive kernel: wait for the senders' data (unless a wait launch did),
        then program 0 reads the metadata."""
        if WAIT:
            _wait_counters(table_ptr, me, world, sig_word, zero_word, data_target, status_ptr, timeout_ns, max_spins,
                           WP, HAS_POLL)
        if tl.program_id(0) == 0:
            _read_meta(table_ptr, me, world, meta_word, status_ptr, num_experts, num_topk, count_out_ptr, WP)

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



def compact_positions(topk_idx: torch.Tensor, num_experts: int, world: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(pos [num_tokens, world] int64: rank of token t among the tokens sent to rank r, or -1;
    counts [world] int64: tokens sent to each rank), experts split evenly and contiguously."""
    local = num_experts // world
    owner = torch.where(topk_idx >= 0, topk_idx // local, -1)
    sent = (owner.unsqueeze(-1) == torch.arange(world, device=topk_idx.device)).any(1)
    counts = sent.sum(0, dtype=torch.int64)
    pos = torch.where(sent, torch.cumsum(sent.to(torch.int64), 0) - 1, -1)
    return pos, counts


