"""Step time of the dualpipe_ext runtime against torch.distributed.pipelining's ScheduleDualPipeV.

Both run DualPipeV over the same stage modules, ranks and micro-batches on CPU with gloo.
Steps alternate between the runtimes so both see the same machine noise; each step's time
is the slowest rank's, and the table shows medians (and the 20/80 % quantiles) over the
timed steps. Variants of this runtime: defaults (error agreement on, recording off),
without the error agreement (``check_errors=False``), and with recording on.

    python bench/bench_runtime.py --ranks 4 --chunks 8 --steps 30
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from dualpipe_ext.launch import run_ranks

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import median, quantile, table  # noqa: E402

SIZES = {
    # name: (hidden, tokens per micro-batch)
    "tiny": (16, 2),
    "realistic": (512, 128),
}


class Block(nn.Module):
    """Residual MLP block: x + W2 gelu(W1 x)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.up = nn.Linear(hidden, 4 * hidden)
        self.down = nn.Linear(4 * hidden, hidden)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(x)))


def mse(out, target):
    return F.mse_loss(out, target)


def _worker(rank, world, args):
    from torch.distributed.pipelining import PipelineStage, ScheduleDualPipeV

    from dualpipe_ext import DualPipeV, RuntimeConfig, set_p2p_tensor_dtype, set_p2p_tensor_shapes

    results = {}
    for size in args.sizes.split(","):
        hidden, tokens = SIZES[size]
        torch.manual_seed(0)
        full = [Block(hidden) for _ in range(2 * world)]
        local = [full[rank], full[2 * world - 1 - rank]]
        x = torch.randn(args.chunks * tokens, hidden)
        y = torch.randn(args.chunks * tokens, hidden)
        set_p2p_tensor_shapes([(tokens, hidden)])
        set_p2p_tensor_dtype(torch.float32)

        runners = {}
        for name, cfg in (("ours", RuntimeConfig()), ("ours, no error agreement", RuntimeConfig(check_errors=False)),
                          ("ours, recording on", RuntimeConfig(record=True))):
            pipe = DualPipeV(copy.deepcopy(local), config=cfg)

            def run(pipe=pipe):
                if rank == 0:
                    pipe.step(x, num_chunks=args.chunks, criterion=mse, labels=[y])
                else:
                    pipe.step(num_chunks=args.chunks)
            runners[name] = run

        mods = copy.deepcopy(local)
        stages = [PipelineStage(mods[0], rank, 2 * world, torch.device("cpu")),
                  PipelineStage(mods[1], 2 * world - 1 - rank, 2 * world, torch.device("cpu"))]
        sched = ScheduleDualPipeV(stages, n_microbatches=args.chunks, loss_fn=mse, scale_grads=False)

        def run_torch():
            if rank == 0:
                sched.step(x, target=y, losses=[])
            else:
                sched.step()
        runners["torch ScheduleDualPipeV"] = run_torch

        if args.baselines:
            # 1F1B over the same blocks, one stage per rank: PipelineSchedule vs torch Schedule1F1B.
            from torch.distributed.pipelining import Schedule1F1B

            from dualpipe_ext import PipelineSchedule

            ours_1f1b = PipelineSchedule(copy.deepcopy(full[rank]), "1f1b")
            theirs_1f1b = Schedule1F1B(PipelineStage(copy.deepcopy(full[rank]), rank, world, torch.device("cpu")),
                                       n_microbatches=args.chunks, loss_fn=mse, scale_grads=False)

            def run_ours_1f1b():
                ours_1f1b.step(*([x] if rank == 0 else []), num_chunks=args.chunks,
                               criterion=mse if rank == world - 1 else None, labels=[y] if rank == world - 1 else [])

            def run_torch_1f1b():
                if rank == 0:
                    theirs_1f1b.step(x)
                elif rank == world - 1:
                    theirs_1f1b.step(target=y, losses=[])
                else:
                    theirs_1f1b.step()
            runners["1f1b: ours PipelineSchedule"] = run_ours_1f1b
            runners["1f1b: torch Schedule1F1B"] = run_torch_1f1b

        times = {k: [] for k in runners}
        for it in range(args.warmup + args.steps):
            for name, fn in runners.items():
                dist.barrier()
                t0 = time.perf_counter()
                fn()
                dt = torch.tensor([time.perf_counter() - t0])
                dist.all_reduce(dt, op=dist.ReduceOp.MAX)
                if it >= args.warmup:
                    times[name].append(dt.item())
        results[size] = times
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--sizes", default="tiny,realistic")
    p.add_argument("--baselines", action="store_true", help="also time 1F1B: PipelineSchedule vs Schedule1F1B")
    args = p.parse_args()
    results = run_ranks(_worker, args.ranks, args, timeout_s=1800)[0]
    rows = []
    for size, times in results.items():
        hidden, tokens = SIZES[size]
        for name, ts in times.items():
            ref = median(times["1f1b: torch Schedule1F1B" if name.startswith("1f1b") else "torch ScheduleDualPipeV"])
            m = median(ts)
            rows.append([f"{size} (hidden {hidden}, {tokens} tokens/mb)", name, f"{m * 1e3:.2f}",
                         f"{quantile(ts, 0.2) * 1e3:.2f} - {quantile(ts, 0.8) * 1e3:.2f}", f"{m / ref:.3f}"])
    print(f"DualPipeV, {args.ranks} ranks, {args.chunks} micro-batches, gloo on CPU, torch {torch.__version__}, "
          f"{args.steps} timed steps (median of the slowest rank per step)")
    print(table(["size", "runtime", "median step ms", "p20 - p80 ms", "ratio vs torch, same schedule"], rows))


if __name__ == "__main__":
    main()
