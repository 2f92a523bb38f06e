"""What one error agreement costs: over the gloo group against in shared memory (ranks of one host).

Every rank calls ``agreement.agree`` with nothing wrong (the common case of every pipeline step),
``--iters`` times in a row per path, after a barrier; the paths alternate in ``--rounds`` rounds.
A figure is the median over rank 0's calls of one path; ``ratio`` is shared memory over gloo in the
same run.

    python bench/bench_agreement.py --ranks 2,3,4
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

from dualpipe_ext.launch import run_ranks

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import median, quantile, table  # noqa: E402


def _worker(rank: int, world: int, iters: int, rounds: int):
    from dualpipe_ext.runtime.agreement import Wait, agree
    from dualpipe_ext.runtime.host_agreement import open_on_host

    torch.set_num_threads(1)
    group = dist.group.WORLD
    names = (lambda g: f"global rank {g}", list(range(world)))
    host = open_on_host(group, Wait("the set-up", rank, 60.0, names, time.time()))
    if host is None:
        raise RuntimeError("the ranks could not share memory on this host")
    values = (("num_chunks", 8), ("torch.is_grad_enabled()", 1))
    times = {"gloo group": [], "shared memory": []}
    for _ in range(rounds):
        for path, h in (("gloo group", None), ("shared memory", host)):
            dist.barrier()
            for _ in range(iters):
                t0 = time.perf_counter()
                agree(group, torch.device("cpu"), rank, 0, None, values=values, timeout_s=60, names=names, host=h)
                times[path].append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", default="2,3,4", help="comma-separated group sizes")
    p.add_argument("--iters", type=int, default=100, help="agreements per path and round")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    rows = []
    for world in [int(w) for w in args.ranks.split(",")]:
        times = run_ranks(_worker, world, args.iters, args.rounds, timeout_s=600)[0]
        gloo, shm = times["gloo group"], times["shared memory"]
        rows.append([world, f"{median(gloo) * 1e6:.0f}", f"{quantile(gloo, 0.9) * 1e6:.0f}",
                     f"{median(shm) * 1e6:.1f}", f"{quantile(shm, 0.9) * 1e6:.1f}",
                     f"{median(shm) / median(gloo):.3f}"])
    print(f"error agreement, nothing wrong; {args.rounds} rounds of {args.iters} per path; torch {torch.__version__}")
    print(table(["ranks", "gloo median, us", "gloo p90, us", "shared median, us", "shared p90, us", "ratio"], rows))


if __name__ == "__main__":
    main()
