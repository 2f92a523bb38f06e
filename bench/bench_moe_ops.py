"""CPU benchmark of expert-parallel ``dispatch`` + ``combine`` over gloo.

Each of ``--ranks`` processes (127.0.0.1, one torch thread each) routes its tokens to
``--experts`` experts (top-``--topk``, uniform random choice, fp32 activations), runs
``dispatch``, takes the received rows as the expert output and runs ``combine`` (forward
only, PyTorch reference kernels). A step's time is the slowest rank's (ranks start each step
after a barrier); the table gives medians and p20-p80 over ``--steps`` timed steps after
``--warmup`` steps, and the collectives one dispatch and one combine issue.

    python bench/bench_moe_ops.py [--ranks 4] [--steps 15] [--tokens 256 4096] [--hidden 64 1024]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import timedelta

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import median, quantile, spawn_ranks, table  # noqa: E402

_COLLECTIVES = ("all_to_all_single", "all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "barrier")


def _count_collectives(dist, counts):
    """Wrap the torch.distributed collectives so each call adds one to ``counts[name]``."""
    for name in _COLLECTIVES:
        fn = getattr(dist, name, None)
        if fn is None:
            continue

        def wrapped(*a, _fn=fn, _name=name, **k):
            counts[_name] = counts.get(_name, 0) + 1
            return _fn(*a, **k)

        setattr(dist, name, wrapped)


def _worker(rank, world, port, args, queue):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    from dualpipe_ext import moe

    counts: dict = {}
    _count_collectives(dist, counts)
    rows = []
    try:
        for tokens in args.tokens:
            for hidden in args.hidden:
                g = torch.Generator().manual_seed(1000 * rank + tokens + hidden)
                x = torch.randn(tokens, hidden, generator=g)
                idx = torch.rand(tokens, args.experts, generator=g).argsort(dim=1)[:, :args.topk].contiguous()
                w = torch.rand(tokens, args.topk, generator=g)

                def step():
                    recv_x, _, _, handle = moe.dispatch(x, idx, w, args.experts)
                    moe.combine(recv_x, handle)

                times = []
                for i in range(args.warmup + args.steps):
                    dist.barrier()
                    before = dict(counts)
                    t0 = time.perf_counter()
                    step()
                    dt = time.perf_counter() - t0
                    if i == 0:
                        calls = {k: v - before.get(k, 0) for k, v in counts.items() if v - before.get(k, 0)}
                    if i >= args.warmup:
                        times.append(dt)
                slowest = torch.tensor(times, dtype=torch.float64)
                dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
                rows.append((tokens, hidden, [t * 1e3 for t in slowest.tolist()], calls))
    finally:
        dist.destroy_process_group()
    if rank == 0:
        queue.put(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 4096], help="tokens per rank")
    p.add_argument("--hidden", type=int, nargs="+", default=[64, 1024])
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args()

    rows = spawn_ranks(_worker, args.ranks, args)
    out = []
    for tokens, hidden, ms, calls in rows:
        calls_str = ", ".join(f"{k} {v}" for k, v in sorted(calls.items()))
        out.append([tokens, hidden, f"{median(ms):.2f}", f"{quantile(ms, 0.2):.2f} - {quantile(ms, 0.8):.2f}", calls_str])
    print(f"{args.ranks} gloo ranks, {args.experts} experts, top-{args.topk}, fp32, torch {torch.__version__}")
    print(table(["tokens/rank", "hidden", "median ms", "p20 - p80 ms", "collectives per dispatch+combine"], out))


if __name__ == "__main__":
    main()
