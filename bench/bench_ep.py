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
does not measure NVLink. Each budget first checks the rows bit for bit. Three views per budget:

- the whole call from the host (``ep.dispatch``/``ep.combine``: layout kernels, checks, launches), and
  the host's own time per call (its kernels queued behind a sleeping stream);
- the put and receive kernels alone (layout computed once; device time between CUDA events while
  the host has queued ahead, each kernel on its own and their sum), and again with row steps twice
  as wide (32 KiB of bf16 in flight per program and step instead of 16: does a program's speed
  depend on how many bytes it keeps in flight?);
- the whole call captured once in a CUDA graph (``dualpipe_ext.graphs.StepGraph``) and replayed:
  its device time without the host's.

and the FP8 dispatch (rows quantized to e4m3 + scales, fewer bytes) against bf16, eager and replayed.

    python bench/bench_ep.py --gpu [--sms 8 16 20 24 32 66 132] [--quick] [--json OUT.json]
    python bench/bench_ep.py --cpu-smoke     # the same code at tiny sizes, kernels interpreted
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import traceback
from datetime import timedelta

if "--cpu-smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (Steps, bench_ms, environment, host_ms, init_single_group, median, quantile,  # noqa: E402
                     spawn_ranks, stream_ms, table, watchdog, write_json)


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


WIDE_BASE = 512  # the kernels' default row step (ep_common._BLOCK_H), doubled for the 'wide' measurement


def _kernels_only(ep, x, idx, w, experts, handle, recv_y):
    """The exchange kernels of one dispatch and one combine without the host code around them: the
    layout (positions, counts) computed once here, outputs allocated once, the put and receive kernels
    launched on the current stream through the buffer's channel of slot 0 (nothing else in flight).
    Returns (dispatch put, dispatch receive, combine put, combine receive, outputs to check)."""
    kx = ep.kernels
    topk = idx.shape[1]
    pos, counts = kx.compact_positions(idx, experts, ep.world)
    cap, dev = ep.recv_capacity, ep.device
    recv_x = torch.empty(cap, ep.hidden, dtype=ep.dtype, device=dev)
    recv_idx = torch.empty(cap, topk, dtype=torch.int64, device=dev)
    recv_w = torch.empty(cap, topk, dtype=torch.float32, device=dev)
    recv_src = torch.empty(cap, dtype=torch.int64, device=dev)
    recv_count = torch.empty(ep.world, dtype=torch.int64, device=dev)
    out = torch.empty(x.shape[0], ep.hidden, dtype=ep.dtype, device=dev)
    out_count = torch.empty(ep.world, dtype=torch.int64, device=dev)
    ch = ep._exchanges.channel(0)
    fused = ch.fused_wait

    def d_put():
        kx.launch_put_dispatch(ch, x, pos, counts, (idx, w), experts, topk, 0)

    def d_recv():
        if not fused:  # the interpreter: the receive's wait is a launch of its own
            kx.launch_wait(ch, kx.DISPATCH, kx.DATA)
        kx.launch_recv_dispatch(ch, recv_x, (recv_idx, recv_w, recv_src), recv_count, topk)

    def c_put():
        kx.launch_put_combine(ch, recv_y, handle.recv_src, handle.recv_count, None, experts, topk, 0)

    def c_recv():
        if not fused:
            kx.launch_wait(ch, kx.COMBINE, kx.DATA)
        kx.launch_recv_combine(ch, out, handle.pos, None, out_count, experts, topk)

    return d_put, d_recv, c_put, c_recv, (recv_x, out)


@contextlib.contextmanager
def _row_step(block_h: int):
    """Within the block the row-moving loops of the exchange kernels step ``block_h`` elements of a row at a
    time (default 512: a 16 x 512 tile, 16 KiB of bf16 in flight per program and step)."""
    from dualpipe_ext.kernels import ep_common

    before, ep_common._BLOCK_H = ep_common._BLOCK_H, block_h
    try:
        yield before
    finally:
        ep_common._BLOCK_H = before


def _graph_ms(step, dev, quick, check):
    """Median ms of ``step`` captured once in a CUDA graph and replayed (eager on CPU); ``check`` tests the
    replay's outputs first."""
    from dualpipe_ext.graphs import StepGraph

    graph = StepGraph(step, dev)
    check(graph.replay())
    return bench_ms(graph.replay, dev, quick)


