"""The raw exchanges of an ``EPBuffer``: slots, epochs, launching the kernels and waiting for them.

An exchange is a put (this rank's rows into the peers' slots, then a signal) and a receive (wait
for every peer's signal, copy out, acknowledge). On CUDA both are launched at once on the
communication stream and wait inside the kernels; on CPU (the interpreter runs a launch's programs
one after another) the receive is launched at ``wait()``, after a wait launch of its own. What the
rows are and where the results go is the caller's ``put``/``recv``/``result`` (``EPBuffer``,
``ep_ops``); failures are named by the ``ExchangeBoard`` (``ep_board``).
"""
from __future__ import annotations

import time
from typing import Callable, Dict, Optional, Tuple

import torch

from dualpipe_ext.debug import checks_enabled
from dualpipe_ext.inflight import InFlight
from dualpipe_ext.streams import CommScope

from .ep_board import ExchangeBoard

__all__ = ["Exchanges"]

_SHAPES = ("dispatch", "combine")
_CPU_WAIT_SLICE_S = 0.5  # a CPU wait checks its peers' processes this often


class _Ring:
    """Slots of one exchange shape: the free ones, and which exchange holds each of the others.

    An exchange takes the lowest free slot and frees it when waited on, so exchanges may be waited
    on in any order; every rank issues the same exchanges, so every rank picks the same slots."""

    def __init__(self, num_slots: int, shape: str) -> None:
        self.num_slots, self.shape = num_slots, shape
        self.uses = [0] * num_slots
        self.held: Dict[int, int] = {}  # slot -> ordinal of the exchange that holds it (not waited on yet)

    def begin(self, ordinal: int) -> Tuple[int, int]:
        """(slot, uses of it including this one) for exchange ``ordinal``; raises when every slot is held."""
        if len(self.held) >= self.num_slots:
            held = ", ".join(f"slot {s}: exchange {o}" for s, o in sorted(self.held.items()))
            raise RuntimeError(f"EPBuffer: exchange {ordinal} needs a slot of the {self.shape} ring, but all "
                               f"{self.num_slots} are held by exchanges not waited on yet ({held}); wait on one "
                               f"first, or build the EPBuffer with a larger num_slots")
        slot = min(s for s in range(self.num_slots) if s not in self.held)
        self.uses[slot] += 1
        self.held[slot] = ordinal
        return slot, self.uses[slot]

    def end(self, slot: int) -> None:
        self.held.pop(slot, None)


class Exchanges:
    """Runs one rank's exchanges over its symmetric buffer ``mem`` (layout ``layout``) with kernels ``kx``
    (``dualpipe_ext.kernels.ep_exchange``), ``num_sms`` programs each, every wait bounded by ``timeout_s``.

    ``fused``: put and receive launched together, the waits inside the kernels (CUDA; tests set it on
    CPU too, to run the CUDA kernels' waits). ``has_poll``: the kernels' waits use ``tl.atomic_poll``.
    """

    def __init__(self, kx, mem, layout, board: ExchangeBoard, rank: int, num_slots: int, num_sms: int,
                 timeout_s: float, device: torch.device) -> None:
        self.kx, self.mem, self.layout, self.board = kx, mem, layout, board
        self.rank, self.num_sms, self.timeout_s, self.device = rank, num_sms, timeout_s, device
        self.fused = device.type == "cuda"
        self.has_poll = kx.HAS_POLL  # False: the spin-loop wait of Triton releases without tl.atomic_poll
        self.rings = (_Ring(num_slots, "dispatch-shaped"), _Ring(num_slots, "combine-shaped"))
        # completed uses of every (shape, slot), on the device: the kernels read them, the stream advances them
        self.epochs = torch.zeros(2 * num_slots, dtype=torch.int64, device=device)
        self.ordinal = 0  # exchanges issued so far (every rank issues the same ones)

    def run(self, shape: int, what: str, code: int, detail: Optional[str], agree: Tuple[int, int],
            put: Callable, recv: Callable, result: Callable, keep_alive: tuple, async_op: bool):
        """One exchange of ``shape`` (``kx.DISPATCH`` or ``kx.COMBINE``): ``put(channel)`` now, ``recv(channel)``
        now (fused) or at ``wait()``, then ``result()``. ``code``: this rank's error code (0: good input);
        ``agree``: (num_experts, num_topk), which every rank must have passed alike; both go on the board,
        read at the wait. Returns ``result()``, or an ``InFlight`` with ``async_op``."""
        board = self.board
        board.check_usable()
        if self.fused:  # expired device waits reported since the last look, before anything new is queued
            board.raise_on_status(f"an exchange before {what} (exchange {self.ordinal})")
        ring, ordinal = self.rings[shape], self.ordinal
        slot, uses = ring.begin(ordinal)  # raises on every rank alike, before anything moves
        self.ordinal += 1
        board.publish(ordinal, int(code), agree)
        ch = self.channel(slot)
        label = f"{what} (exchange {ordinal}, {_SHAPES[shape]} slot {slot})"

        def finish():
            try:
                if not self.fused:
                    self._cpu_wait(ch, shape, self.kx.DATA, label)
                    recv(ch)
                elif checks_enabled() and self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
            finally:
                ring.end(slot)
            board.agree_on_input(ordinal, label, detail)
            board.raise_on_status(label)
            return result()

        if self.fused:
            scope = CommScope(self.device)
            with scope:
                put(ch)
                recv(ch)
            pending = InFlight(finish, event=scope.done, device=self.device, keep_alive=keep_alive)
        else:
            if uses > 1:
                self._cpu_wait(ch, shape, self.kx.ACK, label)
            put(ch)
            pending = InFlight(finish)
        if code != 0:  # the rank that passed bad input completes the exchange, then raises with the others
            pending.wait()
            raise AssertionError("unreachable: the board names this rank's bad input")  # pragma: no cover
        return pending if async_op else pending.wait()

    def channel(self, slot: int):
        """The kernels' view of this rank's exchange in ``slot`` (``kx.Channel``)."""
        wait_s = self.timeout_s if self.fused else min(self.timeout_s, _CPU_WAIT_SLICE_S)
        spins = int(self.timeout_s * (2e6 if self.fused else 2e3))
        return self.kx.Channel(self.mem.table, self.mem.status_addr, self.epochs, self.layout, self.rank, slot,
                               self.num_sms, int(wait_s * 1e9), spins, self.fused, self.has_poll)

    def _cpu_wait(self, ch, shape: int, kind: int, label: str) -> None:
        """Wait in slices so that a peer whose process has exited is named at once."""
        what = "the data of its slot" if kind == self.kx.DATA else "the peers to finish reading the previous use " \
                                                                   "of its slot"
        start = time.monotonic()
        while True:
            self.kx.launch_wait(ch, shape, kind)
            if not self.board.slice_expired(label, what, start):
                return
