"""Expert parallelism on the device path (``EPBuffer``) against the collective path.

CPU (default without CUDA): ``--ranks`` gloo processes run one ``moe.MoE`` layer forward +
backward per step, alternating the two paths step by step (the same weights and tokens), and
the table gives medians and p20-p80 of the slowest rank's step and the ratio EPBuffer /
collective. EPBuffer's kernels run in Triton's interpreter here, the collective path is
gloo's all-to-all: the comparison says what the device path costs on CPU, not on a GPU.

    python bench/bench_ep.py [--ranks 4] [--tokens 64] [--hidden 64] [--steps 10]

GPU (``--gpu``, one process on GPU 0): dispatch and combine of DeepSeek-V3's per-rank shape
(4096 tokens, hidden 7168, bf16, top-8 of 256 experts) through a one-rank ``EPBuffer`` for
each SM budget in ``--sms``, timed by ``triton.testing.do_bench`` (medians). With one rank
every token's row goes once to the rank itself: the kernels read it and write it into the
buffer through the peer table, so GB/s (payload bytes / time) says how fast the kernels move
local memory at each budget, against a plain device copy of the same bytes on all SMs; it
does not measure NVLink. Each budget first checks the rows bit for bit.

    python bench/bench_ep.py --gpu [--sms 8 16 20 24 32 66 132] [--quick] [--json OUT.json]
    python bench/bench_ep.py --cpu-smoke     # the same code at tiny sizes, kernels interpreted
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
from harness import (Steps, bench_ms, environment, init_single_group, median, quantile, spawn_ranks,  # noqa: E402
                     table, watchdog, write_json)


def _cpu_worker(rank, world, port, args, queue):
    os.environ.update(OMP_NUM_THREADS="1", TRITON_INTERPRET="1", GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))
    from dualpipe_ext import moe

    cfg = moe.MoEConfig(hidden=args.hidden, moe_intermediate=args.hidden, num_experts=args.experts, topk=args.topk)
    ep = moe.EPBuffer(None, max_tokens=args.tokens, hidden=args.hidden, dtype=torch.float32, max_topk=args.topk)
    torch.manual_seed(0)
    layers = {"collective": moe.MoE(cfg), "EPBuffer": moe.MoE(cfg, ep=ep)}
    layers["EPBuffer"].load_state_dict(layers["collective"].state_dict())
    x = torch.randn(args.tokens, args.hidden, generator=torch.Generator().manual_seed(rank))
    times = {k: [] for k in layers}
    for i in range(args.warmup + args.steps):
        for name, layer in (layers.items() if i % 2 == 0 else reversed(list(layers.items()))):
            dist.barrier()
            t0 = time.perf_counter()
            layer(x.requires_grad_(True)).sum().backward()
            dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            if i >= args.warmup:
                times[name].append(dt.item() * 1e3)
    ep.close()
    dist.destroy_process_group()
    if rank == 0:
        queue.put(times)


def run_cpu(args) -> None:
    times = spawn_ranks(_cpu_worker, args.ranks, args)
    base = median(times["collective"])
    rows = [[name, f"{median(ms):.1f}", f"{quantile(ms, 0.2):.1f} - {quantile(ms, 0.8):.1f}", f"{median(ms) / base:.2f}"]
            for name, ms in times.items()]
    print(f"MoE layer forward+backward, {args.ranks} gloo ranks, {args.tokens} tokens x hidden {args.hidden} per rank, "
          f"{args.experts} experts, top-{args.topk}, fp32, torch {torch.__version__}, {args.steps} steps alternating")
    print(table(["path", "median ms", "p20 - p80 ms", "ratio to collective"], rows))


def run_exchange(args) -> dict:
    """dispatch and combine through one rank's ``EPBuffer`` for each SM budget, against a device copy."""
    smoke = args.cpu_smoke
    dev = torch.device("cpu") if smoke else torch.device("cuda", 0)
    if not smoke:
        torch.cuda.set_device(dev)
    tokens, hidden, experts, topk = (16, 64, 16, 4) if smoke else (args.gpu_tokens, args.gpu_hidden,
                                                                   args.gpu_experts, 8)
    budgets = [1, 2] if smoke else args.sms
    steps = Steps("bench_ep")
    with steps("process group and inputs"):
        init_single_group()
        from dualpipe_ext import moe

        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(tokens, hidden, device=dev, generator=g).to(torch.bfloat16)
        idx = torch.rand(tokens, experts, device=dev, generator=g).argsort(1)[:, :topk].contiguous()
        w = torch.rand(idx.shape, device=dev, generator=g)
        payload = tokens * hidden * x.element_size()  # one rank: every token's row once, each way
    with steps("device copy of the same bytes, all SMs"):
        src = torch.empty(payload, dtype=torch.uint8, device=dev)
        dst = torch.empty_like(src)
        copy_ms = bench_ms(lambda: dst.copy_(src), dev, args.quick)
    rows = []
    for sms in budgets:
        with steps(f"EPBuffer num_sms={sms}"):
            ep = moe.EPBuffer(None, max_tokens=tokens, hidden=hidden, dtype=torch.bfloat16, num_sms=sms,
                              max_topk=topk, timeout_s=30.0, device=dev)
            try:
                recv_x, _, _, handle = ep.dispatch(x, idx, w, experts)
                if not (torch.equal(recv_x[:tokens], x) and torch.equal(ep.combine(recv_x, handle), x)):
                    raise AssertionError(f"num_sms={sms}: the dispatched or combined rows differ from the tokens")
                d_ms = bench_ms(lambda: ep.dispatch(x, idx, w, experts), dev, args.quick)
                c_ms = bench_ms(lambda: ep.combine(recv_x, handle), dev, args.quick)
            finally:
                ep.close()
        rows.append(dict(num_sms=sms, dispatch_ms=d_ms, dispatch_gbs=payload / d_ms / 1e6, combine_ms=c_ms,
                         combine_gbs=payload / c_ms / 1e6, dispatch_of_copy=copy_ms / d_ms,
                         combine_of_copy=copy_ms / c_ms))
    return dict(benchmark="exchange", env=environment(dev), world=1, tokens=tokens, hidden=hidden, experts=experts,
                topk=topk, dtype="bfloat16", payload_bytes=payload, copy_ms=copy_ms,
                copy_gbs=payload / copy_ms / 1e6, rows=rows)


