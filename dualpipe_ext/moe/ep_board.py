"""What went wrong in an ``EPBuffer``'s exchanges, and which ranks: the buffer's failure state.

Two sources, both host memory that every process maps (``ep_memory``), so nothing here reads a
device tensor:

- the **board**: for each exchange, what every rank's host passed (error code, ``num_experts``,
  top-k). At an exchange's wait every rank reads it, waits (bounded) for the peers that have not
  issued the exchange yet, and raises the same ``ValueError`` naming the ranks with bad input;
- the **status words**: a device wait that expired (a peer's signals did not come) writes which
  peers were missing. The host reads them without synchronising, at the next exchange.

A peer that is missing is named with what became of it: its process exited, it reported a
failure on the fault board (``faults``), or it is silent. A missing peer breaks the buffer:
every later use raises ``EPBufferError``.
"""
from __future__ import annotations

import time
from typing import List, Optional, Tuple

from dualpipe_ext import faults

from .ep_errors import EPError

__all__ = ["EPBufferError", "ExchangeBoard", "board_rows"]

# What every rank names for a rank's error code.
_ERRORS = {EPError.X: "x is not a [num_tokens, hidden] tensor", EPError.TOO_MANY_TOKENS: "more tokens than max_tokens",
           EPError.HIDDEN: "wrong hidden size", EPError.DTYPE: "wrong dtype", EPError.DEVICE: "wrong device",
           EPError.TOPK_IDX: "topk_idx is not a [num_tokens, num_topk] int64 tensor",
           EPError.TOPK_WEIGHTS: "topk_weights is not a float32 tensor of topk_idx's shape",
           EPError.NUM_TOPK: "num_topk above max_topk",
           EPError.NUM_EXPERTS: "num_experts not a positive multiple of the group size",
           EPError.TOPK_IDX_VALUES: "topk_idx values out of range",
           EPError.TOPK_WEIGHTS_VALUES: "topk_weights not finite",
           EPError.ROWS: "y is not a [recv_capacity, hidden] tensor", EPError.HANDLE: "handle is not from this buffer",
           EPError.FP8_DTYPE: "fp8 dispatch of a dtype it does not quantize",
           EPError.FP8_ROW_BYTES: "fp8 rows do not fit the buffer's rows"}


def board_rows(num_slots: int) -> int:
    """Exchanges the host board remembers: a peer is at most 2 * num_slots exchanges past the oldest one
    this rank has not waited on, itself at most 2 * num_slots behind this rank's newest."""
    return 4 * num_slots + 8


class EPBufferError(RuntimeError):
    """An exchange of an ``EPBuffer`` could not complete (a peer is missing); names the peer."""


