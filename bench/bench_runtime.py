"""Step time of the dualpipe_ext runtime beside deepseek-ai/DualPipe and torch.distributed.pipelining.

All run DualPipeV over the same stage modules (two Linear+GELU blocks per stage), ranks and
micro-batches, on CPU with gloo and one torch thread per rank. The reference is imported from
a checkout given with ``--reference DIR`` (deepseek-ai/DualPipe, unchanged on disk) and pointed
at the CPU in this process only: its receive buffers are allocated on the CPU and its device
check accepts CPU stages. torch's own ``ScheduleDualPipeV`` runs beside them.

The machine may be shared and noisy, so the runtimes are timed in interleaved rounds: a round
is ``--steps`` steps of every runtime, one step of each in turn (the order rotating from step
to step), a step's time is the slowest rank's, and a round's figure is the median of its steps. The table
gives the median over rounds, the range of the rounds' medians and, per round, the ratio to
the reference of that round.

    python bench/bench_runtime.py --reference /path/to/DualPipe --configs 2x64,2x512,4x64

``--profile RUNTIME`` instead runs ``--steps`` steps of one runtime ("ours", "reference") under
``cProfile`` on rank 0 of the first configuration and prints the functions that took longest,
per step.
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
from harness import median, table  # noqa: E402

REFERENCE = "deepseek DualPipeV"
TORCH = "torch ScheduleDualPipeV"


def make_stage(hidden: int) -> nn.Module:
    """Two Linear+GELU blocks."""
    return nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU())


def mse(out, target):
    return F.mse_loss(out, target)


def _load_reference(path: str):
    """deepseek-ai/DualPipe's DualPipeV from a checkout, pointed at the CPU (in this process only)."""
    sys.path.insert(0, os.path.abspath(path))
    import dualpipe
    import dualpipe.comm as ref_comm

    def cpu_buffers():
        return [torch.empty(s, dtype=ref_comm.TENSOR_DTYPE, requires_grad=True) for s in ref_comm.TENSOR_SHAPES]

    ref_comm.build_from_tensor_shapes = cpu_buffers
    torch.cuda.current_device = lambda: "cpu"  # its constructor checks the stages' device against this
    return dualpipe


def _runners(rank, world, args, hidden):
    from torch.distributed.pipelining import PipelineStage, ScheduleDualPipeV

    from dualpipe_ext import DualPipeV, RuntimeConfig, set_p2p_tensor_dtype, set_p2p_tensor_shapes

    torch.manual_seed(0)
    full = [make_stage(hidden) for _ in range(2 * world)]
    local = [full[rank], full[2 * world - 1 - rank]]
    x = torch.randn(args.chunks * args.micro_batch, hidden)
    y = torch.randn(args.chunks * args.micro_batch, hidden)
    set_p2p_tensor_shapes([(args.micro_batch, hidden)])
    set_p2p_tensor_dtype(torch.float32)
    runners = {}

    def pipeline_runner(pipe):
        def run():
            if rank == 0:
                pipe.step(x, num_chunks=args.chunks, criterion=mse, labels=[y])
            else:
                pipe.step(num_chunks=args.chunks)
        return run

    runners["ours"] = pipeline_runner(DualPipeV(copy.deepcopy(local)))
    if args.variants:
        runners["ours, no error agreement"] = pipeline_runner(
            DualPipeV(copy.deepcopy(local), config=RuntimeConfig(check_errors=False)))
        runners["ours, recording on"] = pipeline_runner(DualPipeV(copy.deepcopy(local),
                                                                  config=RuntimeConfig(record=True)))
    if args.reference:
        ref = _load_reference(args.reference)
        ref.set_p2p_tensor_shapes([(args.micro_batch, hidden)])
        ref.set_p2p_tensor_dtype(torch.float32)
        runners[REFERENCE] = pipeline_runner(ref.DualPipeV(copy.deepcopy(local)))
    if not args.no_torch:
        mods = copy.deepcopy(local)
        stages = [PipelineStage(mods[0], rank, 2 * world, torch.device("cpu")),
                  PipelineStage(mods[1], 2 * world - 1 - rank, 2 * world, torch.device("cpu"))]
        sched = ScheduleDualPipeV(stages, n_microbatches=args.chunks, loss_fn=mse, scale_grads=False)

        def run_torch():
            if rank == 0:
                sched.step(x, target=y, losses=[])
            else:
                sched.step()
        runners[TORCH] = run_torch
    return runners


