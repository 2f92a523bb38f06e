"""Shared pieces of the device-side exchanges (``ep_dispatch``, ``ep_combine``): the layout of a
rank's symmetric buffer, the channel of one exchange, signalling and bounded waits.

See ``ep_exchange`` for how an exchange runs.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Tuple

import torch

from ._common import next_pow2

from ._triton import tl, triton  # None without Triton: the references run without it

__all__ = ["ExchangeLayout", "Channel", "DISPATCH", "COMBINE", "DATA", "ACK", "META_FIELDS", "HAS_POLL", "launch_wait",
           "advance_epoch", "compact_positions", "row_vec", "row_geometry", "DO_NOT_SPECIALIZE"]

DISPATCH, COMBINE = 0, 1  # exchange shapes (signal rings)
DATA, ACK = 0, 1  # counter kinds
META_FIELDS = ("num_rows", "error", "num_experts", "num_topk")
# Status words (host-visible): [0, world) missing peers of the last expired wait,
# [world, 2 world) error codes peers sent, 2 world: number of expired waits.
_ALIGN = 128


def _align(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class ExchangeLayout(NamedTuple):
    """Byte offsets of the regions of one rank's symmetric buffer (the same on every rank). Every
    slot of every region starts at a multiple of 128 bytes, which the kernels rely on."""

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
        strides = _slot_strides(world * max_tokens, hidden, max_topk, elem_size)
        sizes = [("sig", 8 * (2 * num_slots * 2 * world + 1)), ("meta", 8 * 2 * num_slots * world * len(META_FIELDS))]
        sizes += [(name, num_slots * stride) for name, stride in zip(("dx", "didx", "dw", "dsrc", "cx", "cw"), strides)]
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
        strides = _slot_strides(self.world * self.max_tokens, self.hidden, self.max_topk, self.elem_size)
        bases = (self.dx, self.didx, self.dw, self.dsrc, self.cx, self.cw)
        return tuple(base + slot * stride for base, stride in zip(bases, strides))  # type: ignore[return-value]


def _slot_strides(rows: int, hidden: int, max_topk: int, elem_size: int) -> Tuple[int, ...]:
    """Bytes per slot of (dx, didx, dw, dsrc, cx, cw), each a multiple of 128."""
    return tuple(_align(n) for n in (rows * hidden * elem_size, rows * max_topk * 4, rows * max_topk * 4, rows * 4,
                                     rows * hidden * elem_size, rows * max_topk * 4))


HAS_POLL = triton is not None and hasattr(tl, "atomic_poll")
# Rows per block and row elements per step of the row-moving loops (2 KiB of bf16 per step).
_BLOCK_T, _BLOCK_H = 16, 512
_NUM_META = len(META_FIELDS)
# Warps per program. A row-moving program has one 16 x 512 tile in flight per step (16 KiB of
# bf16): at 128-bit accesses that is 1024 vectors, 4 per thread with 8 warps, enough
# independent stores in flight to cover the latency of a remote (NVLink) write, and few
# enough registers (the fp32 accumulator of the combine receiver: 32 per thread) for
# several programs per SM. The one-program wait launch of the CPU path needs one warp.
NUM_WARPS_PUT, NUM_WARPS_RECV, NUM_WARPS_WAIT = 8, 8, 1
# Values that change from exchange to exchange (or from slot to slot) are never specialised
# on, so that the first exchange of a shape compiles each kernel once and for all.
DO_NOT_SPECIALIZE = ("me", "num_tokens", "num_experts", "num_topk", "num_local", "error", "sig_word", "ack_word",
                     "meta_word", "zero_word", "epoch_word", "timeout_ns", "max_spins", "dx_off", "didx_off",
                     "dw_off", "dsrc_off", "cx_off", "cw_off", "word")


def row_vec(hidden: int, elem_size: int) -> int:
    """Elements per 128-bit access that ``hidden`` allows: the largest power of two dividing it, up to
    16 bytes. Rows start at multiples of it, so the kernels tell the compiler and it vectorises."""
    vec = 1
    while vec * elem_size < 16 and hidden % (2 * vec) == 0:
        vec *= 2
    return vec


def row_geometry(lay: "ExchangeLayout", rows: torch.Tensor) -> Tuple[int, int, dict]:
    """How the row-moving kernels walk ``rows`` [n, width]: ``(width, stride, consts)``, ``stride`` the
    row pitch of the slot region in ``rows``' elements (a slot row holds ``hidden`` elements of the
    buffer's dtype), ``consts`` the ``BLOCK_H``/``VEC`` of those elements.

    Rows of the buffer's dtype have ``width == stride == hidden``. Narrower rows of another element
    type (FP8 dispatch: packed e4m3 bytes and scales, viewed as int32) cross in the same slots:
    they must fit (``width * elem <= hidden * buffer elem``) and the slot pitch must be a whole
    number of their elements."""
    width, elem = rows.shape[1], rows.element_size()
    pitch = lay.hidden * lay.elem_size
    if width * elem > pitch or pitch % elem:
        raise ValueError(f"rows of {width} x {elem} bytes do not fit a slot row of {pitch} bytes")
    stride = pitch // elem
    return width, stride, dict(BLOCK_H=min(_BLOCK_H, next_pow2(width)),
                               VEC=row_vec(math.gcd(width, stride), elem))


if triton is not None:

    def exchange_kernel(fn):
        """``triton.jit`` with the arguments of ``DO_NOT_SPECIALIZE`` that ``fn`` has left unspecialised."""
        names = fn.__code__.co_varnames[:fn.__code__.co_argcount]
        return triton.jit(do_not_specialize=[n for n in DO_NOT_SPECIALIZE if n in names])(fn)

    @triton.jit
    def _words(table_ptr, rank, word):
        """int64 pointer to word ``word`` of ``rank``'s buffer (word: int64 units)."""
        return (tl.load(table_ptr + rank) + word.to(tl.int64) * 8).to(tl.pointer_type(tl.int64))

    @triton.jit
    def _region(table_ptr, rank, offset, ELEM: tl.constexpr):
        """Pointer to byte ``offset`` of ``rank``'s buffer. Buffers and regions are 128-byte aligned;
        an address cast from an int64 carries no alignment, so say it, or every access is scalar."""
        return tl.multiple_of((tl.load(table_ptr + rank) + offset).to(tl.pointer_type(ELEM)), 16)

    @triton.jit
    def _uses(epoch_ptr, epoch_word):
        """Completed uses of this exchange's slot: a device word, advanced after every receive."""
        return tl.load(epoch_ptr + epoch_word, volatile=True)

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
    def _begin_recv(table_ptr, status_ptr, me, world, sig_word, zero_word, data_target, meta_word, count_out_ptr,
                    timeout_ns, max_spins, WP: tl.constexpr, WAIT: tl.constexpr, HAS_POLL: tl.constexpr):
        """Start of every receive kernel: wait for the senders' data (unless a wait launch did), then
        program 0 copies the row counts out; returns every sender's row count ([WP] int64). Error
        codes and metadata are agreed on the host (see ``EPBuffer``), not here."""
        if WAIT:
            _wait_counters(table_ptr, me, world, sig_word, zero_word, data_target, status_ptr, timeout_ns, max_spins,
                           WP, HAS_POLL)
        p = tl.arange(0, WP)
        live = p < world
        counts = tl.load(_words(table_ptr, me, meta_word) + p * 4, mask=live, other=0, cache_modifier=".cg")
        if tl.program_id(0) == 0:
            tl.store(count_out_ptr + p, counts, mask=live)
        return counts

    @triton.jit
    def _received_block(item, nb, ends, BLOCK_T: tl.constexpr, WP: tl.constexpr):
        """Block ``item`` of the received rows (senders in order, ``nb`` [WP] blocks each, ``ends`` their
        running sum): (sender, rows j [BLOCK_T] of its segment)."""
        s = tl.sum((ends <= item).to(tl.int32))
        before = tl.sum(tl.where(tl.arange(0, WP) < s, nb, 0))
        return s, (item - before) * BLOCK_T + tl.arange(0, BLOCK_T)

    @exchange_kernel
    def _wait_kernel(table_ptr, status_ptr, epoch_ptr, me, world, word, zero_word, epoch_word, nprog, timeout_ns,
                     max_spins, AHEAD: tl.constexpr, WP: tl.constexpr, HAS_POLL: tl.constexpr):
        """Wait until counters ``word + p`` reach (uses + AHEAD) * nprog (CPU path: a launch of its own)."""
        target = (_uses(epoch_ptr, epoch_word) + AHEAD) * nprog
        _wait_counters(table_ptr, me, world, word, zero_word, target, status_ptr, timeout_ns, max_spins, WP, HAS_POLL)


