"""GPU benchmark of the MoE kernels against their PyTorch references.

For each kernel: median time (CUDA events, warm-up, rotating inputs so the L2 cache does
not flatter), bytes moved per call, GB/s and its fraction of the device-to-device copy
bandwidth measured in the same run, and the speed-up over the reference on the same inputs.
Settings: DeepSeek-V3 (4096 tokens, hidden 7168, 256 experts, top-8 of 8 groups / top-4
groups, EP 8 simulated as world=8) and a smaller one.

    python bench/bench_moe_kernels.py [--csv results.csv]

Without CUDA it prints one line and exits 0. ``--cpu-smoke`` runs tiny sizes through the
Triton interpreter on the CPU (wall-clock timing) to check the script itself.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, List, Sequence

SMOKE = "--cpu-smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import median, table  # noqa: E402


@dataclass(frozen=True)
class Setting:
    name: str
    num_tokens: int
    hidden: int
    num_experts: int
    topk: int
    n_group: int  # expert groups of the group-limited gate
    topk_group: int  # groups each token may use
    world: int  # expert-parallel ranks simulated by the layout


SETTINGS = [
    Setting("DeepSeek-V3", 4096, 7168, 256, 8, 8, 4, 8),
    Setting("small", 1024, 2048, 64, 6, 1, 1, 4),
]
SMOKE_SETTINGS = [Setting("smoke", 64, 96, 16, 4, 4, 2, 4)]


def time_ms(fn: Callable, inputs: Sequence[tuple], warmup: int, repeats: int) -> float:
    """Median milliseconds of ``fn(*inputs[i % len(inputs)])``."""
    for i in range(warmup):
        fn(*inputs[i % len(inputs)])
    times: List[float] = []
    for i in range(repeats):
        args = inputs[i % len(inputs)]
        if SMOKE:
            start = time.perf_counter()
            fn(*args)
            times.append((time.perf_counter() - start) * 1e3)
        else:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn(*args)
            end.record()
            torch.cuda.synchronize()
            times.append(begin.elapsed_time(end))
    return median(times)


def copy_bandwidth(device, warmup: int, repeats: int) -> float:
    """GB/s of ``Tensor.copy_`` of a large buffer (bytes read + written)."""
    num_bytes = (1 << 20) if SMOKE else (1 << 30)
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), [()], warmup, repeats)
    return 2 * num_bytes / ms / 1e6


def make_inputs(s: Setting, device, seed: int) -> dict:
    from dualpipe_ext.kernels.dispatch_layout import dispatch_layout_reference
    from dualpipe_ext.kernels.routing import route_reference

    gen = torch.Generator(device="cpu").manual_seed(seed)
    logits = torch.randn(s.num_tokens, s.num_experts, generator=gen).to(device)
    bias = (torch.rand(s.num_experts, generator=gen) * 0.01).to(device)
    topk_idx, topk_weights = route_reference(logits, s.topk, "sigmoid", s.n_group, s.topk_group, bias)
    layout = dispatch_layout_reference(topk_idx, s.num_experts, s.world)
    num_rows = int(layout.num_tokens_per_rank.sum())
    x = torch.randn(s.num_tokens, s.hidden, generator=gen, dtype=torch.float32).to(device, torch.bfloat16)
    sent = torch.randn(num_rows, s.hidden, generator=gen, dtype=torch.float32).to(device, torch.bfloat16)
    # expert side of rank 0: the tokens it received, indices local to its experts
    num_local = s.num_experts // s.world
    on_rank0 = layout.is_token_in_rank[:, 0]
    recv_idx = topk_idx[on_rank0]
    recv_idx = torch.where(recv_idx < num_local, recv_idx, -1)
    recv_weights = torch.where(recv_idx >= 0, topk_weights[on_rank0], 0.0)
    local = dispatch_layout_reference(recv_idx, num_local, num_local)
    expand_pos = torch.where(recv_idx >= 0, local.send_pos.gather(1, recv_idx.clamp(min=0)), -1)
    num_expanded = int(local.num_tokens_per_rank.sum())
    expert_out = torch.randn(num_expanded, s.hidden, generator=gen).to(device, torch.bfloat16)
    return dict(logits=logits, bias=bias, topk_idx=topk_idx, send_pos=layout.send_pos, num_rows=num_rows, x=x,
                sent=sent, expand_pos=expand_pos, recv_weights=recv_weights, expert_out=expert_out)


def cases(s: Setting):
    """(name, fn(impl) -> callable over one input dict, bytes moved per call)."""
    from dualpipe_ext.kernels.combine import combine
    from dualpipe_ext.kernels.dispatch_layout import dispatch_layout
    from dualpipe_ext.kernels.permute import permute
    from dualpipe_ext.kernels.routing import route

    def route_case(impl):
        return lambda d: route(d["logits"], s.topk, "sigmoid", s.n_group, s.topk_group, d["bias"], 2.5,
                               check_inputs=False, impl=impl)

    def layout_case(impl):
        return lambda d: dispatch_layout(d["topk_idx"], s.num_experts, s.world, check_indices=False, impl=impl)

    def permute_case(impl):
        return lambda d: permute(d["x"], d["send_pos"], d["num_rows"], check_pos=False, impl=impl)

    def combine_case(impl):
        return lambda d: combine(d["sent"], d["send_pos"], check_pos=False, impl=impl)

    def reduce_case(impl):
        return lambda d: combine(d["expert_out"], d["expand_pos"], d["recv_weights"], check_pos=False, impl=impl)

    t, h, e, k, r = s.num_tokens, s.hidden, s.num_experts, s.topk, s.world
    return [
        ("route", route_case, lambda d: t * e * 4 + e * 4 + t * k * 12),
        ("dispatch_layout", layout_case, lambda d: t * k * 8 + t * r * 9 + (e + r) * 8),
        ("permute", permute_case, lambda d: (t + d["num_rows"]) * h * 2 + t * r * 8),
        ("combine", combine_case, lambda d: (d["num_rows"] + t) * h * 2 + t * r * 8),
        ("combine weighted", reduce_case,
         lambda d: (d["expert_out"].shape[0] + d["expand_pos"].shape[0]) * h * 2 + d["expand_pos"].numel() * 12),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", help="append result rows to this CSV file")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes through the Triton interpreter")
    args = parser.parse_args()
    if not SMOKE and not torch.cuda.is_available():
        print("bench_moe_kernels: no CUDA device here; nothing measured")
        return 0
    device = torch.device("cpu" if SMOKE else "cuda")
    warmup, repeats, num_inputs = (1, 3, 2) if SMOKE else (5, 25, 3)
    copy_gbps = copy_bandwidth(device, warmup, repeats)
    device_name = "cpu (interpreter)" if SMOKE else torch.cuda.get_device_name()
    print(f"device: {device_name}; torch {torch.__version__}; copy_ bandwidth {copy_gbps:.0f} GB/s")
    rows, records = [], []
    for s in SMOKE_SETTINGS if SMOKE else SETTINGS:
        inputs = [make_inputs(s, device, seed) for seed in range(num_inputs)]
        for name, make, num_bytes in cases(s):
            ms = {impl: time_ms(make(impl), [(d,) for d in inputs], warmup, repeats) for impl in ("triton", "reference")}
            gbps = num_bytes(inputs[0]) / ms["triton"] / 1e6
            rows.append([s.name, name, f"{ms['triton']:.3f}", f"{ms['reference']:.3f}", f"{ms['reference'] / ms['triton']:.2f}x",
                         f"{gbps:.0f}", f"{100 * gbps / copy_gbps:.0f} %"])
            records.append(dict(date=datetime.date.today().isoformat(), device=device_name, torch=torch.__version__,
                                setting=s.name, kernel=name, triton_ms=ms["triton"], reference_ms=ms["reference"],
                                gbps=gbps, copy_gbps=copy_gbps))
    print(table(["setting", "kernel", "triton ms", "reference ms", "speed-up", "GB/s", "of copy"], rows))
    if args.csv:
        new = not os.path.exists(args.csv)
        with open(args.csv, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]))
            if new:
                writer.writeheader()
            writer.writerows(records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
