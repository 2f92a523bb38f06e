"""Export a merged run step as a Chrome trace (JSON object format; opens in Perfetto and chrome://tracing).

One process per pipeline rank; compute actions, communication and spans on separate threads,
each event a complete event (``"ph": "X"``) named by its plan token.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List

from dualpipe_ext.viz.records import RunStep

__all__ = ["to_chrome_trace", "write_chrome_trace"]

_THREADS = {"compute": 0, "comm": 1, "span": 2}


def _us(ns: int) -> float:
    return ns / 1000.0


def to_chrome_trace(run: RunStep) -> Dict[str, Any]:
    """The trace of ``run`` as a Chrome trace object (timestamps in microseconds)."""
    events: List[Dict[str, Any]] = []
    for r in range(run.ranks):
        events.append({"name": "process_name", "ph": "M", "pid": r, "tid": 0, "args": {"name": f"rank {r}"}})
        events.append({"name": "process_sort_index", "ph": "M", "pid": r, "tid": 0, "args": {"sort_index": r}})
        for cat, tid in _THREADS.items():
            events.append({"name": "thread_name", "ph": "M", "pid": r, "tid": tid, "args": {"name": cat}})
        s, e = run.bounds[r]
        events.append({"name": f"step {run.step}", "cat": "step", "ph": "X", "pid": r, "tid": 3,
                       "ts": _us(s), "dur": _us(e - s)})
        for name, start, end in run.compute[r]:
            events.append({"name": name, "cat": "compute", "ph": "X", "pid": r, "tid": 0,
                           "ts": _us(start), "dur": _us(end - start)})
        for name, cat, start, end in run.other[r]:
            events.append({"name": name, "cat": cat, "ph": "X", "pid": r, "tid": _THREADS.get(cat, 2),
                           "ts": _us(start), "dur": _us(end - start)})
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {"schedule": run.schedule, "ranks": run.ranks, "chunks": run.chunks, "step": run.step},
    }


def write_chrome_trace(run: RunStep, path: str) -> str:
    """Write :func:`to_chrome_trace` of ``run`` to ``path``; returns ``path``."""
    with open(path, "w") as f:
        json.dump(to_chrome_trace(run), f)
    return path
