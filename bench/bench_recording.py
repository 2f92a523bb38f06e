"""Cost of recording on the main job: step time with the runtime's recorder on against off.

Runs the model of ``examples/dualpipe_demo.py`` (residual MLP blocks, float64, gloo on CPU
processes, one torch thread each) and switches ``pipe.timeline.enabled`` between steps in
blocks of four, off-on-on-off and on-off-off-on in turn, so both arms see the same drift
of the machine and neither always runs first.
Each step starts after a barrier; its time is the slowest rank's ``pipe.step``. The table
gives medians per arm, the median of the per-block differences (on minus off, within
each block, relative to off) with its 95 % bootstrap interval and, for scale, what the recorder's own calls cost: events per
step times the cost of one event (median of a loop over ``Recorder.add``).

    python bench/bench_recording.py --blocks 15
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import sys
import time

import torch
import torch.distributed as dist

from dualpipe_ext.launch import run_ranks

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from harness import median, table  # noqa: E402


def _demo():
    spec = importlib.util.spec_from_file_location("dualpipe_demo", os.path.join(HERE, "..", "examples",
                                                                                "dualpipe_demo.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


BLOCKS = ((False, True, True, False), (True, False, False, True))  # alternating: no arm always first


def _order(blocks: int):
    return [on for b in range(blocks) for on in BLOCKS[b % 2]]


def _worker(rank, world, schedule, chunks, hidden, tokens, warmup, blocks):
    from dualpipe_ext import DualPipe, DualPipeV, RuntimeConfig, set_p2p_tensor_dtype, set_p2p_tensor_shapes

    demo = _demo()
    torch.manual_seed(0)
    n = 2 * world  # DualPipe: forward stages then reverse stages; DualPipeV: the V's stages
    full = [demo.Block(hidden).to(demo.DTYPE) for _ in range(n)]
    if schedule == "dualpipe":
        mods, mbs = [full[rank], full[world + (world - 1 - rank)]], chunks // 2
        feeds, loss = rank in (0, world - 1), rank in (0, world - 1)
    else:
        mods, mbs = [full[rank], full[2 * world - 1 - rank]], chunks
        feeds = loss = rank == 0
    cls = DualPipe if schedule == "dualpipe" else DualPipeV
    pipe = cls([copy.deepcopy(m) for m in mods], config=RuntimeConfig(comm_timeout_s=60, record=True))
    set_p2p_tensor_shapes([(tokens, hidden)])
    set_p2p_tensor_dtype(demo.DTYPE)
    x = torch.randn(mbs * tokens, hidden, dtype=demo.DTYPE)
    y = torch.randn(mbs * tokens, hidden, dtype=demo.DTYPE)
    plan = [True] * warmup + _order(blocks)
    times, events = [], []
    for on in plan:
        pipe.timeline.enabled = on
        before = len(pipe.timeline.events)
        dist.barrier()
        t0 = time.perf_counter()
        pipe.step(*([x] if feeds else []), num_chunks=chunks, criterion=demo.criterion if loss else None,
                  labels=[y] if loss else [])
        times.append(time.perf_counter() - t0)
        events.append(len(pipe.timeline.events) - before)
        if len(pipe.timeline.events) > 100_000:
            pipe.timeline.clear()
    return times[warmup:], events[warmup:]


def _event_cost_ns(n: int = 200_000) -> float:
    from dualpipe_ext.runtime.timeline import Recorder, _now

    rec = Recorder(True)
    rec.begin_step("bench", 1, 1)
    runs = []
    for _ in range(5):
        rec.events = []
        t0 = time.perf_counter_ns()
        for i in range(n):
            start = _now()
            rec.add("F0.1", "compute", start, _now(), i)
        runs.append((time.perf_counter_ns() - t0) / n)
    return median(runs)


def _bootstrap_ci(xs, n: int = 2000, seed: int = 0):
    """95 % bootstrap interval of the median of ``xs``."""
    import random

    rng = random.Random(seed)
    meds = sorted(median([rng.choice(xs) for _ in xs]) for _ in range(n))
    return meds[int(0.025 * n)], meds[int(0.975 * n) - 1]


def measure(schedule, ranks, chunks, hidden, tokens, warmup, blocks, timeout):
    got = run_ranks(_worker, ranks, schedule, chunks, hidden, tokens, warmup, blocks, timeout_s=timeout)
    steps = len(got[0][0])
    step_ms = [max(got[r][0][i] for r in range(ranks)) * 1e3 for i in range(steps)]
    on_flags = _order(blocks)
    events = [sum(got[r][1][i] for r in range(ranks)) / ranks for i in range(steps) if on_flags[i]]
    return step_ms, on_flags, median(events)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--blocks", type=int, default=15, help="blocks of four steps per schedule and size")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--sizes", default="32x4,512x128", help="hidden x tokens per micro-batch, comma-separated")
    p.add_argument("--schedules", default="dualpipe,dualpipev")
    p.add_argument("--timeout", type=float, default=600.0)
    args = p.parse_args()
    per_event = _event_cost_ns()
    rows = []
    for size in args.sizes.split(","):
        hidden, tokens = (int(v) for v in size.split("x"))
        for schedule in args.schedules.split(","):
            step_ms, on_flags, events = measure(schedule, args.ranks, args.chunks, hidden, tokens, args.warmup,
                                                args.blocks, args.timeout)
            off = [t for t, on in zip(step_ms, on_flags) if not on]
            on = [t for t, on in zip(step_ms, on_flags) if on]
            k = len(BLOCKS[0])
            diffs = []  # per block: mean(on) - mean(off), relative to mean(off)
            for b in range(args.blocks):
                blk = list(zip(step_ms[b * k:(b + 1) * k], on_flags[b * k:(b + 1) * k]))
                a = [t for t, o in blk if not o]
                c = [t for t, o in blk if o]
                diffs.append((sum(c) / len(c) - sum(a) / len(a)) / (sum(a) / len(a)))
            m_off = median(off)
            lo, hi = _bootstrap_ci(diffs)
            rows.append([
                schedule, f"{hidden} x {tokens}", len(off), f"{m_off:.2f}", f"{median(on):.2f}",
                f"{100 * (median(on) - m_off) / m_off:+.1f} %",
                f"{100 * median(diffs):+.2f} % ({100 * lo:+.2f} .. {100 * hi:+.2f})",
                f"{events:.0f}", f"{100 * events * per_event / 1e6 / m_off:.3f} %",
            ])
            print(f"done: {schedule} {hidden}x{tokens}", file=sys.stderr, flush=True)
    print(f"{args.ranks} ranks, {args.chunks} micro-batches, float64, gloo; one recorder event costs "
          f"{per_event:.0f} ns (median of 5 loops of 200k)")
    print(table(["schedule", "hidden x tokens/mb", "steps per arm", "off median ms", "on median ms",
                 "on vs off (medians)", "per-block difference, median (95 % CI)", "events/rank/step",
                 "events x cost / step"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
