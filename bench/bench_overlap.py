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

With ``--gpu``: one GPU, for each communication SM budget in ``--sms``: dispatches of a one-rank
``EPBuffer`` (DeepSeek-V3's per-rank shape; its kernels copy rows on the communication stream
with ``num_comm_sms`` programs) beside a grouped GEMM confined to the other SMs
(``sm_partition``): each one's time alone and together, and the slowdowns; ``--quick``
takes 5 runs per figure instead of 10; ``--json OUT.json`` writes them; ``--cpu-smoke`` runs
the same code at tiny sizes on CPU.

    python bench/bench_overlap.py --gpu [--sms 8 16 20 24 32 66] [--quick] [--json OUT.json]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import timedelta

if "--cpu-smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (Steps, environment, init_single_group, median, quantile, spawn_ranks, table,  # noqa: E402
                     watchdog, write_json)


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


def _concurrent_ms(dev, exchanges, gemms, iters: int):
    """Medians (exchange ms, GEMM ms) of ``exchanges()`` and ``gemms()`` started together: the exchanges
    driven from a side stream (their kernels on the communication stream), the GEMMs on the current
    stream, both timed from one start event. ``exchanges`` or ``gemms`` may be None (alone). On CPU
    the two run one after the other, wall-clock."""
    ex_ms, gm_ms = [], []
    for _ in range(iters):
        if dev.type != "cuda":
            t0 = time.perf_counter()
            if exchanges:
                exchanges()
            t1 = time.perf_counter()
            if gemms:
                gemms()
            ex_ms.append((t1 - t0) * 1e3)
            gm_ms.append((time.perf_counter() - t1) * 1e3)
            continue
        side = torch.cuda.Stream(device=dev)
        start = torch.cuda.Event(enable_timing=True)
        ex_end, gm_end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(dev)
        start.record()
        side.wait_event(start)
        with torch.cuda.stream(side):
            if exchanges:
                exchanges()
            ex_end.record(side)
        if gemms:
            gemms()
        gm_end.record()
        torch.cuda.synchronize(dev)
        ex_ms.append(start.elapsed_time(ex_end))
        gm_ms.append(start.elapsed_time(gm_end))
    return median(ex_ms), median(gm_ms)


def run_gpu(args) -> dict:
    """One GPU: dispatches of a one-rank EPBuffer with ``num_comm_sms`` programs on the communication
    stream, beside a grouped GEMM that leaves those SMs (``sm_partition``); each one's time alone and
    together, per budget."""
    from dualpipe_ext.moe import EPBuffer
    from dualpipe_ext.moe.grouped_mm import grouped_mm, pick_backend
    from dualpipe_ext.sm_budget import sm_partition

    smoke = args.cpu_smoke
    dev = torch.device("cpu") if smoke else torch.device("cuda", 0)
    if not smoke:
        torch.cuda.set_device(dev)
    steps = Steps("bench_overlap")
    tokens, hidden, experts, topk = (16, 64, 16, 4) if smoke else (4096, 7168, 256, 8)
    rows_g, n_out, groups = (64, 32, 2) if smoke else (args.gemm_rows, 4096, 8)
    budgets = [1, 2] if smoke else args.sms
    iters = 2 if smoke else (5 if args.quick else 10)
    dtype = torch.float32 if smoke else torch.bfloat16
    with steps("process group and inputs"):
        init_single_group()
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(tokens, hidden, device=dev, generator=g).to(torch.bfloat16)
        idx = torch.rand(tokens, experts, device=dev, generator=g).argsort(1)[:, :topk].contiguous()
        w = torch.rand(idx.shape, device=dev, generator=g)
        gx = torch.randn(rows_g, hidden, device=dev, generator=g).to(dtype)
        gw = (torch.randn(groups, n_out, hidden, device=dev, generator=g) / 64).to(dtype)
        ends = torch.linspace(0, rows_g, groups + 1, device=dev)[1:].round().to(torch.int64)
        backend = pick_backend(gx, gw, args.gemm_backend)
        gemm_flops = 2 * rows_g * n_out * hidden
    with steps("grouped GEMM alone, all SMs"):
        gemm_full = _concurrent_ms(dev, None, lambda: grouped_mm(gx, gw, ends, backend), iters)[1]
    out = []
    for sms in budgets:
        with steps(f"num_comm_sms={sms}"):
            ep = EPBuffer(None, max_tokens=tokens, hidden=hidden, dtype=torch.bfloat16, num_sms=sms, max_topk=topk,
                          timeout_s=30.0, device=dev)
            try:
                one_ex = _concurrent_ms(dev, lambda: ep.dispatch(x, idx, w, experts), None, iters)[0]
                with sm_partition(dev, sms):
                    one_gemm = _concurrent_ms(dev, None, lambda: grouped_mm(gx, gw, ends, backend, num_comm_sms=sms),
                                              iters)[1]
                n_ex = max(1, min(200, round(one_gemm / max(one_ex, 1e-6))))  # exchanges as long as one GEMM

                def exchanges():
                    for _ in range(n_ex):
                        ep.dispatch(x, idx, w, experts)

                def gemm():
                    with sm_partition(dev, sms):
                        grouped_mm(gx, gw, ends, backend, num_comm_sms=sms)

                ex_alone = _concurrent_ms(dev, exchanges, None, iters)[0]
                gemm_alone = _concurrent_ms(dev, None, gemm, iters)[1]
                ex_both, gemm_both = _concurrent_ms(dev, exchanges, gemm, iters)
            finally:
                ep.close()
        out.append(dict(num_comm_sms=sms, exchanges=n_ex, exchange_alone_ms=ex_alone, exchange_together_ms=ex_both,
                        exchange_slowdown=ex_both / ex_alone, gemm_alone_ms=gemm_alone, gemm_together_ms=gemm_both,
                        gemm_slowdown=gemm_both / gemm_alone, gemm_partition_cost=gemm_alone / gemm_full,
                        gemm_tflops_together=gemm_flops / gemm_both / 1e9))
    return dict(benchmark="overlap_one_gpu", env=environment(dev), tokens=tokens, hidden=hidden, experts=experts,
                topk=topk, gemm=dict(rows=rows_g, n=n_out, k=hidden, groups=groups, backend=backend,
                                     dtype=str(dtype)), gemm_full_ms=gemm_full, iters=iters, rows=out)


