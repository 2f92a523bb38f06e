"""``InFlight``: the one type for an operation whose result is not ready yet.

Every asynchronous exchange of the package returns one (``async_op=True`` of
``moe.dispatch``/``moe.combine``, the ``EPBuffer`` exchanges, the overlap engine's backward
exchanges). ``wait()`` returns the result:

- collectives (gloo, NCCL): waits on their works; on NCCL that makes the current stream
  wait, the host does not block;
- CUDA kernels on the communication stream: makes the current stream wait for the event
  recorded after them, without blocking the host;
- a finisher (``finish``): run once after the above, e.g. the receiving kernel of an
  ``EPBuffer`` exchange on CPU, or the reduction after an all-to-all;
- stages (``advance``): an exchange whose payload needs the counts of a first, small
  exchange issues the payload at ``progress()`` (or at ``wait()`` at the latest).

Tensors the operation reads or writes on another stream are kept alive (``keep_alive``)
until ``wait()``, after which the current stream is ordered after the operation. As a
context manager the block runs while the operation is in flight and the exit waits::

    with ep.dispatch(x, idx, w, num_experts, async_op=True) as pending:
        shared = shared_experts(x)      # overlaps the transfer
    recv_x, recv_idx, recv_w, handle = pending.wait()
"""
from __future__ import annotations

import time
from typing import Any, Callable, Optional, Sequence, Tuple

import torch

from .faults import checked
from .streams import stream_ops

__all__ = ["InFlight"]


class InFlight:
    """An operation in flight; ``wait()`` gives its result (once computed, the same object again)."""

    __slots__ = ("_works", "_event", "_device", "_finish", "_keep", "_ready_ns", "_done", "_result", "issued_ns",
                 "_advance", "what")

    def __init__(self, finish: Optional[Callable[[], Any]] = None, *, works: Sequence[Any] = (),
                 event: Any = None, device: Optional[torch.device] = None, keep_alive: Sequence[Any] = (),
                 delay_s: float = 0.0, result: Any = None,
                 advance: Optional[Callable[[], Tuple[Sequence[Any], Callable[[], Any]]]] = None,
                 what: str = "an exchange in flight") -> None:
        self._advance = advance
        self.what = what  # what a failure message says failed
        self._works = [w for w in works if w is not None]
        self._event, self._device = event, device
        self._finish = finish
        self._keep = tuple(keep_alive)
        self.issued_ns = time.perf_counter_ns()
        self._ready_ns = self.issued_ns + int(delay_s * 1e9)
        self._done = False
        self._result = result

    @classmethod
    def done(cls, result: Any) -> "InFlight":
        """An operation that has already completed with ``result``."""
        return cls(result=result)

    def with_delay(self, delay_s: float) -> "InFlight":
        """Make ``wait()`` return no earlier than ``delay_s`` after issue (a slow interconnect, for
        tests and benchmarks; the delay runs concurrently with whatever happens before ``wait()``)."""
        self._ready_ns = self.issued_ns + int(delay_s * 1e9)
        return self

    def progress(self) -> None:
        """Start the next stage of a staged operation (``advance``: after its first works, e.g. a
        count exchange, it issues the payload); a no-op otherwise. Callers that interleave several
        operations call it at the same points on every rank, so collectives keep their order."""
        if self._advance is None:
            return
        for w in self._works:
            checked(self.what, w.wait)
        advance, self._advance = self._advance, None
        works, self._finish = advance()
        self._works = [w for w in works if w is not None]

    def is_completed(self) -> bool:
        """True when ``wait()`` would not wait for the transfer (the finisher may still run)."""
        if self._done:
            return True
        if self._advance is not None:
            return False
        if any(not w.is_completed() for w in self._works):
            return False
        if self._event is not None and not stream_ops(self._device).is_done(self._event):
            return False
        return time.perf_counter_ns() >= self._ready_ns

    def wait(self) -> Any:
        if self._done:
            return self._result
        self.progress()
        for w in self._works:
            checked(self.what, w.wait)
        if self._event is not None:
            ops = stream_ops(self._device)
            ops.wait(ops.current(self._device), self._event)
        if self._finish is not None:
            self._result = self._finish()
        remaining = self._ready_ns - time.perf_counter_ns()
        if remaining > 0:
            time.sleep(remaining / 1e9)
        self._works, self._event, self._finish, self._keep = [], None, None, ()
        self._done = True
        return self._result

    def __enter__(self) -> "InFlight":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.wait()
