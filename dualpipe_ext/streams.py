"""Streams and events for communication, behind one small interface.

On CUDA the package issues communication kernels on a dedicated high-priority stream per
device and orders it against the computation with events: the communication stream waits
for an event recorded on the compute stream before it reads its inputs, and the compute
stream waits for an event recorded after the exchange before it reads the results. The
host never blocks. On CPU there are no streams: kernels run when they are launched and
every call here is a no-op.

The operations go through a ``StreamOps`` object so that tests can swap in one that
records the order of records and waits (``use_stream_ops``).
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, Optional

import torch

__all__ = ["StreamOps", "CudaStreamOps", "HostStreamOps", "stream_ops", "use_stream_ops", "CommScope"]


class StreamOps:
    """The stream operations the package uses; the base class is the host's (no streams)."""

    def current(self, device: torch.device) -> Any:
        return None

    def comm(self, device: torch.device) -> Any:
        """The communication stream of ``device``."""
        return None

    def record(self, stream: Any) -> Any:
        """An event recorded on ``stream`` now."""
        return None

    def wait(self, stream: Any, event: Any) -> None:
        """Make ``stream`` wait for ``event`` (the host does not block)."""

    @contextlib.contextmanager
    def using(self, stream: Any) -> Iterator[None]:
        """Launch on ``stream`` inside the block."""
        yield

    def is_done(self, event: Any) -> bool:
        return True


HostStreamOps = StreamOps


class CudaStreamOps(StreamOps):
    """CUDA streams: one high-priority communication stream per device."""

    def __init__(self) -> None:
        self._comm: Dict[int, torch.cuda.Stream] = {}

    def current(self, device: torch.device) -> Any:
        return torch.cuda.current_stream(device)

    def comm(self, device: torch.device) -> Any:
        index = torch.device(device).index
        if index is None:
            index = torch.cuda.current_device()
        stream = self._comm.get(index)
        if stream is None:
            low, high = torch.cuda.Stream.priority_range()
            stream = torch.cuda.Stream(device=index, priority=min(low, high))
            self._comm[index] = stream
        return stream

    def record(self, stream: Any) -> Any:
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def wait(self, stream: Any, event: Any) -> None:
        stream.wait_event(event)

    @contextlib.contextmanager
    def using(self, stream: Any) -> Iterator[None]:
        with torch.cuda.stream(stream):
            yield

    def is_done(self, event: Any) -> bool:
        return event.query()


_HOST = StreamOps()
_CUDA: Optional[CudaStreamOps] = None
_OVERRIDE: Optional[StreamOps] = None


def stream_ops(device: torch.device) -> StreamOps:
    """The stream operations for tensors on ``device``."""
    global _CUDA
    if _OVERRIDE is not None:
        return _OVERRIDE
    if torch.device(device).type != "cuda":
        return _HOST
    if _CUDA is None:
        _CUDA = CudaStreamOps()
    return _CUDA


@contextlib.contextmanager
def use_stream_ops(ops: StreamOps) -> Iterator[StreamOps]:
    """Within the block every device uses ``ops`` (for tests: a recording fake)."""
    global _OVERRIDE
    previous, _OVERRIDE = _OVERRIDE, ops
    try:
        yield ops
    finally:
        _OVERRIDE = previous


class CommScope:
    """Issue work on the communication stream, ordered after what the compute stream has queued.

        scope = CommScope(device)
        with scope:            # the comm stream waits for the compute stream, then runs the block
            launch(...)
        event = scope.done     # recorded on the comm stream at the end of the block
    """

    def __init__(self, device: torch.device) -> None:
        self.ops = stream_ops(device)
        self.compute = self.ops.current(device)
        self.stream = self.ops.comm(device)
        self.done: Any = None
        self._using = None

    def __enter__(self) -> "CommScope":
        self.ops.wait(self.stream, self.ops.record(self.compute))
        self._using = self.ops.using(self.stream)
        self._using.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._using.__exit__(*exc)
        self.done = self.ops.record(self.stream)
