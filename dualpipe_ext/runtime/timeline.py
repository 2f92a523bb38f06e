"""Per-rank recording of what a pipeline step did and when.

A :class:`Recorder` collects events while ``enabled``; the executor runs each recorded
step inside ``with recorder.step(...)``, adds one event per action, and code inside an
action can add finer spans with ``with dualpipe_ext.runtime.timeline.span("dispatch"):``
(records into the recorder of the step that is running, if recording is on; costs one
list check otherwise) or ``with recorder.span("dispatch"):``. Timestamps come from ``time.perf_counter_ns()`` of
the recording process, so events of one rank compare with each other; across ranks,
align them with the ``clock_offset_ns`` fields if set, or by the step boundaries.

Record format (``Recorder.to_dict()`` and the JSON file written by ``save``)::

    {
      "format": "dualpipe_ext.timeline/1",
      "rank": 2,                  # pipeline rank (after rank_mapping)
      "global_rank": 2,           # torch.distributed rank
      "schedule": "dualpipe",     # plan name of the last step
      "ranks": 4, "chunks": 8,    # plan size of the last step
      "clock_offset_ns": 0,       # add to start/end to move to a shared clock (0 if unknown)
      "steps": [[start_ns, end_ns], ...],          # one pair per recorded step
      "events": [
        {"name": "F0.3+B1.1", "cat": "compute", "start_ns": 123, "end_ns": 456, "step": 0, "index": 18},
        {"name": "wait", "cat": "comm", ...},      # a posted batch of sends/receives and its wait
        {"name": "dispatch", "cat": "span", ...},  # a span opened inside an action
        ...
      ]
    }

``name`` of compute and comm events is the action token of the plan
(``docs/schedule-trace.md``); ``index`` is the action's position in the rank's
plan (-1 for spans). Events are in order of their end time.

When the PyTorch profiler is active, the executor also opens a
``torch.profiler.record_function`` range named after each action, so its traces show
the same tokens.
"""
from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Tuple

__all__ = ["Recorder", "span", "current"]

_now = time.perf_counter_ns

# Recorders of the steps running in this process, innermost last. Only Recorder.step
# changes it. A list rather than a context variable: spans are also opened by code that
# autograd runs on its own threads (a CUDA backward), which a context variable would miss.
_running: List["Recorder"] = []

# Internal event tuple: (name, cat, start_ns, end_ns, step, index).
Event = Tuple[str, str, int, int, int, int]


class Recorder:
    """Collects the events of one rank. Cheap enough to leave on: one tuple per action."""

    def __init__(self, enabled: bool = False) -> None:
        if not isinstance(enabled, bool):
            raise TypeError(f"Recorder(enabled) must be True or False, got {enabled!r}")
        self.enabled = enabled
        self.rank = -1
        self.global_rank = -1
        self.schedule = ""
        self.ranks = 0
        self.chunks = 0
        self.clock_offset_ns = 0
        self.events: List[Event] = []
        self.steps: List[Tuple[int, int]] = []
        self._step = -1

    def clear(self) -> None:
        self.events = []
        self.steps = []
        self._step = -1

    def begin_step(self, schedule: str, ranks: int, chunks: int) -> int:
        self.schedule, self.ranks, self.chunks = schedule, ranks, chunks
        self._step = len(self.steps)
        t = _now()
        self.steps.append((t, t))
        return t

    def end_step(self) -> None:
        if self._step >= 0:
            self.steps[self._step] = (self.steps[self._step][0], _now())

    @contextmanager
    def step(self, schedule: str, ranks: int, chunks: int) -> Iterator["Recorder"]:
        """Record one step: its bounds, and the spans that :func:`span` opens meanwhile."""
        self.begin_step(schedule, ranks, chunks)
        _running.append(self)
        try:
            yield self
        finally:
            _running.remove(self)
            self.end_step()

    def add(self, name: str, cat: str, start_ns: int, end_ns: int, index: int = -1) -> None:
        self.events.append((name, cat, start_ns, end_ns, self._step, index))

    @contextmanager
    def span(self, name: str) -> Iterator[None]:
        """Record a named span inside an action (no-op while disabled)."""
        if not self.enabled:
            yield
            return
        start = _now()
        try:
            yield
        finally:
            self.events.append((name, "span", start, _now(), self._step, -1))

    def to_dict(self) -> Dict[str, Any]:
        return {
            "format": "dualpipe_ext.timeline/1",
            "rank": self.rank,
            "global_rank": self.global_rank,
            "schedule": self.schedule,
            "ranks": self.ranks,
            "chunks": self.chunks,
            "clock_offset_ns": self.clock_offset_ns,
            "steps": [list(s) for s in self.steps],
            "events": [
                {"name": n, "cat": c, "start_ns": s, "end_ns": e, "step": st, "index": i}
                for (n, c, s, e, st, i) in self.events
            ],
        }

    def save(self, path: str) -> str:
        """Write the records as JSON. A ``{rank}`` in ``path`` is replaced by the pipeline rank."""
        path = path.format(rank=self.rank)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(self.to_dict(), f)
        return path

    def compute_events(self, step: int = -1) -> List[Event]:
        """Compute events of one step (default: the last)."""
        if step < 0:
            step = len(self.steps) + step
        return [e for e in self.events if e[1] == "compute" and e[4] == step]


def current() -> Optional[Recorder]:
    """The recorder of the innermost recorded step running in this process, or None."""
    return _running[-1] if _running else None


@contextmanager
def span(name: str) -> Iterator[None]:
    """Record a span named ``name`` inside the running step's current action, if recording is on."""
    if not _running:
        yield
        return
    with _running[-1].span(name):
        yield
