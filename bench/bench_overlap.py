"""CPU benchmark of the overlap engine: one forward+backward pair, overlapped vs sequential.

Two gloo processes on 127.0.0.1 (one torch thread each), expert parallelism over both, a
pair of stages of ``--layers`` component-split MoE blocks. Every all-to-all of the block is
made to take at least the injected latency (``OverlapConfig.inject_latency_s``), a stand-in
for a real interconnect. Sequential: forward of chunk 0, then backward of chunk 1 through the
same components, each exchange waited at once; overlapped: the engine's component plan.
A pair's time is the slowest rank's (ranks start each pair after a barrier); medians and
p20-p80 over ``--pairs`` timed pairs after 2 warm-up pairs, the two modes alternating.

    python bench/bench_overlap.py [--latency-ms 0 5 20] [--layers 2] [--pairs 15]
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


def _pair_times(rank, args, latency_s, ep):
    import torch.distributed as dist

    from dualpipe_ext.moe import MoEConfig
    from dualpipe_ext.overlap import BlockConfig, OverlapConfig, OverlappedMoEStage

    cfg = BlockConfig(MoEConfig(hidden=args.hidden, moe_intermediate=args.hidden * 2, num_experts=8, topk=2,
                                num_shared_experts=1), num_heads=4)
    over = OverlapConfig(inject_latency_s=latency_s)
    torch.manual_seed(rank)
    st0, st1 = (OverlappedMoEStage(cfg, args.layers, ep, over) for _ in range(2))
    x = torch.randn(args.batch, args.seq, args.hidden)
    times = {"sequential": [], "overlapped": []}
    for i in range(2 + args.pairs):
        for mode in ("sequential", "overlapped"):
            out1 = st1(x.clone().requires_grad_())
            grad = torch.ones_like(out1)
            dist.barrier()
            t0 = time.perf_counter()
            if mode == "sequential":
                st0(x)
                torch.autograd.backward(out1, grad)
            else:
                OverlappedMoEStage.overlapped_forward_backward(st0, [x], None, [], st1, None, [out1], [grad])
            dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            if i >= 2:
                times[mode].append(dt.item() * 1e3)
    return times


def _worker(rank, world, port, args, queue):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    ep = dist.new_group(list(range(world)))
    rows = []
    for ms in args.latency_ms:
        t = _pair_times(rank, args, ms / 1e3, ep)
        rows.append((ms, t))
    if rank == 0:
        queue.put(rows)
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--latency-ms", type=float, nargs="+", default=[0, 5, 20])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--pairs", type=int, default=15)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--timeout-s", type=float, default=600)
    args = p.parse_args()
    rows = spawn_ranks(_worker, 2, args, timeout_s=args.timeout_s)
    out = []
    for ms, t in rows:
        s, o = median(t["sequential"]), median(t["overlapped"])
        out.append([f"{ms:g}", 4 * args.layers, f"{s:.1f} ({quantile(t['sequential'], .2):.1f}-{quantile(t['sequential'], .8):.1f})",
                    f"{o:.1f} ({quantile(t['overlapped'], .2):.1f}-{quantile(t['overlapped'], .8):.1f})", f"{o / s:.2f}"])
    print(f"2 gloo ranks, {args.layers} layers, tokens/rank {args.batch}x{args.seq}, hidden {args.hidden}, fp32, "
          f"{args.pairs} pairs")
    print(table(["injected latency ms", "delayed exchanges per pair", "sequential ms (p20-p80)", "overlapped ms (p20-p80)",
                 "overlapped / sequential"], out))


if __name__ == "__main__":
    main()