class Channel(NamedTuple):
    """Where one exchange runs: the group's buffers and this exchange's slot. What changes from one
    use of a slot to the next (its epoch) lives in the device words ``epochs``, so every exchange on a
    slot launches its kernels with the same host arguments (a CUDA graph replays them)."""

    table: torch.Tensor  # [world] int64: base address of every rank's buffer, on the kernels' device
    status: torch.Tensor  # [1] int64: address of the host-visible status words, on the kernels' device
    epochs: torch.Tensor  # [2 * num_slots] int64 on the kernels' device: completed uses of (shape, slot)
    layout: ExchangeLayout
    me: int  # this rank
    slot: int
    num_programs: int  # programs of every put and receive kernel, the same on every rank
    timeout_ns: int
    max_spins: int  # bound of the spin loop where Triton has no atomic_poll
    fused_wait: bool  # True: kernels wait inside (GPU); False: separate wait launches (interpreter)
    has_poll: bool = HAS_POLL


def _common(ch: Channel, shape: int) -> dict:
    lay = ch.layout
    return dict(sig_word=lay.sig_word(shape, ch.slot, DATA), ack_word=lay.sig_word(shape, ch.slot, ACK),
                meta_word=lay.meta_word(shape, ch.slot), zero_word=lay.zero_word(),
                epoch_word=shape * lay.num_slots + ch.slot, timeout_ns=ch.timeout_ns, max_spins=ch.max_spins)


