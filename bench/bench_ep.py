"""Expert parallelism on the device path (``EPBuffer``) against the collective path.

CPU (default without CUDA): ``--ranks`` gloo processes run one ``moe.MoE`` layer forward +
backward per step, alternating the two paths step by step (the same weights and tokens), and
the table gives medians and p20-p80 of the slowest rank's step and the ratio EPBuffer /
collective. EPBuffer's kernels run in Triton's interpreter here, the collective path is
gloo's all-to-all: the comparison says what the device path costs on CPU, not on a GPU.

    python bench/bench_ep.py [--ranks 4] [--tokens 64] [--hidden 64] [--steps 10]

GPU (``--gpu``, one process per visible GPU): dispatch and combine of DeepSeek-V3's setting
(4096 tokens per rank, hidden 7168, bf16, top-8 of 256 experts) through ``EPBuffer`` for
each SM budget in ``--sms``; GB/s counts the rows moved (each token once per destination
rank), against the same GPU's device-to-device copy of that many bytes; and a grouped GEMM's
time alone and beside a dispatch loop on the communication stream, per budget.

    python bench/bench_ep.py --gpu [--sms 8 16 20 24 32]
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


def _cuda_time(fn, iters: int) -> float:
    """Median ms of ``fn`` over ``iters`` runs, timed with CUDA events after a warm-up."""
    for _ in range(3):
        fn()
    ms = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ms.append(a.elapsed_time(b))
    return median(ms)


def _gpu_worker(rank, world, port, args, queue):
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=300), device_id=torch.device("cuda", rank))
    from dualpipe_ext import moe
    from dualpipe_ext.kernels.ep_exchange import compact_positions
    from dualpipe_ext.moe.grouped_mm import grouped_mm

    dev = torch.device("cuda", rank)
    g = torch.Generator(device=dev).manual_seed(rank)
    x = torch.randn(args.gpu_tokens, args.gpu_hidden, device=dev, dtype=torch.bfloat16, generator=g)
    idx = torch.rand(args.gpu_tokens, args.gpu_experts, device=dev, generator=g).argsort(1)[:, :8].contiguous()
    w = torch.rand(idx.shape, device=dev, generator=g)
    _, counts = compact_positions(idx, args.gpu_experts, world)
    moved = int(counts.sum()) * args.gpu_hidden * 2  # bytes of rows this rank sends
    src = torch.empty(moved // 2, dtype=torch.bfloat16, device=dev)
    dst = torch.empty_like(src)
    copy_ms = _cuda_time(lambda: dst.copy_(src), 20)
    # a grouped GEMM the size of one expert layer's up projection on this rank's tokens
    local = args.gpu_experts // world
    gx = torch.randn(args.gpu_tokens * 8 // world, args.gpu_hidden, device=dev, dtype=torch.bfloat16)
    gw = torch.randn(local, 2 * 2048, args.gpu_hidden, device=dev, dtype=torch.bfloat16) / 100
    ends = torch.linspace(0, gx.shape[0], local + 1, device=dev)[1:].round().to(torch.int64)
    gemm_alone = _cuda_time(lambda: grouped_mm(gx, gw, ends), 20)
    gemm_flops = 2 * gx.shape[0] * gw.shape[1] * gw.shape[2]
    rows = []
    for sms in args.sms:
        ep = moe.EPBuffer(None, max_tokens=args.gpu_tokens, hidden=args.gpu_hidden, dtype=torch.bfloat16, num_sms=sms)

        def dispatch():
            return ep.dispatch(x, idx, w, args.gpu_experts)

        recv_x, _, _, handle = dispatch()
        d_ms = _cuda_time(lambda: dispatch(), args.iters)
        c_ms = _cuda_time(lambda: ep.combine(recv_x, handle), args.iters)
        under = []
        for _ in range(args.iters):  # the GEMM on the compute stream while a dispatch runs on the comm stream
            pending = ep.dispatch(x, idx, w, args.gpu_experts, async_op=True)
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            grouped_mm(gx, gw, ends)
            b.record()
            pending.wait()
            torch.cuda.synchronize()
            under.append(a.elapsed_time(b))
        rows.append((sms, moved / d_ms / 1e6, moved / c_ms / 1e6, median(under)))
        ep.close()
    dist.destroy_process_group()
    if rank == 0:
        queue.put(dict(world=world, name=torch.cuda.get_device_name(dev), copy_gbs=2 * moved / copy_ms / 1e6,
                       moved=moved, gemm_ms=gemm_alone, gemm_tflops=gemm_flops / gemm_alone / 1e9, rows=rows))


def run_gpu(args) -> None:
    world = torch.cuda.device_count()
    r = spawn_ranks(_gpu_worker, world, args)
    print(f"EPBuffer on {r['world']} x {r['name']}, {args.gpu_tokens} tokens x hidden {args.gpu_hidden} bf16 per rank, "
          f"top-8 of {args.gpu_experts} experts; {r['moved'] / 1e6:.1f} MB of rows sent per rank; device copy "
          f"(read + write) {r['copy_gbs']:.0f} GB/s; grouped GEMM alone {r['gemm_ms']:.3f} ms "
          f"({r['gemm_tflops']:.0f} TFLOP/s)")
    out = [[sms, f"{d:.0f}", f"{d / (r['copy_gbs'] / 2) * 100:.0f} %", f"{c:.0f}", f"{gemm:.3f}",
            f"{gemm / r['gemm_ms']:.2f}"] for sms, d, c, gemm in r["rows"]]
    print(table(["num_sms", "dispatch GB/s", "of copy (one way)", "combine GB/s", "GEMM during dispatch ms",
                 "slowdown"], out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true", help="the GPU benchmark (CUDA, NCCL)")
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--sms", type=int, nargs="+", default=[8, 16, 20, 24, 32])
    p.add_argument("--gpu-tokens", type=int, default=4096)
    p.add_argument("--gpu-hidden", type=int, default=7168)
    p.add_argument("--gpu-experts", type=int, default=256)
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args()
    if args.gpu:
        run_gpu(args)
    else:
        run_cpu(args)


if __name__ == "__main__":
    main()
