"""``EPBuffer``: device-side expert parallelism, kernels that move the tokens themselves.

    ep = moe.EPBuffer(group, max_tokens=4096, hidden=7168, dtype=torch.bfloat16, num_sms=20)
    recv_x, recv_idx, recv_weights, handle = ep.dispatch(x, topk_idx, topk_weights, num_experts)
    y = experts(recv_x, recv_idx, recv_weights)     # [ep.recv_capacity, hidden]
    out = ep.combine(y, handle)                      # [num_tokens, hidden]
    ep.dispatch(x, topk_idx, topk_weights, num_experts, fp8=True)   # rows cross as FP8 (docs/fp8.md)

The same meaning as ``moe.dispatch``/``moe.combine``, with fixed shapes: every rank receives
``recv_capacity = max_tokens * world`` rows, segment ``s`` (rows ``[s * max_tokens, (s + 1) *
max_tokens)``) holding the tokens rank ``s`` sent, in token order, then padding rows
(``recv_idx == -1``, zero weights, rows of ``recv_x`` not written: the receiver copies only
received rows). How many rows each rank received stays on the device in
the handle. No collective and no host read of a tensor value per exchange: Triton kernels
write into the peers' symmetric buffers and signal them (``kernels/ep_exchange.py``), a
persistent grid of ``num_sms`` programs being the SM budget; on CUDA on the communication
stream. The one collective is the construction.

``dispatch`` and ``combine`` (and their autograd) are defined in ``ep_ops.py`` over the raw
exchanges of this class (``exchange``, ``combine_shaped`` and the backward exchanges).

Exchanges take slots of two rings (dispatch-shaped and combine-shaped, ``num_slots`` each):
the lowest free one, freed when the exchange is waited on, so up to ``num_slots`` exchanges of
each shape can be in flight (``async_op=True``) and waited on in any order. Signals carry
epochs kept in device words, so slots are reused without a reset and every use of a slot
launches the same kernels with the same arguments (CUDA graphs can replay them).

Failures: bad input (too many tokens, wrong hidden size, dtype, device, top-k) is decided
from shapes on the host; the rank that passed it takes part without rows, every rank writes
what it passed on a board of shared host words, and at the exchange's own wait every rank
raises the same ``ValueError`` naming it (no device read: on time on CUDA too). A wait that
expires (``timeout_s``) raises ``EPBufferError`` naming the ranks that are missing, and
whether their processes have exited; the buffer is unusable afterwards. On CUDA an expired
wait inside a kernel is reported into host-mapped status words that the host reads without
synchronising, so it surfaces at the next exchange; ``DUALPIPE_EXT_CHECKS=1`` synchronises
at every wait.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.distributed as dist

from dualpipe_ext import faults
from dualpipe_ext.debug import checks_enabled
from dualpipe_ext.kernels._common import WIRE_DTYPES, new_output
from dualpipe_ext.inflight import InFlight
from dualpipe_ext.streams import CommScope

from .ep_errors import EPError
from .ep_memory import allocate

__all__ = ["EPBuffer", "EPHandle", "EPBufferError"]

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
_SHAPES = ("dispatch", "combine")
_CPU_WAIT_SLICE_S = 0.5  # a CPU wait checks its peers' processes this often


def _board_rows(num_slots: int) -> int:
    """Exchanges the host board remembers: a peer is at most 2 * num_slots exchanges past the oldest one
    this rank has not waited on, itself at most 2 * num_slots behind this rank's newest."""
    return 4 * num_slots + 8


class EPBufferError(RuntimeError):
    """An exchange of an ``EPBuffer`` could not complete (a peer is missing); names the peer."""


@dataclass(frozen=True)
class EPHandle:
    """What ``combine`` and the backward exchanges need of one ``dispatch``; tensors stay on the device."""

    pos: torch.Tensor  # [num_tokens, world] int64: row of token t in rank r's segment, -1 if not sent there
    send_counts: torch.Tensor  # [world] int64: tokens sent to each rank
    topk_idx: torch.Tensor  # [num_tokens, num_topk] int64: the dispatched global expert ids
    recv_src: torch.Tensor  # [recv_capacity] int64: source token of each received row, -1 for padding
    recv_count: torch.Tensor  # [world] int64: rows received from each rank
    num_experts: int
    buffer: "EPBuffer"

    @property
    def num_tokens(self) -> int:
        return self.pos.shape[0]

    @property
    def num_topk(self) -> int:
        return self.topk_idx.shape[1]


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