def run_exchange(args) -> dict:
    """dispatch and combine through one rank's ``EPBuffer`` for each SM budget, against a device copy:
    the whole call from the host, the put and receive kernels alone, the whole call replayed from a
    CUDA graph, and the FP8 dispatch (whole call and replayed)."""
    smoke = args.cpu_smoke
    dev = torch.device("cpu") if smoke else torch.device("cuda", 0)
    if not smoke:
        torch.cuda.set_device(dev)
    tokens, hidden, experts, topk = (16, 128, 16, 4) if smoke else (args.gpu_tokens, args.gpu_hidden,
                                                                    args.gpu_experts, 8)
    budgets = [1, 2] if smoke else args.sms
    wide = 2 * WIDE_BASE if not smoke else 64  # CPU: a row step narrower than the rows, to exercise it
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
    fp8_bytes = None
    rows = []
    for sms in budgets:
        row = dict(num_sms=sms)
        with steps(f"EPBuffer num_sms={sms}"):
            ep = moe.EPBuffer(None, max_tokens=tokens, hidden=hidden, dtype=torch.bfloat16, num_sms=sms,
                              max_topk=topk, timeout_s=5.0, device=dev)  # a healthy wait takes microseconds
            try:
                recv_x, _, _, handle = ep.dispatch(x, idx, w, experts)
                if not (torch.equal(recv_x[:tokens], x) and torch.equal(ep.combine(recv_x, handle), x)):
                    raise AssertionError(f"num_sms={sms}: the dispatched or combined rows differ from the tokens")
                row["dispatch_ms"] = bench_ms(lambda: ep.dispatch(x, idx, w, experts), dev, args.quick)
                row["combine_ms"] = bench_ms(lambda: ep.combine(recv_x, handle), dev, args.quick)
                # the host's own time per call (its kernels queued behind a sleeping stream)
                row["dispatch_host_only_ms"] = host_ms(lambda: ep.dispatch(x, idx, w, experts), dev)
                row["combine_host_only_ms"] = host_ms(lambda: ep.combine(recv_x, handle), dev)
                # the kernels alone: layout once, then put and receive back to back, device time only
                d_put, d_recv, c_put, c_recv, (k_x, k_out) = _kernels_only(ep, x, idx, w, experts, handle, recv_x)
                ms = stream_ms([d_put, d_recv, c_put, c_recv], dev)
                if not (torch.equal(k_x[:tokens], x) and torch.equal(k_out, x)):
                    raise AssertionError(f"num_sms={sms}: the exchange kernels alone moved other rows")
                row.update(dispatch_put_ms=ms[0], dispatch_recv_ms=ms[1], combine_put_ms=ms[2], combine_recv_ms=ms[3])
                row["dispatch_kernels_ms"], row["combine_kernels_ms"] = ms[0] + ms[1], ms[2] + ms[3]
                # the same kernels stepping twice as wide a tile: twice the bytes in flight per program
                with _row_step(wide):
                    ms = stream_ms([d_put, d_recv, c_put, c_recv], dev)
                    if not (torch.equal(k_x[:tokens], x) and torch.equal(k_out, x)):
                        raise AssertionError(f"num_sms={sms}: the exchange kernels with wide tiles moved other rows")
                row.update(dispatch_put_wide_ms=ms[0], dispatch_recv_wide_ms=ms[1], combine_put_wide_ms=ms[2],
                           combine_recv_wide_ms=ms[3])

                def same_rows(out):
                    if not torch.equal(out[0][:tokens], x):
                        raise AssertionError(f"num_sms={sms}: the replayed exchange moved other rows")

                row["dispatch_graph_ms"] = _graph_ms(lambda: ep.dispatch(x, idx, w, experts), dev, args.quick,
                                                     same_rows)
                row["combine_graph_ms"] = _graph_ms(lambda: (ep.combine(recv_x, handle),), dev, args.quick,
                                                    same_rows)
                # FP8: the rows cross as e4m3 + scales (quantized before the put, dequantized after the receive)
                fp8_bytes = tokens * ep.fp8_row_bytes
                want = ep.dispatch(x, idx, w, experts, fp8=True)[0][:tokens].clone()
                row["fp8_dispatch_ms"] = bench_ms(lambda: ep.dispatch(x, idx, w, experts, fp8=True), dev, args.quick)
                row["fp8_dispatch_host_only_ms"] = host_ms(lambda: ep.dispatch(x, idx, w, experts, fp8=True), dev)

                def same_fp8(out):
                    if not torch.equal(out[0][:tokens], want):
                        raise AssertionError(f"num_sms={sms}: the replayed FP8 dispatch differs from eager")

                row["fp8_dispatch_graph_ms"] = _graph_ms(lambda: ep.dispatch(x, idx, w, experts, fp8=True), dev,
                                                         args.quick, same_fp8)
            except Exception as e:  # noqa: BLE001 - the other budgets still run; the exit status says it failed
                traceback.print_exc()
                row["error"] = f"{type(e).__name__}: {e}"
            finally:
                ep.close()
        for key in [k for k in row if k.endswith("_ms") and "_host_only" not in k]:  # GB/s, fraction of the copy
            base = key[:-3]
            moved = fp8_bytes if base.startswith("fp8") else payload
            row[base + "_gbs"] = moved / row[key] / 1e6
            row[base + "_of_copy"] = copy_ms / row[key]
        rows.append(row)
        if args.json:  # what is measured so far, in case the run is stopped before the end
            write_json(args.json, dict(benchmark="exchange", partial=True, env=environment(dev), tokens=tokens,
                                       hidden=hidden, payload_bytes=payload, copy_ms=copy_ms, rows=rows))
    return dict(benchmark="exchange", env=environment(dev), world=1, tokens=tokens, hidden=hidden, experts=experts,
                topk=topk, dtype="bfloat16", row_step=WIDE_BASE, wide_row_step=wide, payload_bytes=payload,
                fp8_payload_bytes=fp8_bytes, copy_ms=copy_ms,
                copy_gbs=payload / copy_ms / 1e6, rows=rows)


