"""Small shared helpers for the benchmarks: medians, quantiles, tables, and ``spawn_ranks`` for the
scripts whose workers set up their own process group (the others call ``dualpipe_ext.launch.run_ranks``)."""
from __future__ import annotations

import statistics
from typing import List, Sequence


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    i = min(len(s) - 1, max(0, round(q * (len(s) - 1))))
    return s[i]


def table(headers: List[str], rows: List[List[object]]) -> str:
    """A Markdown table."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    out = [line(headers), "| " + " | ".join("-" * w for w in widths) + " |"]
    out += [line(r) for r in cells]
    return "\n".join(out)


class _FirstReport:
    """Stands in for the queue of a ``spawn_ranks`` worker: keeps the first object put on it."""

    def __init__(self) -> None:
        self.items: List[object] = []

    def put(self, item: object) -> None:
        self.items.append(item)


def _run_worker(rank: int, world: int, worker, args):
    import os

    report = _FirstReport()
    worker(rank, world, int(os.environ["MASTER_PORT"]), args, report)
    return report.items[:1]


def spawn_ranks(worker, world: int, args, timeout_s: float = 1800.0):
    """Run ``worker(rank, world, port, args, queue)`` on ``world`` processes (``dualpipe_ext.launch``).

    For scripts whose worker sets up its own process group on ``port`` and reports through
    ``queue.put``: returns the first object a rank put (rank 0 reports the results).
    """
    from dualpipe_ext.launch import run_ranks

    reports = run_ranks(_run_worker, world, worker, args, timeout_s=timeout_s, init=False)
    return next(items[0] for items in reports if items)