class EPBuffer:
    """Symmetric buffers of one expert-parallel group and the exchanges that use them.

    Args:
        group: the expert-parallel process group (None: the default group); all on one host.
        max_tokens: most tokens any rank dispatches in one call.
        hidden: row width of dispatched tokens and combined outputs.
        dtype: dtype of the rows.
        num_sms: programs of every exchange kernel (the SM budget on CUDA; default 20 there, 1 on CPU).
        max_topk: most experts a token may choose.
        num_slots: exchanges of each shape that may be in flight at once.
        timeout_s: how long a wait for a peer lasts before it raises.
        device: where the buffers live (default: the current CUDA device for an NCCL group, else CPU).
    """

    def __init__(self, group=None, max_tokens: int = 0, hidden: int = 0, dtype: torch.dtype = torch.bfloat16,
                 num_sms: Optional[int] = None, *, max_topk: int = 8, num_slots: int = 2, timeout_s: float = 120.0,
                 device: Optional[torch.device] = None) -> None:
        for name, value in (("max_tokens", max_tokens), ("hidden", hidden), ("max_topk", max_topk),
                            ("num_slots", num_slots)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"EPBuffer: {name} must be a positive int, got {value!r}")
        if dtype not in WIRE_DTYPES:
            raise ValueError(f"EPBuffer: dtype must be one of {WIRE_DTYPES}, got {dtype!r}")
        if num_sms is not None and (not isinstance(num_sms, int) or isinstance(num_sms, bool) or num_sms < 1):
            raise ValueError(f"EPBuffer: num_sms must be a positive int or None, got {num_sms!r}")
        if not timeout_s > 0:
            raise ValueError(f"EPBuffer: timeout_s must be positive, got {timeout_s!r}")
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("EPBuffer needs torch.distributed initialised (its group exchanges buffer handles once)")
        self.group = group if group is not None else dist.distributed_c10d._get_default_group()
        self.world, self.rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        if device is None:
            device = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(self.group) == "nccl"
                      else torch.device("cpu"))
        self.device = torch.device(device)
        _check_kernels_available(self.device)
        from dualpipe_ext.kernels import ep_exchange as kx

        self._kx = kx
        self.max_tokens, self.hidden, self.dtype, self.max_topk = max_tokens, hidden, dtype, max_topk
        self.num_slots, self.timeout_s = num_slots, float(timeout_s)
        self.num_sms = num_sms if num_sms is not None else (20 if self.device.type == "cuda" else 1)
        self.layout = kx.ExchangeLayout.build(self.world, max_tokens, hidden, max_topk, num_slots,
                                              torch.empty(0, dtype=dtype).element_size())
        request = (max_tokens, hidden, str(dtype), self.num_sms, max_topk, num_slots, self.device.type)
        self._mem = allocate(self.group, self.layout.nbytes, 2 * self.world + 1, self.device, request,
                             _board_rows(num_slots))
        # CUDA: put and receive launched together on the communication stream, the waits inside the
        # kernels; CPU: the receive launched at wait(), after a wait launch (the interpreter runs a
        # launch's programs one after another). Tests set it on CPU too, to run the CUDA kernels' waits.
        self._fused = self.device.type == "cuda"
        self._global = [dist.get_global_rank(self.group, p) for p in range(self.world)]
        self._rings = (_Ring(num_slots, "dispatch-shaped"), _Ring(num_slots, "combine-shaped"))
        # completed uses of every (shape, slot), on the device: the kernels read them, the stream advances them
        self._epochs = torch.zeros(2 * num_slots, dtype=torch.int64, device=self.device)
        self._ordinal = 0
        self._broken: Optional[str] = None
        self._has_poll = kx.HAS_POLL  # False: the spin-loop wait of Triton releases without tl.atomic_poll

    # Properties and lifecycle -----------------------------------------------------------

    @property
    def recv_capacity(self) -> int:
        """Rows every dispatch delivers (and every combine takes): ``max_tokens * world``."""
        return self.max_tokens * self.world

    def close(self) -> None:
        """Release the buffers (and any shared-memory file left); the buffer is unusable afterwards."""
        if self._mem is not None:
            self._mem.close()
            self._mem = None
        self._broken = self._broken or "it was closed"

    def __enter__(self) -> "EPBuffer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"EPBuffer(rank {self.rank} of {self.world}, max_tokens={self.max_tokens}, hidden={self.hidden}, "
                f"dtype={self.dtype}, num_sms={self.num_sms}, device={self.device})")

    # Exchanges --------------------------------------------------------------------------

    @property
    def kernels(self):
        """The exchange kernels' module (``dualpipe_ext.kernels.ep_exchange``) the buffer launches."""
        return self._kx

    @property
    def fp8_row_bytes(self) -> int:
        """Bytes an FP8-dispatched row moves: ``hidden`` e4m3 bytes and ``4 * ceil(hidden / 128)`` bytes of
        float32 scales, padded with zeros to a multiple of 16 (the kernels move 128-bit vectors)."""
        return -(-(self.hidden + 4 * -(-self.hidden // 128)) // 16) * 16

    def combine_backward(self, grad_out: torch.Tensor, handle: EPHandle, async_op: bool = False):
        """Gradient of ``combine``: each token's ``grad_out`` row [num_tokens, hidden] copied to the ranks
        it was dispatched to. Returns [recv_capacity, hidden] (zero padding rows), or an ``InFlight``."""
        code, detail = self.check_rows(grad_out, getattr(handle, "num_tokens", -1), "grad_out", handle)
        kx = self._kx
        out = new_output((self.recv_capacity, self.hidden), self.dtype, self.device)
        count = new_output((self.world,), torch.int64, self.device)
        if code == 0:
            x, pos, counts = grad_out.contiguous(), handle.pos, handle.send_counts
        else:
            x, pos, counts = self.placeholder_rows(), self.placeholder_pos(), count.zero_()

        def put(ch):
            kx.launch_put_dispatch(ch, x, pos, counts, None, 0, 0, int(code))

        def recv(ch):
            kx.launch_recv_dispatch(ch, out, None, count, 0)

        agree = (handle.num_experts, handle.num_topk) if code == 0 else (0, 0)
        return self.exchange(kx.DISPATCH, "combine backward", code, detail, agree, put, recv, lambda: out,
                             (x, pos, counts, out, count), async_op)

    def dispatch_backward(self, grad_recv_x: torch.Tensor, grad_recv_weights: torch.Tensor, handle: EPHandle,
                          async_op: bool = False):
        """Gradient of ``dispatch``: [recv_capacity, hidden] row gradients and [recv_capacity, num_topk] weight
        gradients back to the tokens' owners. Returns ``(grad_x [num_tokens, hidden], grad_topk_weights
        [num_tokens, num_topk] float32)``, or an ``InFlight``."""
        code, detail = self.check_rows(grad_recv_x, self.recv_capacity, "grad_recv_x", handle)
        if code == 0 and (not isinstance(grad_recv_weights, torch.Tensor) or grad_recv_weights.dtype != torch.float32
                          or tuple(grad_recv_weights.shape) != (self.recv_capacity, handle.num_topk)):
            code, detail = EPError.TOPK_WEIGHTS, (
                f"grad_recv_weights must be [{self.recv_capacity}, {handle.num_topk}] float32, got "
                f"{getattr(grad_recv_weights, 'dtype', None)} "
                f"{tuple(getattr(grad_recv_weights, 'shape', ()))}")
        return self.combine_shaped("dispatch backward", grad_recv_x, grad_recv_weights, handle, code, detail,
                                   async_op)

    # The raw exchanges' pieces, on which ``ep_ops`` builds dispatch and combine ----------

    def combine_shaped(self, what: str, y: torch.Tensor, grad_w: Optional[torch.Tensor], handle: EPHandle,
                       code: int, detail: Optional[str], async_op: bool, wrap: Optional[Callable] = None):
        """One combine-shaped exchange of ``y`` [recv_capacity, hidden] (and ``grad_w`` [recv_capacity, num_topk]
        float32) back to the tokens' owners; ``wrap`` turns the [num_tokens, hidden] sum into the result."""
        kx = self._kx
        dev = self.device
        if code == 0:
            rows, src, pos, idx = y.contiguous(), handle.recv_src, handle.pos, handle.topk_idx
            recv_count, num_experts, num_topk = handle.recv_count, handle.num_experts, handle.num_topk
            gw = grad_w.contiguous() if grad_w is not None else None
        else:  # take part with no rows, so that every rank's slots stay in step
            rows, pos = self.placeholder_rows(self.recv_capacity), self.placeholder_pos()
            src = torch.full((self.recv_capacity,), -1, dtype=torch.int64, device=dev)
            idx, num_experts, num_topk, gw = torch.zeros(0, 1, dtype=torch.int64, device=dev), 0, 0, None
            recv_count = torch.zeros(self.world, dtype=torch.int64, device=dev)
        out = new_output((pos.shape[0], self.hidden), self.dtype, dev)
        gw_out = new_output(idx.shape, torch.float32, dev) if gw is not None else None
        count = new_output((self.world,), torch.int64, dev)

        def put(ch):
            kx.launch_put_combine(ch, rows, src, recv_count, gw, num_experts, num_topk, int(code))

        def recv(ch):
            kx.launch_recv_combine(ch, out, pos, (idx, gw_out) if gw_out is not None else None, count,
                                   num_experts if code == 0 else -1, num_topk)

        if wrap is not None:
            result = lambda: wrap(out)  # noqa: E731
        else:
            result = (lambda: (out, gw_out)) if grad_w is not None else (lambda: out)
        return self.exchange(kx.COMBINE, what, code, detail, (num_experts, num_topk), put, recv, result,
                             (rows, gw, src, recv_count, pos, idx, out, gw_out, count), async_op)

    def placeholder_rows(self, n: int = 0) -> torch.Tensor:
        """[n, hidden] zeros: the rows of a rank that takes part in an exchange without data."""
        return torch.zeros(n, self.hidden, dtype=self.dtype, device=self.device)

    def placeholder_pos(self) -> torch.Tensor:
        """[0, world] int64: the positions of a rank that takes part in an exchange without data."""
        return torch.full((0, self.world), -1, dtype=torch.int64, device=self.device)

    def check_rows(self, t: Any, rows: int, name: str, handle: Any) -> Tuple[EPError, Optional[str]]:
        """Host check of a row tensor and a handle (shapes only): (error code, detail)."""
        if not isinstance(handle, EPHandle) or handle.buffer is not self:
            return EPError.HANDLE, f"the handle must come from this buffer's dispatch, got {type(handle).__name__}"
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] != rows:
            return EPError.ROWS, f"{name} must be [{rows}, {self.hidden}], got {tuple(getattr(t, 'shape', ()))}"
        return self.check_payload(t, name)

    def check_payload(self, t: torch.Tensor, name: str) -> Tuple[EPError, Optional[str]]:
        """Host check that a 2-d tensor of rows fits the buffer's hidden size, dtype and device."""
        if t.shape[1] != self.hidden:
            return EPError.HIDDEN, f"{name} has hidden size {t.shape[1]}, the buffer {self.hidden}"
        if t.dtype != self.dtype:
            return EPError.DTYPE, f"{name} has dtype {t.dtype}, the buffer {self.dtype}"
        if t.device != self.device:
            return EPError.DEVICE, f"{name} is on {t.device}, the buffer on {self.device}"
        return EPError.OK, None

    def exchange(self, shape: int, what: str, code: int, detail: Optional[str], agree: Tuple[int, int],
                  put: Callable, recv: Callable, result: Callable, keep_alive: tuple, async_op: bool):
        """Run one exchange: the put now, the receive now (CUDA: on the communication stream) or at wait().

        ``code``: this rank's error code (0: good input); ``agree``: (num_experts, num_topk), which every
        rank must have passed alike. Both go on the host board, read at the wait."""
        if self._broken is not None:
            raise EPBufferError(f"EPBuffer (rank {self.rank}) is unusable: {self._broken}; create a new one")
        if self._fused:  # expired device waits reported since the last look, before anything new is queued
            self._raise_on_status(f"an exchange before {what} (exchange {self._ordinal})")
        ring, ordinal = self._rings[shape], self._ordinal
        slot, uses = ring.begin(ordinal)  # raises on every rank alike, before anything moves
        self._ordinal += 1
        self._publish(ordinal, int(code), agree)
        ch = self._channel(slot)
        label = f"{what} (exchange {ordinal}, {_SHAPES[shape]} slot {slot})"

        def finish():
            try:
                if not self._fused:
                    self._cpu_wait(ch, shape, self._kx.DATA, label)
                    recv(ch)
                elif checks_enabled() and self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
            finally:
                ring.end(slot)
            self._agree_on_input(ordinal, label, detail)
            self._raise_on_status(label)
            return result()

        if self._fused:
            scope = CommScope(self.device)
            with scope:
                put(ch)
                recv(ch)
            pending = InFlight(finish, event=scope.done, device=self.device, keep_alive=keep_alive)
        else:
            if uses > 1:
                self._cpu_wait(ch, shape, self._kx.ACK, label)
            put(ch)
            pending = InFlight(finish)
        if code != 0:  # the rank that passed bad input completes the exchange, then raises with the others
            pending.wait()
            raise AssertionError("unreachable: the board names this rank's bad input")  # pragma: no cover
        return pending if async_op else pending.wait()

    def _channel(self, slot: int):
        fused = self._fused
        wait_s = self.timeout_s if fused else min(self.timeout_s, _CPU_WAIT_SLICE_S)
        spins = int(self.timeout_s * (2e6 if fused else 2e3))
        return self._kx.Channel(self._mem.table, self._mem.status_addr, self._epochs, self.layout, self.rank, slot,
                                self.num_sms, int(wait_s * 1e9), spins, fused, self._has_poll)

    # The host board: what every rank passed to each exchange --------------------------

    def _publish(self, ordinal: int, code: int, agree: Tuple[int, int]) -> None:
        row = self._mem.board[self.rank][ordinal % len(self._mem.board[self.rank])]
        row[1], row[2], row[3] = code, agree[0], agree[1]
        row[0] = ordinal + 1  # last: a peer that sees it sees the rest (x86 stores stay in order)

    def _agree_on_input(self, ordinal: int, label: str, detail: Optional[str]) -> None:
        """At the wait of exchange ``ordinal``: wait until every rank's host has issued it, then raise the
        same ``ValueError`` on every rank if any passed bad input. Host memory only: no device read, so a
        rejected exchange raises at its own wait, also while its kernels are still queued."""
        board, world = self._mem.board, self.world
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
                dead = [p for p in behind if not faults.pid_alive(self._mem.pids[p])]
                raised = faults.raised_by([self._global[p] for p in behind], faults.window())
                if dead or raised or waited >= self.timeout_s:
                    self._fail(f"{label} waited {waited:.1f} s for the peers to issue it; " + "; ".join(
                        self._peer_state(p, p in dead, raised.get(self._global[p])) for p in behind))
            time.sleep(0 if spins < 64 else 1e-4)
        if any(seq != ordinal + 1 for seq in seqs):  # a peer issued board-size exchanges more: cannot happen
            raise RuntimeError(f"EPBuffer {label}: the host board of the group was overwritten ({seqs})")
        entries = [tuple(int(v) for v in b[k, 1:]) for b in board]
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
            msg += f". On rank {self.rank}: {detail}"
        raise ValueError(msg)

    def _cpu_wait(self, ch, shape: int, kind: int, label: str) -> None:
        """Wait in slices so that a peer whose process has exited is named at once."""
        status, world = self._mem.status_np, self.world
        start = time.monotonic()
        while True:
            self._kx.launch_wait(ch, shape, kind)
            if status[2 * world] == 0:
                return
            missing = [p for p in range(world) if status[p] and p != self.rank]
            waited = time.monotonic() - start
            dead = [p for p in missing if not faults.pid_alive(self._mem.pids[p])]
            raised = faults.raised_by([self._global[p] for p in missing], faults.window())
            if dead or raised or waited >= self.timeout_s:
                status[:world] = 0
                status[2 * world] = 0
                what = "the data of" if kind == self._kx.DATA else "the peers to finish reading the previous use of"
                self._fail(f"{label} waited {waited:.1f} s for {what} its slot; " + "; ".join(
                    self._peer_state(p, p in dead, raised.get(self._global[p])) for p in missing))
            status[:world] = 0
            status[2 * world] = 0

    def _peer_state(self, p: int, dead: bool, raised: Optional[str]) -> str:
        """What became of missing peer ``p`` (a rank of the group), in words."""
        who = f"rank {p} (global rank {self._global[p]}, pid {self._mem.pids[p]})"
        if raised is not None:
            return f"{who} failed at {raised}"
        if dead:
            return f"{who} has exited"
        return f"{who} did not signal (it hangs, or issued a different sequence of exchanges)"

    def _raise_on_status(self, label: str) -> None:
        """Raise ``EPBufferError`` if a device wait has expired (the status words say so)."""
        status, world = self._mem.status_np, self.world
        if not status[2 * world]:
            return
        missing = [p for p in range(world) if status[p] and p != self.rank]
        status[:world] = 0
        status[2 * world] = 0
        who = (f"the signals of rank(s) {missing} did not come (died, hangs, or issued a different sequence of "
               f"exchanges)" if missing else "this rank's own receive of a slot's previous use did not complete")
        self._fail(f"{label} (or an exchange before it) waited {self.timeout_s:g} s; {who}")

    def _fail(self, message: str) -> None:
        self._broken = message
        raise EPBufferError(f"EPBuffer (rank {self.rank} of {self.world}): {message}")


def _check_kernels_available(device: torch.device) -> None:
    from dualpipe_ext.kernels._common import _interpreting, triton_available

    if not triton_available():
        raise ImportError("EPBuffer needs the 'triton' package, which is not installed: pip install -e \".[triton]\"")
    if device.type == "cpu" and not _interpreting():
        raise ValueError("EPBuffer on CPU runs its Triton kernels in the interpreter: set TRITON_INTERPRET=1 before "
                         "triton is first imported")