def print_gpu(r: dict) -> None:
    gm = r["gemm"]
    print(f"{r['env']['device_name']}: one-rank EPBuffer dispatches ({r['tokens']} tokens x hidden {r['hidden']} "
          f"bf16, top-{r['topk']} of {r['experts']}) on the communication stream, repeated to last about one "
          f"grouped GEMM ([{gm['rows']}, {gm['k']}] x {gm['groups']} experts [{gm['n']}, {gm['k']}], {gm['backend']}) "
          f"on the SMs the budget leaves; GEMM alone on all SMs {r['gemm_full_ms']:.3f} ms; medians of "
          f"{r['iters']}; slowdown = together / alone")
    print(table(["num_comm_sms", "exchanges", "exchange alone ms", "together ms", "exchange slowdown",
                 "GEMM alone ms", "together ms", "GEMM slowdown", "GEMM partition cost"],
                [[x["num_comm_sms"], x["exchanges"], f"{x['exchange_alone_ms']:.3f}",
                  f"{x['exchange_together_ms']:.3f}", f"{x['exchange_slowdown']:.2f}", f"{x['gemm_alone_ms']:.3f}",
                  f"{x['gemm_together_ms']:.3f}", f"{x['gemm_slowdown']:.2f}", f"{x['gemm_partition_cost']:.2f}"]
                 for x in r["rows"]]))


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
    p.add_argument("--timeout-s", type=float, default=None, help="end the run after this long (default 1800 s, "
                   "--gpu 300 s)")
    p.add_argument("--gpu", action="store_true", help="one GPU: an exchange beside a grouped GEMM, per SM budget")
    p.add_argument("--cpu-smoke", action="store_true", help="the --gpu benchmark at tiny sizes on CPU (interpreter)")
    p.add_argument("--json", help="--gpu: write the figures here")
    p.add_argument("--sms", type=int, nargs="+", default=[8, 16, 20, 24, 32, 66], help="--gpu: SM budgets")
    p.add_argument("--gemm-rows", type=int, default=8192, help="--gpu: rows of the grouped GEMM")
    p.add_argument("--gemm-backend", default="auto", help="--gpu: grouped GEMM backend (auto, torch, triton, ...)")
    args = p.parse_args()
    if args.quick:
        args.pairs, args.steps = 5, 2
    if args.gpu or args.cpu_smoke:
        watchdog(args.timeout_s or 300)
        result = run_gpu(args)
        print_gpu(result)
        write_json(args.json, result)
        return
    r = spawn_ranks(_worker, 2, args, timeout_s=args.timeout_s or 1800)
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