def _worker(rank, world, args, hidden):
    runners = _runners(rank, world, args, hidden)
    names = list(runners)
    for _ in range(args.warmup):
        for name in names:
            runners[name]()
    rounds = {n: [] for n in names}  # per runner: the median step of each round
    for r in range(args.rounds):
        times = {n: [] for n in names}
        for i in range(args.steps):
            k = (r + i) % len(names)
            for name in names[k:] + names[:k]:
                dist.barrier()
                t0 = time.perf_counter()
                runners[name]()
                dt = torch.tensor([time.perf_counter() - t0])
                dist.all_reduce(dt, op=dist.ReduceOp.MAX)
                times[name].append(dt.item())
        for name in names:
            rounds[name].append(median(times[name]))
    return rounds


def _profiled(rank, world, args, hidden):
    """``args.steps`` steps of one runtime, rank 0 under cProfile: (median step s, rows per function)."""
    import cProfile
    import pstats

    runners = _runners(rank, world, args, hidden)
    run = runners[REFERENCE if args.profile == "reference" else "ours"]
    for _ in range(args.warmup):
        run()
    dist.barrier()
    prof, times = cProfile.Profile(), []
    prof.enable()
    for _ in range(args.steps):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    prof.disable()
    stats = pstats.Stats(prof).stats
    rows = sorted(((tt, nc, f"{os.path.basename(f)}:{ln}({fn})" if ln else fn)
                   for (f, ln, fn), (_, nc, tt, _, _) in stats.items()), reverse=True)[:args.top]
    return median(times), rows


def _print_profile(args) -> None:
    ranks, hidden = (int(v) for v in args.configs.split(",")[0].split("x"))
    step, rows = run_ranks(_profiled, ranks, args, hidden, timeout_s=1800)[0]
    print(f"{args.profile}, {ranks} ranks, hidden {hidden}: rank 0, {args.steps} steps under cProfile, median step "
          f"{step * 1e3:.2f} ms; torch {torch.__version__}")
    print(table(["function", "calls per step", "ms per step (own time)", "us per call"],
                [[name, f"{n / args.steps:g}", f"{t / args.steps * 1e3:.3f}", f"{t / n * 1e6:.0f}"]
                 for t, n, name in rows]))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference", default=None, help="a checkout of deepseek-ai/DualPipe to time beside ours")
    p.add_argument("--configs", default="2x64,2x512,4x64", help="RANKSxHIDDEN, comma-separated")
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=4, help="rows per micro-batch")
    p.add_argument("--steps", type=int, default=10, help="timed steps per runtime and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--variants", action="store_true", help="also ours without error agreement and with recording")
    p.add_argument("--no-torch", action="store_true", help="leave out torch's ScheduleDualPipeV")
    p.add_argument("--profile", choices=["ours", "reference"], default=None,
                   help="profile one runtime on rank 0 instead of timing them side by side")
    p.add_argument("--top", type=int, default=15, help="with --profile: how many functions to list")
    args = p.parse_args()
    if args.profile:
        if args.profile == "reference" and not args.reference:
            p.error("--profile reference needs --reference DIR")
        args.variants, args.no_torch = False, True
        _print_profile(args)
        return
    rows = []
    for config in args.configs.split(","):
        ranks, hidden = (int(v) for v in config.split("x"))
        rounds = run_ranks(_worker, ranks, args, hidden, timeout_s=1800)[0]
        base = REFERENCE if REFERENCE in rounds else TORCH if TORCH in rounds else "ours"
        for name, ms in rounds.items():
            per_round = [m / b for m, b in zip(ms, rounds[base])]
            rows.append([f"{ranks} ranks, hidden {hidden}", name, f"{median(ms) * 1e3:.2f}",
                         f"{min(ms) * 1e3:.2f} - {max(ms) * 1e3:.2f}", f"{median(per_round):.2f}",
                         " ".join(f"{v:.2f}" for v in per_round)])
        print(f"done {config}", file=sys.stderr, flush=True)
    print(f"DualPipeV, {args.chunks} micro-batches of {args.micro_batch} rows, two Linear+GELU blocks per stage, "
          f"gloo on CPU, one thread per rank, torch {torch.__version__}; {args.rounds} interleaved rounds of "
          f"{args.steps} steps (a step: the slowest rank)")
    print(table(["config", "runtime", "median of round medians, ms", "rounds' range, ms", "ratio vs reference",
                 "ratio per round"], rows))


if __name__ == "__main__":
    main()
