"""Benchmark of the FP8 (e4m3, 1x128 groups) quantize and dequantize kernels.

On CUDA: median time (CUDA events, warm-up, inputs rotated so the L2 cache does not flatter),
bytes read and written per call, GB/s, its fraction of the device-to-device copy bandwidth
measured in the same run, and the speed-up over the PyTorch reference; bit-exactness against
the reference is checked on the way. On CPU it runs the reference (and, with
``TRITON_INTERPRET=1``, the interpreted kernels) at small sizes to check the script.

    python bench/bench_fp8.py [--tokens 4096 --hidden 7168]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import median, table  # noqa: E402


def _time_cuda(fn, inputs, iters=50):
    for x in inputs[:3]:
        fn(x)
    torch.cuda.synchronize()
    times = []
    for i in range(iters):
        x = inputs[i % len(inputs)]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(x)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return median(times)


def _time_cpu(fn, inputs, iters=3):
    times = []
    for i in range(iters):
        t0 = time.perf_counter()
        fn(inputs[i % len(inputs)])
        times.append(time.perf_counter() - t0)
    return median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--json", help="also write the table here")
    args = p.parse_args(argv)
    from dualpipe_ext.kernels import fp8

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    tokens = args.tokens or (4096 if cuda else 64)
    hidden = args.hidden if cuda else min(args.hidden, 512)
    timer = _time_cuda if cuda else _time_cpu
    kernel = "triton" if cuda or os.environ.get("TRITON_INTERPRET") == "1" else "reference"
    inputs = [torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16) for _ in range(4)]
    ceiling = None
    if cuda:
        big = [torch.empty(tokens * hidden * 2, dtype=torch.uint8, device=device) for _ in range(4)]
        copy_s = _time_cuda(lambda b: b.clone(), big)
        ceiling = 2 * big[0].numel() / copy_s / 1e9
    groups = fp8.num_groups(hidden)
    rows = []
    for ue8m0 in (False, True):
        got = fp8.quantize(inputs[0], ue8m0=ue8m0, impl=kernel)
        want = fp8.quantize_reference(inputs[0], ue8m0=ue8m0)
        exact = torch.equal(got.q.view(torch.uint8), want.q.view(torch.uint8)) and torch.equal(got.scales,
                                                                                                  want.scales)
        q_bytes = tokens * hidden * (2 + 1) + tokens * groups * 4  # read bf16, write e4m3 + scales
        t_k = timer(lambda x: fp8.quantize(x, ue8m0=ue8m0, impl=kernel), inputs)
        t_r = timer(lambda x: fp8.quantize_reference(x, ue8m0=ue8m0), inputs)
        rows.append(["quantize" + (" ue8m0" if ue8m0 else ""), kernel, f"{t_k * 1e6:.1f}", f"{q_bytes / t_k / 1e9:.1f}",
                     f"{q_bytes / t_k / 1e9 / ceiling:.0%}" if ceiling else "-", f"{t_r / t_k:.1f}x", exact])
    q, s = fp8.quantize(inputs[0])
    packed = [(q, s)] * 4
    d_bytes = tokens * hidden * (1 + 2) + tokens * groups * 4
    t_k = timer(lambda qs: fp8.dequantize(*qs, torch.bfloat16, impl=kernel), packed)
    t_r = timer(lambda qs: fp8.dequantize_reference(*qs, torch.bfloat16), packed)
    exact = torch.equal(fp8.dequantize(q, s, impl=kernel), fp8.dequantize_reference(q, s))
    rows.append(["dequantize", kernel, f"{t_k * 1e6:.1f}", f"{d_bytes / t_k / 1e9:.1f}",
                 f"{d_bytes / t_k / 1e9 / ceiling:.0%}" if ceiling else "-", f"{t_r / t_k:.1f}x", exact])
    name = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"FP8 quantize/dequantize, {tokens} tokens x hidden {hidden} bf16, {name}"
          + (f", copy ceiling {ceiling:.0f} GB/s" if ceiling else " (script check: CPU times mean nothing)"))
    print(table(["op", "impl", "us", "GB/s", "of copy", "vs reference", "bit-exact"], rows))
    print(f"bytes per dispatched row: {fp8.packed_row_bytes(hidden)} FP8 vs {2 * hidden} bf16 "
          f"({fp8.packed_row_bytes(hidden) / (2 * hidden):.3f}x)")
    if args.json:
        import json

        keys = ["op", "impl", "us", "gbs", "of_copy", "vs_reference", "bit_exact"]
        with open(args.json, "w") as f:
            json.dump({"device": name, "tokens": tokens, "hidden": hidden, "copy_gbs": ceiling,
                       "row_bytes_fp8": fp8.packed_row_bytes(hidden), "row_bytes_bf16": 2 * hidden,
                       "rows": [dict(zip(keys, r)) for r in rows]}, f, indent=1)
    return 0 if all(r[-1] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