def _consts(ch: Channel, num_topk: int) -> dict:
    lay = ch.layout
    return dict(WP=next_pow2(lay.world), KP=next_pow2(max(1, num_topk)), BLOCK_T=_BLOCK_T,
                BLOCK_H=min(_BLOCK_H, next_pow2(lay.hidden)), VEC=row_vec(lay.hidden, lay.elem_size),
                HAS_POLL=ch.has_poll)


def advance_epoch(ch: Channel, shape: int) -> None:
    """After the receive of an exchange (in stream order): one more completed use of its slot."""
    word = shape * ch.layout.num_slots + ch.slot
    ch.epochs[word:word + 1].add_(1)


def launch_wait(ch: Channel, shape: int, kind: int) -> None:
    """Wait (one program) until every peer's ``kind`` counter of this slot reaches its target: the
    data of this use (DATA), or the acknowledgements of the previous use (ACK)."""
    c = _common(ch, shape)
    _wait_kernel[(1,)](ch.table, ch.status, ch.epochs, ch.me, ch.layout.world, ch.layout.sig_word(shape, ch.slot, kind),
                       c["zero_word"], c["epoch_word"], ch.num_programs, c["timeout_ns"], c["max_spins"],
                       AHEAD=1 if kind == DATA else 0, WP=next_pow2(ch.layout.world), HAS_POLL=ch.has_poll,
                       num_warps=NUM_WARPS_WAIT)


def compact_positions(topk_idx: torch.Tensor, num_experts: int, world: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(pos [num_tokens, world] int64: rank of token t among the tokens sent to rank r, or -1;
    counts [world] int64: tokens sent to each rank), experts split evenly and contiguously."""
    # six launches: -1 // local is -1, which matches no rank; the counts are the running sums' last row
    owner = torch.div(topk_idx, num_experts // world, rounding_mode="floor")
    sent = (owner.unsqueeze(-1) == _ranks(world, topk_idx.device)).any(1)
    if sent.shape[0] == 0:
        return torch.full((0, world), -1, dtype=torch.int64, device=topk_idx.device), sent.sum(0, dtype=torch.int64)
    running = torch.cumsum(sent, 0, dtype=torch.int64)
    return running * sent - 1, running[-1]


_RANKS: dict = {}


def _ranks(world: int, device: torch.device) -> torch.Tensor:
    """[world] int64 ``arange``, made once per (world, device)."""
    key = (world, str(device))
    if key not in _RANKS:
        _RANKS[key] = torch.arange(world, device=device)
    return _RANKS[key]


