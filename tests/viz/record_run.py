"""Record a real DualPipe run on CPU processes (gloo) and save one record file per rank.

    python tests/viz/record_run.py OUT_DIR [--schedule dualpipe|dualpipev] [--ranks 4] [--chunks 8]

Each rank holds two small MLP stages; two steps run, both recorded.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List


def _worker(rank: int, world: int, out_dir: str, schedule: str, chunks: int, hidden: int, batch: int,
            steps: int) -> None:
    import torch
    import torch.nn as nn

    from dualpipe_ext import comm
    from dualpipe_ext.runtime import DualPipe, DualPipeV, RuntimeConfig

    torch.manual_seed(rank)
    stage = lambda: nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden))
    cls = DualPipe if schedule == "dualpipe" else DualPipeV
    pipe = cls((stage(), stage()), config=RuntimeConfig(record=True, comm_timeout_s=60))
    per_module = chunks // 2 if schedule == "dualpipe" else chunks
    micro = batch // chunks
    comm.set_p2p_tensor_shapes([(micro, hidden)])
    comm.set_p2p_tensor_dtype(torch.float32)
    feeds = schedule == "dualpipev" and rank == 0 or schedule == "dualpipe" and rank in (0, world - 1)
    n = micro * per_module
    x = torch.randn(n, hidden) if feeds else None
    y = torch.randn(n, hidden) if feeds else None
    crit = nn.functional.mse_loss
    for _ in range(steps):
        pipe.step(*([x] if feeds else []), num_chunks=chunks, criterion=crit, labels=[y] if feeds else [])
    pipe.timeline.save(os.path.join(out_dir, "rank{rank}.json"))


def record(out_dir: str, schedule: str = "dualpipe", ranks: int = 4, chunks: int = 8, hidden: int = 64,
           batch: int = 64, steps: int = 2) -> List[str]:
    """Run and record; returns the record paths in rank order."""
    from dualpipe_ext.launch import run_ranks

    os.makedirs(out_dir, exist_ok=True)
    run_ranks(_worker, ranks, out_dir, schedule, chunks, hidden, batch, steps, timeout_s=120)
    return [os.path.join(out_dir, f"rank{r}.json") for r in range(ranks)]


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("out_dir")
    p.add_argument("--schedule", default="dualpipe", choices=["dualpipe", "dualpipev"])
    sizes = {"ranks": 4, "chunks": 8, "hidden": 64, "batch": 64, "steps": 2}  # record()'s defaults
    for name, default in sizes.items():
        p.add_argument(f"--{name}", type=int, default=default)
    a = p.parse_args()
    print("\n".join(record(a.out_dir, a.schedule, **{name: getattr(a, name) for name in sizes})))
    sys.exit(0)
