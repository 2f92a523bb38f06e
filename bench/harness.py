"""Small shared timing helpers for the benchmarks: medians, quantiles, tables."""
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


def spawn_ranks(worker, world: int, args, timeout_s: float = 1800.0):
    """Run ``worker(rank, world, port, args, queue)`` on ``world`` spawned processes.

    Returns the first object a rank puts on ``queue`` (rank 0 reports the results);
    processes still alive after it are killed.
    """
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, world, port, args, queue), daemon=True) for r in range(world)]
    for proc in procs:
        proc.start()
    try:
        return queue.get(timeout=timeout_s)
    finally:
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
