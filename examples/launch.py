"""Launch the examples' ranks: spawned CPU processes on a free loopback port, under a deadline."""
from __future__ import annotations

import queue as queue_mod
import socket
import time
from typing import Any, Callable, Dict, List, Tuple

import torch.multiprocessing as mp


def launch(worker: Callable, world: int, args_of: Callable[[int, int, Any], tuple],
           timeout_s: float) -> Tuple[Dict[int, Any], List[int]]:
    """Run ``worker(*args_of(rank, port, queue))`` on ``world`` processes.

    Each rank puts ``(rank, result)`` on the queue. Returns the results by rank and the
    ranks that did not report within ``timeout_s``; processes still alive are killed.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=worker, args=args_of(r, port, queue), daemon=True) for r in range(world)]
    for proc in procs:
        proc.start()
    results: Dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    while len(results) < world and time.monotonic() < deadline:
        try:
            rank, out = queue.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue_mod.Empty:
            break
        results[rank] = out
    for proc in procs:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
    return results, [r for r in range(world) if r not in results]
