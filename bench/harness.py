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
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
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


# GPU runs: timing, watchdog, steps, JSON ---------------------------------------------------


def bench_ms(fn, device, quick: bool = False, repeats: int = 5) -> float:
    """Median milliseconds of ``fn()``: ``triton.testing.do_bench`` on CUDA (L2 flushed between runs,
    warm-up and measuring windows of 10/40 ms with ``quick``, else 25/100 ms); wall-clock on CPU
    (one warm-up, ``repeats`` runs)."""
    import time

    import torch

    if torch.device(device).type == "cuda":
        from triton.testing import do_bench

        warmup, rep = (10, 40) if quick else (25, 100)
        return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return median(times)


def watchdog(seconds: float) -> None:
    """End the process (exit 1) with every thread's Python stack if it runs ``seconds`` longer;
    a hung kernel or wait cannot keep a benchmark alive."""
    import faulthandler
    import sys

    if seconds > 0:
        faulthandler.dump_traceback_later(seconds, exit=True, file=sys.stderr)


class Steps:
    """Named steps of a benchmark: ``with steps("dispatch, 8 SMs"):`` prints the step, and a failure
    prints ``FAIL at <step>: <error>`` before it propagates."""

    def __init__(self, script: str) -> None:
        self.script = script
        self.current = "start"

    def __call__(self, name: str):
        import contextlib
        import sys
        import time

        @contextlib.contextmanager
        def run():
            self.current = name
            t0 = time.perf_counter()
            print(f"[{self.script}] {name} ...", file=sys.stderr, flush=True)
            try:
                yield
            except BaseException as e:
                print(f"[{self.script}] FAIL at {name}: {type(e).__name__}: {e}", flush=True)
                raise
            print(f"[{self.script}] {name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)

        return run()


def environment(device) -> dict:
    """Device, versions and date for a JSON record."""
    import datetime
    import platform

    import torch

    device = torch.device(device)
    info = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                torch=torch.__version__, python=platform.python_version(), device=str(device))
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=props.name, sms=props.multi_processor_count, cuda=torch.version.cuda)
    else:
        info.update(device_name="cpu", sms=None, cuda=None)
    return info


def write_json(path, payload: dict) -> None:
    """Write ``payload`` (figures of one run) to ``path`` when given."""
    import json

    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=1, default=str)
        print(f"wrote {path}")


def init_single_group(backend: str = "gloo") -> None:
    """A world-1 process group on a free loopback port, if none exists (for an ``EPBuffer`` of one rank)."""
    from datetime import timedelta

    import torch.distributed as dist

    from dualpipe_ext.launch import free_port

    if not dist.is_initialized():
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                                timeout=timedelta(seconds=60))


def gpu_bench_main(name: str, description: str, run, print_result, timeout_s: float, smoke_help: str) -> int:
    """The command line of a GPU benchmark whose result has ``rows`` (a failed row has ``error``):
    ``--quick``, ``--json``, ``--timeout-s`` and ``--cpu-smoke``; exits 1 when a row failed."""
    import argparse

    import torch

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="shorter timing windows")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--timeout-s", type=float, default=timeout_s, help="end the run (with stacks) after this long")
    p.add_argument("--cpu-smoke", action="store_true", help=smoke_help)
    args = p.parse_args()
    if not args.cpu_smoke and not torch.cuda.is_available():
        print(f"{name}: no CUDA device here; nothing measured (--cpu-smoke runs tiny sizes)")
        return 0
    watchdog(args.timeout_s)
    result = run(args)
    print_result(result)
    write_json(args.json, result)
    return int(any("error" in x for x in result["rows"]))


def stream_ms(fns, device, iters: int = 20, flush_bytes: int = 256 << 20) -> list:
    """Median milliseconds of each of ``fns`` run one after another, ``iters`` times: their device time
    alone. On CUDA the stream first sleeps while the host queues every iteration (an L2 flush, then
    each function between two events), so no host time falls between the events; on CPU wall-clock
    around each call."""
    import time

    import torch

    if torch.device(device).type != "cuda":
        times = [[] for _ in fns]
        for _ in range(max(1, min(iters, 2))):
            for i, fn in enumerate(fns):
                t0 = time.perf_counter()
                fn()
                times[i].append((time.perf_counter() - t0) * 1e3)
        return [median(t) for t in times]
    for fn in fns:  # warm-up: compiles, and settles the allocator
        fn()
    flush = torch.empty(flush_bytes, dtype=torch.int8, device=device)
    events = [[torch.cuda.Event(enable_timing=True) for _ in range(len(fns) + 1)] for _ in range(iters)]
    torch.cuda.synchronize(device)
    if hasattr(torch.cuda, "_sleep"):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU clocks: the host queues everything below meanwhile
    for row in events:
        flush.zero_()
        row[0].record()
        for fn, end in zip(fns, row[1:]):
            fn()
            end.record()
    torch.cuda.synchronize(device)
    return [median([row[i].elapsed_time(row[i + 1]) for row in events]) for i in range(len(fns))]


def host_ms(fn, device, iters: int = 20) -> float:
    """Median milliseconds the host spends in one call of ``fn``, its device work queued behind a sleeping
    stream (CUDA) so that the host never waits for the device; wall-clock of the whole call on CPU."""
    import time

    import torch

    fn()
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        if hasattr(torch.cuda, "_sleep"):
            torch.cuda._sleep(200_000_000)
    times = []
    for _ in range(iters if cuda else max(1, min(iters, 2))):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    if cuda:
        torch.cuda.synchronize(device)
    return median(times)