def print_exchange(r: dict) -> None:
    print(f"EPBuffer, one rank on {r['env']['device_name']}: {r['tokens']} tokens x hidden {r['hidden']} bf16, "
          f"top-{r['topk']} of {r['experts']} experts; {r['payload_bytes'] / 1e6:.1f} MB of rows each way. One "
          f"rank sends every row to itself through the peer table: this measures the kernels' read + write of "
          f"local memory per SM budget, not an interconnect. GB/s = payload bytes / time, the copy likewise "
          f"({r['copy_gbs']:.0f} GB/s, {r['copy_ms']:.3f} ms, all SMs)")
    print(table(["num_sms", "dispatch ms", "dispatch GB/s", "of copy", "combine ms", "combine GB/s", "of copy"],
                [[x["num_sms"], f"{x['dispatch_ms']:.3f}", f"{x['dispatch_gbs']:.0f}",
                  f"{x['dispatch_of_copy'] * 100:.0f} %", f"{x['combine_ms']:.3f}", f"{x['combine_gbs']:.0f}",
                  f"{x['combine_of_copy'] * 100:.0f} %"] for x in r["rows"]]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true", help="the exchange kernels on one GPU, per SM budget")
    p.add_argument("--cpu-smoke", action="store_true", help="the --gpu benchmark at tiny sizes on CPU (interpreter)")
    p.add_argument("--quick", action="store_true", help="--gpu: shorter timing windows")
    p.add_argument("--json", help="--gpu: write the figures here")
    p.add_argument("--timeout-s", type=float, default=300, help="--gpu: end the run (with stacks) after this long")
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--sms", type=int, nargs="+", default=[8, 16, 20, 24, 32, 66, 132])
    p.add_argument("--gpu-tokens", type=int, default=4096)
    p.add_argument("--gpu-hidden", type=int, default=7168)
    p.add_argument("--gpu-experts", type=int, default=256)
    args = p.parse_args()
    if args.gpu or args.cpu_smoke:
        watchdog(args.timeout_s)
        result = run_exchange(args)
        print_exchange(result)
        write_json(args.json, result)
    else:
        run_cpu(args)


if __name__ == "__main__":
    main()
