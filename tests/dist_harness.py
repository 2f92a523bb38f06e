"""Run a function on N gloo ranks in spawned processes, under a hard timeout.

Shared by every multi-process test: ``run_ranks(fn, world, *args)`` calls
``fn(rank, world, *args)`` in each process after ``init_process_group("gloo")`` on a
free loopback port, and fails naming the ranks that raised (with their tracebacks) or
did not finish in time.
"""
from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, Dict, List


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn: Callable, rank: int, world: int, port: int, args: tuple, out: "mp.Queue", barrier: bool) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=60))
        result = fn(rank, world, *args)
        if barrier:
            dist.barrier()
        buf = io.BytesIO()  # bytes, not shared-memory tensors, which die with this process
        torch.save(result, buf)
        out.put((rank, "ok", buf.getvalue()))
    except BaseException:  # noqa: BLE001 - reported to the parent
        out.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable, world: int, *args: Any, timeout_s: float = 120.0, barrier: bool = True) -> List[Any]:
    """Call ``fn(rank, world, *args)`` on ``world`` processes; return the results by rank.

    ``barrier=False`` skips the closing barrier, for groups a test leaves broken on purpose.
    """
    import torch

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, world, port, args, out, barrier), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    results: Dict[int, Any] = {}
    errors: Dict[int, str] = {}
    deadline = time.monotonic() + timeout_s
    while len(results) + len(errors) < world:
        try:
            rank, status, value = out.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            break
        (results if status == "ok" else errors)[rank] = value
    for p in procs:
        p.join(timeout=max(0.1, deadline - time.monotonic()) if not errors else 5)
    stuck = [r for r in range(world) if r not in results and r not in errors]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    if errors or stuck:
        msg = []
        if stuck:
            msg.append(f"ranks {stuck} did not finish within {timeout_s:g} s")
        for r in sorted(errors):
            msg.append(f"rank {r} raised:\n{errors[r]}")
        raise AssertionError("\n".join(msg))
    return [torch.load(io.BytesIO(results[r]), weights_only=False) for r in range(world)]
