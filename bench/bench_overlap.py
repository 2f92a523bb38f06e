"""How much communication the overlap engine hides, on CPU with injected latency.

Two gloo processes on 127.0.0.1 (one torch thread each), expert parallelism over both,
component-split MoE stages of ``--layers`` layers. Every exchange is made to take at least
the injected latency (``OverlapConfig.inject_latency_s``), a stand-in for a slow
interconnect. The latency is set from D/C, the ratio of the pair's total communication to
its computation: latency per exchange = D/C x (sequential pair time without latency) /
(exchanges per pair).

1. One forward+backward pair: sequential (``MoEStage``: every exchange waited at once) with and
   without latency, and overlapped (``OverlappedMoEStage``) with it, the three alternating;
   hidden fraction = (sequential - overlapped) / (sequential - sequential without latency),
   medians; "latency absorbed" = 1 - (overlapped - overlapped without latency) / (sequential -
   sequential without latency), which does not credit the engine for also hiding gloo's own
   transfer time (the injected latency is a floor under each exchange, not an addition).
2. A whole DualPipe step (PP=2, EP over the same two ranks) at D/C=1: the communication left
   exposed (step time with latency - without) with plain stages, with the engine, and with
   the engine plus two-batch overlap of the chunks that run alone.

    python bench/bench_overlap.py [--ratios 0.25 0.5 1 2] [--layers 2] [--pairs 9] [--quick]

With ``--gpu``: one GPU, the exchanges through an ``EPBuffer`` (one rank: its kernels copy on
the communication stream), a pair sequential and overlapped for each SM budget in ``--sms``.
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


def _config(args):
    from dualpipe_ext.moe import MoEConfig
    from dualpipe_ext.overlap import BlockConfig

    return BlockConfig(MoEConfig(hidden=args.hidden, moe_intermediate=args.hidden * 2, num_experts=8, topk=2,
                                 num_shared_experts=1), num_heads=4)


def _timed(fn, group) -> float:
    import torch.distributed as dist

    dist.barrier(group)
    t0 = time.perf_counter()
    fn()
    dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    dist.all_reduce(dt, op=dist.ReduceOp.MAX, group=group)
    return dt.item() * 1e3


def _pair_times(rank, args, latency_s, group, pairs):
    """Pair times (ms) of four alternating modes: sequential and overlapped, each without latency and
    with ``latency_s`` per exchange."""
    from dualpipe_ext.overlap import MoEStage, OverlapConfig, OverlappedMoEStage

    modes = {"sequential, no latency": (MoEStage, 0.0), "sequential": (MoEStage, latency_s),
             "overlapped, no latency": (OverlappedMoEStage, 0.0), "overlapped": (OverlappedMoEStage, latency_s)}
    stages = {}
    for name, (cls, lat) in modes.items():
        torch.manual_seed(rank)
        stages[name] = [cls(_config(args), args.layers, group, OverlapConfig(inject_latency_s=lat)) for _ in range(2)]
    x = torch.randn(args.batch, args.seq, args.hidden)
    times = {name: [] for name in modes}
    order = list(modes)
    for i in range(1 + pairs):
        for name in order[i % len(order):] + order[:i % len(order)]:
            st0, st1 = stages[name]
            out1 = st1(x.clone().requires_grad_())
            grad = torch.ones_like(out1)

            def pair():
                if isinstance(st0, OverlappedMoEStage):
                    OverlappedMoEStage.overlapped_forward_backward(st0, [x], None, [], st1, None, [out1], [grad])
                else:
                    st0(x)
                    torch.autograd.backward(out1, grad)

            dt = _timed(pair, group)
            if i >= 1:
                times[name].append(dt)
    return times, stages["overlapped"][0].run_spec(False)


def _step_time(rank, args, latency_s, group, variant, steps):
    from dualpipe_ext import DualPipe, RuntimeConfig, set_p2p_tensor_dtype, set_p2p_tensor_shapes
    from dualpipe_ext.overlap import MoEStage, OverlapConfig, OverlappedMoEStage

    set_p2p_tensor_shapes([(args.batch, args.seq, args.hidden)])
    set_p2p_tensor_dtype(torch.float32)
    cls = MoEStage if variant == "plain stages" else OverlappedMoEStage
    cfg = OverlapConfig(inject_latency_s=latency_s, two_batch=variant.endswith("two-batch"))
    torch.manual_seed(rank)
    pipe = DualPipe([cls(_config(args), args.layers, group, cfg) for _ in range(2)],
                    config=RuntimeConfig(comm_timeout_s=600))
    x = torch.randn(args.batch * args.chunks // 2, args.seq, args.hidden)

    def step():
        pipe.step(x, num_chunks=args.chunks, criterion=lambda o, t: (o - t).pow(2).mean(), labels=[x])

    return median([_timed(step, group) for _ in range(1 + steps)][1:])


def _worker(rank, world, port, args, queue):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    import torch.distributed as dist

    from dualpipe_ext import _C
    from dualpipe_ext.overlap import component_plan

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))
    group = dist.new_group(list(range(world)))
    base, spec = _pair_times(rank, args, 0.0, group, max(3, args.pairs // 2))
    seq0 = median(base["sequential"])  # sets the latency of each D/C
    runs = [spec, _C.RunSpec(True, spec.num_layers, spec.prologue, spec.epilogue, spec.shared)]
    exchanges = sum(1 for s in component_plan(runs) if s.kind == _C.StepKind.ISSUE)
    rows = []
    for ratio in args.ratios:
        latency = ratio * seq0 / exchanges / 1e3
        rows.append((ratio, latency, _pair_times(rank, args, latency, group, args.pairs)[0]))
    steps = []
    if not args.no_step:
        step_latency = seq0 / exchanges / 1e3  # D/C = 1 for the pair
        for variant in ("plain stages", "engine", "engine + two-batch"):
            t0 = _step_time(rank, args, 0.0, group, variant, args.steps)
            t1 = _step_time(rank, args, step_latency, group, variant, args.steps)
            steps.append((variant, t0, t1))
    if rank == 0:
        queue.put(dict(rows=rows, seq0=seq0, exchanges=exchanges, steps=steps))
    dist.destroy_process_group()


def run_gpu(args) -> None:
    """One GPU: a pair of stages whose exchanges go through an EPBuffer (one rank: copies on the
    communication stream), sequential against overlapped, for each communication SM budget."""
    import torch.distributed as dist

    from dualpipe_ext.launch import free_port
    from dualpipe_ext.moe import EPBuffer, MoEConfig
    from dualpipe_ext.overlap import BlockConfig, MoEStage, OverlapConfig, OverlappedMoEStage

    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    hidden, seq, batch = args.gpu_hidden, args.gpu_seq, 2
    cfg = BlockConfig(MoEConfig(hidden=hidden, moe_intermediate=hidden // 2, num_experts=16, topk=4,
                                num_shared_experts=1), num_heads=16)
    rows = []
    for sms in args.sms:
        ep = EPBuffer(None, max_tokens=batch * seq, hidden=hidden, dtype=torch.bfloat16, max_topk=4, num_sms=sms,
                      device=dev)
        over = OverlapConfig(num_comm_sms=sms)
        times = {}
        for name, cls in (("sequential", MoEStage), ("overlapped", OverlappedMoEStage)):
            torch.manual_seed(0)
            st0, st1 = (cls(cfg, args.layers, overlap=over, ep=ep, device=dev, dtype=torch.bfloat16) for _ in range(2))
            x = torch.randn(batch, seq, hidden, device=dev, dtype=torch.bfloat16)
            ms = []
            for i in range(2 + args.pairs):
                out1 = st1(x.clone().requires_grad_())
                grad = torch.ones_like(out1)
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                if name == "sequential":
                    st0(x)
                    torch.autograd.backward(out1, grad)
                else:
                    OverlappedMoEStage.overlapped_forward_backward(st0, [x], None, [], st1, None, [out1], [grad])
                b.record()
                b.synchronize()
                if i >= 2:
                    ms.append(a.elapsed_time(b))
            times[name] = median(ms)
        rows.append([sms, f"{times['sequential']:.2f}", f"{times['overlapped']:.2f}",
                     f"{times['overlapped'] / times['sequential']:.2f}"])
        ep.close()
    print(f"{torch.cuda.get_device_name(dev)}: pair of {args.layers}-layer stages, {batch}x{seq} tokens, hidden "
          f"{hidden}, bf16, 16 experts top-4 + 1 shared, EPBuffer on one GPU, medians of {args.pairs} pairs")
    print(table(["num_comm_sms", "sequential ms", "overlapped ms", "overlapped / sequential"], rows))
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0], help="D/C values")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--pairs", type=int, default=9, help="timed pairs per mode and D/C")
    p.add_argument("--steps", type=int, default=3, help="timed DualPipe steps per variant")
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--no-step", action="store_true", help="skip the DualPipe step")
    p.add_argument("--quick", action="store_true", help="fewer repetitions (a few minutes)")
    p.add_argument("--timeout-s", type=float, default=1800)
    p.add_argument("--gpu", action="store_true", help="one GPU, EPBuffer, per communication SM budget")
    p.add_argument("--sms", type=int, nargs="+", default=[8, 16, 20, 24, 32], help="--gpu: SM budgets")
    p.add_argument("--gpu-hidden", type=int, default=2048)
    p.add_argument("--gpu-seq", type=int, default=2048)
    args = p.parse_args()
    if args.quick:
        args.pairs, args.steps = 5, 2
    if args.gpu:
        run_gpu(args)
        return
    r = spawn_ranks(_worker, 2, args, timeout_s=args.timeout_s)
    out, hidden_at = [], {}
    for ratio, latency, t in r["rows"]:
        s0, s, o0, o = (median(t[k]) for k in ("sequential, no latency", "sequential", "overlapped, no latency",
                                                "overlapped"))
        hidden = (s - o) / (s - s0)
        absorbed = 1 - (o - o0) / (s - s0)
        hidden_at[ratio] = hidden
        span = lambda k: f"{median(t[k]):.1f} ({quantile(t[k], .2):.1f}-{quantile(t[k], .8):.1f})"  # noqa: E731
        out.append([f"{ratio:g}", f"{latency * 1e3:.2f}", span("sequential, no latency"), span("sequential"),
                    span("overlapped, no latency"), span("overlapped"), f"{o / s:.2f}", f"{hidden * 100:.0f} %",
                    f"{absorbed * 100:.0f} %"])
    print(f"2 gloo ranks, EP over both, {args.layers} layers, tokens/rank {args.batch}x{args.seq}, hidden "
          f"{args.hidden}, fp32, {r['exchanges']} exchanges per pair, {args.pairs} pairs per mode (three modes "
          f"alternating), torch {torch.__version__}")
    print(table(["D/C", "latency ms", "sequential, no latency ms", "sequential ms", "overlapped, no latency ms",
                 "overlapped ms", "overlapped / sequential", "hidden", "latency absorbed"], out))
    if r["steps"]:
        print(f"\nDualPipe step, PP=2 x EP=2 over the same ranks, {args.chunks} chunks, D/C=1 per pair "
              f"(latency {r['seq0'] / r['exchanges']:.2f} ms per exchange), medians of {args.steps} steps")
        rows = [[v, f"{t0:.0f}", f"{t1:.0f}", f"{t1 - t0:.0f}"] for v, t0, t1 in r["steps"]]
        print(table(["stages", "step ms, no latency", "step ms, latency", "exposed ms"], rows))
    if 1.0 in hidden_at:
        print(f"hidden at D/C=1: {hidden_at[1.0] * 100:.0f} %")


if __name__ == "__main__":
    main()
