"""Eager against CUDA-graph replay: an MoE layer step and an overlapped pair on one GPU.

Two steps, each on a one-rank ``EPBuffer`` (bf16), captured with ``dualpipe_ext.graphs.StepGraph``:

- ``MoE step``: one ``MoE`` layer's forward + backward (2048 tokens, hidden 1024, 32 experts top-4,
  one shared expert);
- ``overlapped pair``: the forward of a chunk and the overlapped forward + backward pair of the
  overlap engine (two 2-layer ``OverlappedMoEStage``s, 2 x 512 tokens, hidden 1024, 16 experts
  top-4, two-batch).

Per step: median ms eager and replayed (``triton.testing.do_bench``), the speed-up, and the
largest difference of the replayed output from eager's (0 when the step is deterministic). A
step that cannot be captured is reported as failed (and the exit status is 1).

    python bench/bench_graphs.py [--quick] [--json OUT.json]
    python bench/bench_graphs.py --cpu-smoke     # tiny sizes on CPU: StepGraph replays eagerly
"""
from __future__ import annotations

import os
import sys
import time
import traceback

if "--cpu-smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Steps, bench_ms, environment, gpu_bench_main, init_single_group, table  # noqa: E402


# An exchange wait that goes wrong inside a replay expires after this long (a healthy one takes
# microseconds), so a replay that stalls is reported instead of timed.
WAIT_S = 5.0


def moe_step(dev, dtype, smoke: bool):
    """(step, description, closer): one MoE layer forward + backward on a one-rank EPBuffer."""
    from dualpipe_ext import moe

    tokens, hidden, experts, topk = (16, 16, 4, 2) if smoke else (2048, 1024, 32, 4)
    cfg = moe.MoEConfig(hidden=hidden, moe_intermediate=hidden // 2, num_experts=experts, topk=topk,
                        num_shared_experts=1)
    ep = moe.EPBuffer(None, max_tokens=tokens, hidden=hidden, dtype=dtype, max_topk=topk, timeout_s=WAIT_S, device=dev)
    torch.manual_seed(0)
    layer = moe.MoE(cfg, ep=ep, device=dev, dtype=dtype)
    x = torch.randn(tokens, hidden, device=dev, dtype=dtype).requires_grad_(True)
    grad = torch.randn(tokens, hidden, device=dev, dtype=dtype)
    params = list(layer.parameters())

    def step():
        for q in params:
            q.grad = None
        x.grad = None
        y = layer(x)
        y.backward(grad)
        return [y.detach(), x.grad]

    return step, f"{tokens} tokens, hidden {hidden}, {experts} experts top-{topk}", ep.close


def pair_step(dev, dtype, smoke: bool):
    """(step, description, closer): a chunk's forward and the overlapped pair on a one-rank EPBuffer."""
    from dualpipe_ext.moe import EPBuffer, MoEConfig
    from dualpipe_ext.overlap import BlockConfig, OverlapConfig, OverlappedMoEStage

    batch, seq, hidden, experts = (2, 4, 16, 4) if smoke else (2, 512, 1024, 16)
    ep = EPBuffer(None, max_tokens=batch * seq, hidden=hidden, dtype=dtype, max_topk=4 if not smoke else 2,
                  timeout_s=WAIT_S, device=dev)
    cfg = BlockConfig(MoEConfig(hidden=hidden, moe_intermediate=hidden // 2, num_experts=experts,
                                topk=4 if not smoke else 2, num_shared_experts=1), num_heads=8 if not smoke else 2)
    over = OverlapConfig(two_batch=True, num_comm_sms=ep.num_sms)
    torch.manual_seed(0)
    st0, st1 = (OverlappedMoEStage(cfg, 2, overlap=over, ep=ep, device=dev, dtype=dtype) for _ in range(2))
    x0 = torch.randn(batch, seq, hidden, device=dev, dtype=dtype)
    x1 = torch.randn(batch, seq, hidden, device=dev, dtype=dtype).requires_grad_(True)
    params = list(st0.parameters()) + list(st1.parameters())

    def step():
        for q in params:
            q.grad = None
        x1.grad = None
        loss1 = st1(x1).float().square().mean()
        out0, _ = OverlappedMoEStage.overlapped_forward_backward(st0, [x0], None, [], st1, loss1, [], [])
        return [out0.detach(), x1.grad]

    return step, f"2 x {batch * seq} tokens, hidden {hidden}, 2 layers, {experts} experts, two-batch", ep.close


def run(args) -> dict:
    from dualpipe_ext.graphs import StepGraph

    smoke = args.cpu_smoke
    dev = torch.device("cpu") if smoke else torch.device("cuda", 0)
    dtype = torch.float32 if smoke else torch.bfloat16
    if not smoke:
        torch.cuda.set_device(dev)
    steps = Steps("bench_graphs")
    with steps("process group"):
        init_single_group()
    rows = []
    for name, make in (("MoE step", moe_step), ("overlapped pair", pair_step)):
        row = dict(step=name)
        try:
            with steps(f"{name}: build"):
                step, row["setting"], close = make(dev, dtype, smoke)
            try:
                with steps(f"{name}: eager"):
                    eager = [t.clone() for t in step()]
                    row["eager_ms"] = bench_ms(step, dev, args.quick, repeats=2)
                with steps(f"{name}: capture"):
                    graph = StepGraph(step, dev)
                with steps(f"{name}: replay"):
                    t0 = time.perf_counter()
                    outs = graph.replay()
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)
                    if dev.type == "cuda" and time.perf_counter() - t0 > WAIT_S / 2:
                        raise RuntimeError(f"one replay took {time.perf_counter() - t0:.1f} s: an exchange inside "
                                           f"it waited for a signal that did not come")
                    row["max_abs_diff"] = max(float((a.float() - b.float()).abs().max()) for a, b in zip(outs, eager))
                    row["replay_ms"] = bench_ms(graph.replay, dev, args.quick, repeats=2)
                    row["speedup"] = row["eager_ms"] / row["replay_ms"]
                    row["captured"] = graph.captured
            finally:
                close()
        except Exception as e:  # noqa: BLE001 - the other step still runs; the exit status says it failed
            row["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        rows.append(row)
    return dict(benchmark="graphs", env=environment(dev), dtype=str(dtype), rows=rows)


def print_result(r: dict) -> None:
    print(f"eager against CUDA-graph replay on {r['env']['device_name']}, {r['dtype']}, one-rank EPBuffer; "
          f"do_bench medians")
    print(table(["step", "setting", "eager ms", "replay ms", "speed-up", "max |replay - eager|"],
                [[x["step"], x.get("setting", ""), f"{x['eager_ms']:.3f}", f"{x['replay_ms']:.3f}",
                  f"{x['speedup']:.2f}", f"{x['max_abs_diff']:.2g}"] if "error" not in x else
                 [x["step"], x.get("setting", ""), "failed", "", "", x["error"][:80]] for x in r["rows"]]))


def main() -> int:
    return gpu_bench_main("bench_graphs", __doc__.splitlines()[0], run, print_result, 240, "tiny sizes on CPU (no capture)")


if __name__ == "__main__":
    sys.exit(main())