# (column, key) of the tables: the whole call from the host, the kernels alone, the call replayed from a graph
_VIEWS = [("whole call", "dispatch", "combine"), ("kernels alone (put + receive)", "dispatch_kernels",
                                                  "combine_kernels"),
          ("CUDA graph replay", "dispatch_graph", "combine_graph")]


def print_exchange(r: dict) -> None:
    print(f"EPBuffer, one rank on {r['env']['device_name']}: {r['tokens']} tokens x hidden {r['hidden']} bf16, "
          f"top-{r['topk']} of {r['experts']} experts; {r['payload_bytes'] / 1e6:.1f} MB of rows each way. One "
          f"rank sends every row to itself through the peer table: this measures the kernels' read + write of "
          f"local memory per SM budget, not an interconnect. GB/s = payload bytes / time, the copy likewise "
          f"({r['copy_gbs']:.0f} GB/s, {r['copy_ms']:.3f} ms, all SMs). A put and a receive each move the "
          f"payload once, so put + receive at the copy's speed is 50 % of copy")
    ok = [x for x in r["rows"] if "error" not in x]
    for view, d, c in _VIEWS:
        print(f"\n{view}")
        print(table(["num_sms", "dispatch ms", "GB/s", "of copy", "combine ms", "GB/s", "of copy"],
                    [[x["num_sms"], f"{x[d + '_ms']:.3f}", f"{x[d + '_gbs']:.0f}", f"{x[d + '_of_copy'] * 100:.0f} %",
                      f"{x[c + '_ms']:.3f}", f"{x[c + '_gbs']:.0f}", f"{x[c + '_of_copy'] * 100:.0f} %"] for x in ok]))
    print(f"\nkernels alone, each (device time between events, the host queued ahead); GB/s of payload; "
          f"'wide': row steps of {r['wide_row_step']} elements instead of {r['row_step']}")
    kinds = ("dispatch_put", "dispatch_recv", "combine_put", "combine_recv")
    print(table(["num_sms"] + [f"{k.replace('_', ' ').replace('recv', 'receive')}{w}" for k in kinds
                               for w in ("", " wide")],
                [[x["num_sms"]] + [f"{x[k + w + '_ms']:.3f} ms, {x[k + w + '_gbs']:.0f}" for k in kinds
                                   for w in ("", "_wide")] for x in ok]))
    if r["fp8_payload_bytes"]:
        print(f"\nFP8 dispatch: {r['fp8_payload_bytes'] / 1e6:.1f} MB of packed rows (e4m3 + float32 scales, "
              f"padded to 16 bytes) against {r['payload_bytes'] / 1e6:.1f} MB of bf16; GB/s of the FP8 bytes")
        print(table(["num_sms", "bf16 ms", "fp8 ms", "fp8 GB/s", "bf16 / fp8", "bf16 replay ms", "fp8 replay ms",
                     "fp8 replay GB/s", "bf16 / fp8 replayed"],
                    [[x["num_sms"], f"{x['dispatch_ms']:.3f}", f"{x['fp8_dispatch_ms']:.3f}",
                      f"{x['fp8_dispatch_gbs']:.0f}", f"{x['dispatch_ms'] / x['fp8_dispatch_ms']:.2f}",
                      f"{x['dispatch_graph_ms']:.3f}", f"{x['fp8_dispatch_graph_ms']:.3f}",
                      f"{x['fp8_dispatch_graph_gbs']:.0f}",
                      f"{x['dispatch_graph_ms'] / x['fp8_dispatch_graph_ms']:.2f}"] for x in ok]))
    print("\nsummary, % of the copy's rate (whole call / kernels alone / graph replay; FP8: replayed, GB/s of its "
          "bytes); host ms: the host's own time per call (dispatch / combine)")
    print(table(["num_sms", "dispatch", "combine", "fp8 dispatch", "host ms"],
                [[x["num_sms"]] + [" / ".join(f"{x[k + '_of_copy'] * 100:.0f}"
                                              for k in (d, d + "_kernels", d + "_graph"))
                                   for d in ("dispatch", "combine")] + [f"{x['fp8_dispatch_graph_gbs']:.0f} GB/s",
                                                                        f"{x['dispatch_host_only_ms']:.3f} / "
                                                                        f"{x['combine_host_only_ms']:.3f}"]
                 for x in ok]))
    for x in r["rows"]:
        if "error" in x:
            print(f"num_sms={x['num_sms']}: FAILED: {x['error'][:150]}")


def main() -> int:
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
        return int(any("error" in x for x in result["rows"]))
    run_cpu(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