class ExchangeBoard:
    """The failure state of one rank's buffer: the host board, the status words, and whether the
    buffer is broken. ``mem`` is the ``ep_memory.SymmetricBuffer`` (``board``, ``status_np``, ``pids``);
    ``global_ranks[p]`` the global rank of group rank ``p``."""

    def __init__(self, mem, rank: int, world: int, global_ranks: List[int], timeout_s: float) -> None:
        self.mem, self.rank, self.world, self.global_ranks = mem, rank, world, global_ranks
        self.timeout_s = timeout_s
        self.broken: Optional[str] = None  # why the buffer cannot be used any more

    def check_usable(self) -> None:
        if self.broken is not None:
            raise EPBufferError(f"EPBuffer (rank {self.rank}) is unusable: {self.broken}; create a new one")

    def publish(self, ordinal: int, code: int, agree: Tuple[int, int]) -> None:
        """Say what this rank passed to exchange ``ordinal``: its error code and ``agree`` (num_experts, top-k)."""
        row = self.mem.board[self.rank][ordinal % len(self.mem.board[self.rank])]
        row[1], row[2], row[3] = code, agree[0], agree[1]
        row[0] = ordinal + 1  # last: a peer that sees it sees the rest (x86 stores stay in order)

    def agree_on_input(self, ordinal: int, label: str, detail: Optional[str]) -> None:
        """At the wait of exchange ``ordinal``: wait until every rank's host has issued it, then raise the
        same ``ValueError`` on every rank if any passed bad input. Host memory only: no device read, so a
        rejected exchange raises at its own wait, also while its kernels are still queued."""
        board, world = self.mem.board, self.world
        k = ordinal % len(board[0])
        start, spins = time.monotonic(), 0
        while True:
            seqs = [int(b[k, 0]) for b in board]
            behind = [p for p in range(world) if seqs[p] < ordinal + 1]
            if not behind:
                break
            spins += 1
            if spins % 256 == 0:
                waited = time.monotonic() - start
                self._fail_if_gone(behind, waited, f"{label} waited {waited:.1f} s for the peers to issue it")
            time.sleep(0 if spins < 64 else 1e-4)
        if any(seq != ordinal + 1 for seq in seqs):  # a peer issued board-size exchanges more: cannot happen
            raise RuntimeError(f"EPBuffer {label}: the host board of the group was overwritten ({seqs})")
        entries = [tuple(int(v) for v in b[k, 1:]) for b in board]
        _raise_bad_input(entries, label, self.rank, detail)

    def slice_expired(self, label: str, what: str, start: float) -> bool:
        """After a bounded wait (CPU path): False if it completed; True if it expired while every missing
        peer may still come (clears the status words: wait again); raises once a missing peer has exited or
        failed, or ``timeout_s`` after ``start``. ``what``: what the wait was for, in words."""
        status, world = self.mem.status_np, self.world
        if status[2 * world] == 0:
            return False
        missing = [p for p in range(world) if status[p] and p != self.rank]
        status[:world] = 0
        status[2 * world] = 0
        waited = time.monotonic() - start
        self._fail_if_gone(missing, waited, f"{label} waited {waited:.1f} s for {what}")
        return True

    def raise_on_status(self, label: str) -> None:
        """Raise ``EPBufferError`` if a device wait has expired (the status words say so)."""
        status, world = self.mem.status_np, self.world
        if not status[2 * world]:
            return
        missing = [p for p in range(world) if status[p] and p != self.rank]
        status[:world] = 0
        status[2 * world] = 0
        who = (f"the signals of rank(s) {missing} did not come (died, hangs, or issued a different sequence of "
               f"exchanges)" if missing else "this rank's own receive of a slot's previous use did not complete")
        self.fail(f"{label} (or an exchange before it) waited {self.timeout_s:g} s; {who}")

    def fail(self, message: str) -> None:
        """Break the buffer and raise ``EPBufferError`` with ``message``."""
        self.broken = message
        raise EPBufferError(f"EPBuffer (rank {self.rank} of {self.world}): {message}")

    def _fail_if_gone(self, missing: List[int], waited: float, prefix: str) -> None:
        """Fail naming the ``missing`` peers if one of them has exited or failed, or the wait is over."""
        dead = [p for p in missing if not faults.pid_alive(self.mem.pids[p])]
        raised = faults.raised_by([self.global_ranks[p] for p in missing], faults.window())
        if dead or raised or waited >= self.timeout_s:
            self.fail(prefix + "; " + "; ".join(
                self._peer_state(p, p in dead, raised.get(self.global_ranks[p])) for p in missing))

    def _peer_state(self, p: int, dead: bool, raised: Optional[str]) -> str:
        """What became of missing peer ``p`` (a rank of the group), in words."""
        who = f"rank {p} (global rank {self.global_ranks[p]}, pid {self.mem.pids[p]})"
        if raised is not None:
            return f"{who} failed at {raised}"
        if dead:
            return f"{who} has exited"
        return f"{who} did not signal (it hangs, or issued a different sequence of exchanges)"


def _raise_bad_input(entries: List[Tuple[int, ...]], label: str, rank: int, detail: Optional[str]) -> None:
    """Raise the ``ValueError`` every rank raises alike when a rank passed bad input or the ranks' (num_experts,
    top-k) differ; ``entries[p]`` = (code, num_experts, top-k) of rank p."""
    world = len(entries)
    codes = [e[0] for e in entries]
    good = [p for p in range(world) if codes[p] == 0]
    agreed = [entries[p][1:] for p in good]
    common = max(agreed, key=lambda v: (agreed.count(v), -agreed.index(v))) if good else None
    for p in good:
        if entries[p][1:] != common:
            codes[p] = EPError.DISAGREE
    if not any(codes):
        return
    bad = [r for r, c in enumerate(codes) if c]
    fp8 = any(entries[p][2] >> 16 for p in good)  # a dispatch's fp8 mode travels in num_topk's bits 16 and up

    def said(e, t):
        return f"{e}, {t & 0xFFFF}" + (f", fp8 mode {t >> 16}" if fp8 else "")

    names = "; ".join(f"rank {r}: " + (f"num_experts or num_topk{' or fp8' if fp8 else ''} differ from the "
                                       f"other ranks' ({said(*entries[r][1:])} against {said(*common)})"
                                       if codes[r] == EPError.DISAGREE else _ERRORS[codes[r]]) for r in bad)
    msg = f"EPBuffer {label}: rank(s) {bad} of the group passed bad input ({names}); the exchange was dropped"
    if detail is not None:
        msg += f". On rank {rank}: {detail}"
    raise ValueError(msg)
