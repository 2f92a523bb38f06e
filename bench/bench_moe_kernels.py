"""GPU benchmark of the MoE kernels against their PyTorch references.

For each kernel: median time (CUDA events, warm-up, rotating inputs so the L2 cache does
not flatter), bytes moved per call, GB/s and its fraction of the device-to-device copy
bandwidth measured in the same run, and the speed-up over the reference on the same inputs.
Settings: DeepSeek-V3 (4096 tokens, hidden 7168, 256 experts, top-8 of 8 groups / top-4
groups, EP 8 simulated as world=8) and a smaller one.

Then the grouped GEMM's TFLOP/s on each backend (Triton, ``torch._grouped_mm``, CUTLASS when
``dualpipe_ext._cuda`` was built) at DeepSeek-V3's per-rank expert shapes, against the dense
bf16 peak, timed by ``triton.testing.do_bench``.

    python bench/bench_moe_kernels.py [--quick] [--json OUT.json] [--csv results.csv]

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
from harness import Steps, bench_ms, environment, median, table, watchdog, write_json  # noqa: E402


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
        return lambda d: permute(d["x"], d["send_pos"], d["num_rows"], impl=impl)

    def combine_case(impl):
        return lambda d: combine(d["sent"], d["send_pos"], impl=impl)

    def reduce_case(impl):
        return lambda d: combine(d["expert_out"], d["expand_pos"], d["recv_weights"], impl=impl)

    t, h, e, k, r = s.num_tokens, s.hidden, s.num_experts, s.topk, s.world
    return [
        ("route", route_case, lambda d: t * e * 4 + e * 4 + t * k * 12),
        ("dispatch_layout", layout_case, lambda d: t * k * 8 + t * r * 9 + (e + r) * 8),
        ("permute", permute_case, lambda d: (t + d["num_rows"]) * h * 2 + t * r * 8),
        ("combine", combine_case, lambda d: (d["num_rows"] + t) * h * 2 + t * r * 8),
        ("combine weighted", reduce_case,
         lambda d: (d["expert_out"].shape[0] + d["expand_pos"].shape[0]) * h * 2 + d["expand_pos"].numel() * 12),
    ]


H200_BF16_DENSE_TFLOPS = 790.0  # the dense bf16 peak of an H200 that the GEMM rows are set against


@dataclass(frozen=True)
class GemmShape:
    name: str
    rows: int  # rows of all groups together
    n: int  # output width
    k: int  # reduction width
    groups: int  # experts on the rank


GEMM_SHAPES = [  # DeepSeek-V3 on one rank of EP 8: 4096 tokens x top-8 rows over 32 local experts
    GemmShape("DeepSeek-V3 up (gate+up)", 32768, 4096, 7168, 32),
    GemmShape("DeepSeek-V3 down", 32768, 7168, 2048, 32),
]
SMOKE_GEMM_SHAPES = [GemmShape("smoke", 64, 48, 32, 4)]


def cutlass_status() -> str:
    """Whether the grouped-GEMM step times CUTLASS, and if not, why (in words, for the report)."""
    if SMOKE:
        return "not timed: CPU smoke run"
    try:
        from dualpipe_ext import _cuda  # noqa: F401
    except ImportError as e:
        try:
            import cutlass_library  # noqa: F401
        except ImportError:
            return "not timed: no CUDA extension (no CUTLASS headers: the nvidia-cutlass wheel was not carried in .whl/)"
        return f"not timed: the CUTLASS headers are there but dualpipe_ext._cuda does not import ({e})"
    return "timed"


def gemm_rows(device, quick: bool) -> List[dict]:
    """TFLOP/s of each grouped GEMM backend at each shape, errors against the fp32 reference."""
    from dualpipe_ext.kernels.grouped_mm import grouped_mm_reference
    from dualpipe_ext.moe.grouped_mm import cuda_extension, grouped_mm

    dtype = torch.float32 if SMOKE else torch.bfloat16  # the interpreter's bf16 arithmetic is not the GPU's
    backends = ["triton", "torch"] + ([] if SMOKE or cuda_extension() is None else ["cutlass"])
    print(f"CUTLASS grouped GEMM: {cutlass_status()}", flush=True)
    out = []
    for shape in SMOKE_GEMM_SHAPES if SMOKE else GEMM_SHAPES:
        gen = torch.Generator(device="cpu").manual_seed(5)
        counts = torch.multinomial(torch.ones(shape.groups), shape.rows, replacement=True, generator=gen)
        ends = torch.bincount(counts, minlength=shape.groups).cumsum(0).to(device)
        x = torch.randn(shape.rows, shape.k, generator=gen).to(device, dtype)
        w = (torch.randn(shape.groups, shape.n, shape.k, generator=gen) / shape.k ** 0.5).to(device, dtype)
        ref = grouped_mm_reference(x.float(), w.float(), ends)
        flops = 2 * shape.rows * shape.n * shape.k
        for backend in backends:
            if backend == "torch" and not hasattr(torch, "_grouped_mm"):
                continue
            try:
                got = grouped_mm(x, w, ends, backend).float()
                err = float((got - ref).abs().max() / ref.abs().max())
                ms = bench_ms(lambda: grouped_mm(x, w, ends, backend), device, quick)
            except Exception as e:  # noqa: BLE001 - a backend that cannot run this shape is a row, not the end
                out.append(dict(shape=shape.name, backend=backend, error=f"{type(e).__name__}: {e}"))
                print(f"grouped GEMM {backend} at {shape.name} failed: {type(e).__name__}: {e}", flush=True)
                continue
            tflops = flops / ms / 1e9
            out.append(dict(shape=shape.name, rows=shape.rows, n=shape.n, k=shape.k, groups=shape.groups,
                            backend=backend, ms=ms, tflops=tflops, of_peak=tflops / H200_BF16_DENSE_TFLOPS,
                            max_rel_error=err))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", help="append result rows to this CSV file")
    parser.add_argument("--json", help="write every figure here")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, the DeepSeek-V3 setting only")
    parser.add_argument("--timeout-s", type=float, default=300, help="end the run (with stacks) after this long")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes through the Triton interpreter")
    args = parser.parse_args()
    if not SMOKE and not torch.cuda.is_available():
        print("bench_moe_kernels: no CUDA device here; nothing measured")
        return 0
    watchdog(args.timeout_s)
    steps = Steps("bench_moe_kernels")
    device = torch.device("cpu" if SMOKE else "cuda")
    warmup, repeats, num_inputs = (1, 3, 2) if SMOKE else ((3, 10, 2) if args.quick else (5, 25, 3))
    copy_gbps = copy_bandwidth(device, warmup, repeats)
    device_name = "cpu (interpreter)" if SMOKE else torch.cuda.get_device_name()
    print(f"device: {device_name}; torch {torch.__version__}; copy_ bandwidth {copy_gbps:.0f} GB/s")
    rows, records = [], []
    settings = SMOKE_SETTINGS if SMOKE else (SETTINGS[:1] if args.quick else SETTINGS)
    for s in settings:
        with steps(f"inputs of {s.name}"):
            inputs = [make_inputs(s, device, seed) for seed in range(num_inputs)]
        for name, make, num_bytes in cases(s):
            with steps(f"{name} at {s.name}"):
                ms = {impl: time_ms(make(impl), [(d,) for d in inputs], warmup, repeats)
                      for impl in ("triton", "reference")}
            gbps = num_bytes(inputs[0]) / ms["triton"] / 1e6
            rows.append([s.name, name, f"{ms['triton']:.3f}", f"{ms['reference']:.3f}",
                         f"{ms['reference'] / ms['triton']:.2f}x",
                         f"{gbps:.0f}", f"{100 * gbps / copy_gbps:.0f} %"])
            records.append(dict(date=datetime.date.today().isoformat(), device=device_name, torch=torch.__version__,
                                setting=s.name, kernel=name, triton_ms=ms["triton"], reference_ms=ms["reference"],
                                gbps=gbps, copy_gbps=copy_gbps))
    print(table(["setting", "kernel", "triton ms", "reference ms", "speed-up", "GB/s", "of copy"], rows))
    with steps("grouped GEMMs"):
        gemms = gemm_rows(device, args.quick)
    print(f"\ngrouped GEMM (forward), {'fp32' if SMOKE else 'bf16'}, rows split at random over the experts; "
          f"peak = {H200_BF16_DENSE_TFLOPS:.0f} TFLOP/s dense bf16; error = max |out - fp32 reference| / max |ref|")
    print(table(["shape", "backend", "ms", "TFLOP/s", "of peak", "error"],
                [[g["shape"], g["backend"], f"{g['ms']:.3f}", f"{g['tflops']:.0f}", f"{g['of_peak'] * 100:.0f} %",
                  f"{g['max_rel_error']:.1e}"] if "ms" in g
                 else [g["shape"], g["backend"], "failed", "", "", g["error"]]
                 for g in gemms]))
    write_json(args.json, dict(benchmark="moe_kernels", env=environment(device), copy_gbs=copy_gbps, kernels=records,
                               grouped_gemm=gemms, peak_tflops=H200_BF16_DENSE_TFLOPS, cutlass=cutlass_status()))
    if args.csv:
        new = not os.path.exists(args.csv)
        with open(args.csv, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]))
            if new:
                writer.writeheader()
            writer.writerows(records)
    return int(any("error" in g for g in gemms))  # a backend that failed fails the run, after the others ran


if __name__ == "__main__":
    sys.exit(main())
