"""Checks of the CUDA paths against their references, for ``tools/gpu_check.sh``.

Each check prints ``ok`` or ``FAIL`` with what differed; the exit status is the number of
failures. On a GPU (the default when CUDA is available) the Triton kernels are compiled,
``EPBuffer`` runs on CUDA symmetric memory with its kernels on the communication stream, and
the overlap engine on streams. ``--device cpu`` runs the same checks under Triton's
interpreter (a test runs it so the script keeps working). Floating-point results are held to
``TOLERANCE`` per dtype and kind of operation; indices, counts and moved rows compare bitwise.
The cross-process EPBuffer and CUDA-graph checks are pytest tests in ``tests/gpu``.

    python tools/gpu_checks.py [--device cuda|cpu] [--json OUT.json] [--timeout-s 280]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from datetime import timedelta
from typing import Callable, Dict, List

_RESULTS: List[Dict] = []


def check(name: str):
    def wrap(fn: Callable):
        def run(*args):
            t0 = time.perf_counter()
            try:
                detail = fn(*args)
                ok = True
            except Exception as e:  # noqa: BLE001 - every check reports
                ok, detail = False, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"
            dt = time.perf_counter() - t0
            _RESULTS.append({"check": name, "ok": ok, "detail": str(detail or ""), "s": round(dt, 2)})
            print(f"{'ok  ' if ok else 'FAIL'} {name} ({dt:.1f} s){': ' + str(detail) if detail else ''}", flush=True)
        return run
    return wrap


# Largest allowed max |got - ref| / max |ref| per dtype of the compared tensors and kind of operation.
# elementwise (routing weights, combine sums): float32 agrees to a few ulps (Triton's and PyTorch's
# exp and sigmoid differ in the last bits), bfloat16 to two ulps (2 * 2**-8) after sums in another
# order. gemm (grouped GEMMs against the matmul reference): float32 runs as TF32 in Triton's tl.dot
# on CUDA (10 mantissa bits), bfloat16 outputs carry one rounding of 8 bits.
TOLERANCE = {("float32", "elementwise"): 1e-5, ("bfloat16", "elementwise"): 8e-3,
             ("float32", "gemm"): 5e-3, ("bfloat16", "gemm"): 2e-2}


def _close(got, ref, what, kind="elementwise"):
    """Raise unless ``got`` is within ``TOLERANCE[(dtype, kind)]`` of ``ref`` (same dtype, relative to max |ref|)."""
    if got.dtype != ref.dtype or got.shape != ref.shape:
        raise AssertionError(f"{what}: got {got.dtype} {tuple(got.shape)}, the reference {ref.dtype} "
                             f"{tuple(ref.shape)}")
    tol = TOLERANCE[(str(got.dtype).replace("torch.", ""), kind)]
    scale = float(ref.float().abs().max()) if ref.numel() else 0.0
    err = float((got.float() - ref.float()).abs().max()) / max(scale, 1e-30) if ref.numel() else 0.0
    if not err <= tol:
        raise AssertionError(f"{what} ({got.dtype}): max error {err:.3g} of max |ref| {scale:.3g}, allowed {tol:g}")
    return err


@check("kernels: permute, combine, routing, layout, grouped GEMMs against their references")
def kernels(dev):
    import torch

    from dualpipe_ext.kernels.combine import combine, combine_reference
    from dualpipe_ext.kernels.dispatch_layout import dispatch_layout, dispatch_layout_reference
    from dualpipe_ext.kernels.grouped_mm import grouped_mm, grouped_mm_reference, grouped_wgrad, \
        grouped_wgrad_reference
    from dualpipe_ext.kernels.permute import permute, permute_reference
    from dualpipe_ext.kernels.routing import route, route_reference

    g = torch.Generator(device=dev).manual_seed(0)
    logits = torch.randn(97, 64, device=dev, generator=g)
    bias = torch.randn(64, device=dev, generator=g) * 0.01
    i1, w1 = route(logits, 8, "sigmoid", 8, 4, bias, 2.5, impl="triton")
    i2, w2 = route_reference(logits, 8, "sigmoid", 8, 4, bias, 2.5)
    assert torch.equal(i1, i2), "routing indices"
    errors = {"routing weights": _close(w1, w2, "routing weights")}
    lay1 = dispatch_layout(i1, 64, 8, impl="triton")
    lay2 = dispatch_layout_reference(i1, 64, 8)
    assert all(torch.equal(a, b) for a, b in zip(lay1, lay2)), "dispatch layout"
    x = torch.randn(97, 1000, device=dev, dtype=torch.bfloat16, generator=g)
    rows = int(lay2.num_tokens_per_rank.sum())
    assert torch.equal(permute(x, lay2.send_pos, rows, impl="triton"), permute_reference(x, lay2.send_pos, rows))
    y = torch.randn(rows, 1000, device=dev, dtype=torch.bfloat16, generator=g)
    errors["combine"] = _close(combine(y, lay2.send_pos, impl="triton"), combine_reference(y, lay2.send_pos), "combine")
    counts = [5, 0, 130, 33]
    xx = torch.randn(sum(counts) + 7, 256, device=dev, dtype=torch.bfloat16, generator=g)
    ww = torch.randn(4, 512, 256, device=dev, dtype=torch.bfloat16, generator=g) / 16
    ends = torch.tensor(counts, device=dev).cumsum(0)
    n = sum(counts)
    errors["grouped GEMM"] = _close(grouped_mm(xx, ww, ends, impl="triton", num_sms=8)[:n],
                                    grouped_mm_reference(xx, ww, ends)[:n], "grouped GEMM", "gemm")
    gg = torch.randn(sum(counts) + 7, 512, device=dev, dtype=torch.bfloat16, generator=g)
    errors["grouped weight gradient"] = _close(grouped_wgrad(gg, xx, ends, impl="triton"),
                                               grouped_wgrad_reference(gg[:n], xx[:n], ends), "grouped weight gradient",
                                               "gemm")
    return "relative errors " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items())


@check("grouped GEMM backends (torch._grouped_mm, CUTLASS) against the reference, rows past the end ignored")
def gemm_backends(dev):
    import torch

    from dualpipe_ext.kernels.grouped_mm import grouped_mm_reference
    from dualpipe_ext.moe.grouped_mm import cuda_extension, grouped_mm, pick_backend

    if dev.type != "cuda":
        return "CUDA only"
    g = torch.Generator(device=dev).manual_seed(1)
    counts = [64, 0, 200, 8]
    x = torch.randn(sum(counts) + 16, 512, device=dev, dtype=torch.bfloat16, generator=g)
    w = torch.randn(4, 1024, 512, device=dev, dtype=torch.bfloat16, generator=g) / 20
    ends = torch.tensor(counts, device=dev).cumsum(0)
    n, ref = sum(counts), grouped_mm_reference(x, w, ends)
    seen = []
    for backend in ("torch", "cutlass"):
        if backend == "torch" and not hasattr(torch, "_grouped_mm") or backend == "cutlass" and cuda_extension() is None:
            seen.append(f"{backend}: not available")
            continue
        _close(grouped_mm(x, w, ends, backend)[:n], ref[:n], f"{backend} grouped GEMM", "gemm")
        seen.append(f"{backend}: ok")
    return f"auto picks {pick_backend(x, w)}; " + ", ".join(seen)


def _init_group(dev):
    import torch.distributed as dist

    from dualpipe_ext.launch import free_port

    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{free_port()}",
                                rank=0, world_size=1, timeout=timedelta(seconds=120))


@check("EPBuffer on one device: dispatch and combine equal the references, 50 async exchanges, no host read")
def epbuffer(dev):
    import torch

    from dualpipe_ext import moe
    from dualpipe_ext.debug import HostReadCounter
    from dualpipe_ext.kernels.ep_exchange import dispatch_exchange_reference

    _init_group(dev)
    hidden, tokens = (7168, 4096) if dev.type == "cuda" else (64, 16)
    ep = moe.EPBuffer(None, max_tokens=tokens, hidden=hidden, dtype=torch.bfloat16, max_topk=8, timeout_s=60,
                      device=dev)
    g = torch.Generator(device=dev).manual_seed(2)
    x = torch.randn(tokens, hidden, device=dev, dtype=torch.bfloat16, generator=g)
    idx = torch.rand(tokens, 64, device=dev, generator=g).argsort(1)[:, :8].contiguous()
    w = torch.rand(idx.shape, device=dev, generator=g)
    recv_x, recv_idx, recv_w, handle = ep.dispatch(x, idx, w, 64)
    ref = dispatch_exchange_reference([x.cpu()], [idx.cpu()], [w.cpu()], 64, tokens)[0]
    assert torch.equal(recv_x.cpu(), ref[0]) and torch.equal(recv_idx.cpu(), ref[1]), "dispatch rows/indices"
    assert torch.equal(ep.combine(recv_x, handle).cpu(), x.cpu()), "combine of the dispatched rows"
    pending = [ep.dispatch(x, idx, w, 64, async_op=True) for _ in range(2)]
    outs = [p.wait()[0] for p in pending]
    for _ in range(48):
        outs.append(ep.dispatch(x, idx, w, 64)[0])
    assert all(torch.equal(o, recv_x) for o in outs), "async and repeated exchanges"
    cfg = moe.MoEConfig(hidden=hidden, moe_intermediate=1024 if dev.type == "cuda" else 32, num_experts=64, topk=8,
                        n_group=8, topk_group=4, score_func="sigmoid", num_shared_experts=1)
    layer = moe.MoE(cfg, ep=ep, device=dev, dtype=torch.bfloat16)
    xin = torch.randn(tokens, hidden, device=dev, dtype=torch.bfloat16, requires_grad=True)
    with HostReadCounter() as reads:
        layer(xin).float().square().mean().backward()
    assert not reads.calls, reads.report()
    ep.close()


@check("overlap engine: an overlapped pair (EPBuffer, two-batch) bitwise equal to the plain order")
def overlap_pair(dev):
    import torch

    from dualpipe_ext.moe import EPBuffer, MoEConfig
    from dualpipe_ext.overlap import BlockConfig, MoEStage, OverlapConfig, OverlappedMoEStage

    _init_group(dev)
    hidden = 1024 if dev.type == "cuda" else 32
    ep = EPBuffer(None, max_tokens=2 * 128, hidden=hidden, dtype=torch.float32, max_topk=2, device=dev)
    cfg = BlockConfig(MoEConfig(hidden=hidden, moe_intermediate=hidden, num_experts=8, topk=2, num_shared_experts=1),
                      num_heads=8)
    over = OverlapConfig(two_batch=True, num_comm_sms=ep.num_sms)
    results = []
    for cls in (MoEStage, OverlappedMoEStage):
        torch.manual_seed(0)
        st0, st1 = (cls(cfg, 2, overlap=over, ep=ep, device=dev) for _ in range(2))
        x0 = torch.randn(4, 64, hidden, device=dev)
        x1 = torch.randn(4, 64, hidden, device=dev, requires_grad=True)
        loss1 = st1(x1).square().mean()
        if cls is MoEStage:
            out0 = st0(x0)
            loss1.backward()
        else:
            out0, _ = cls.overlapped_forward_backward(st0, [x0], None, [], st1, loss1, [], [])
        results.append((out0.detach(), x1.grad, [p.grad for p in st1.parameters()]))
    (a0, ag, ap), (b0, bg, bp) = results
    assert torch.equal(a0, b0) and torch.equal(ag, bg), "outputs or input gradient"
    assert all(torch.equal(p, q) for p, q in zip(ap, bp)), "parameter gradients"
    ep.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default=None)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--timeout-s", type=float, default=280, help="end the run with every thread's stack after this long")
    args = p.parse_args()
    import faulthandler

    faulthandler.dump_traceback_later(args.timeout_s, exit=True)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ["DUALPIPE_EXT_TRITON"] = "1"
    dev = torch.device(device, 0) if device == "cuda" else torch.device("cpu")
    if device == "cuda":
        torch.cuda.set_device(dev)
        print(f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}", flush=True)
    for fn in (kernels, gemm_backends, epbuffer, overlap_pair):
        fn(dev)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(_RESULTS, f, indent=1)
    failures = sum(not r["ok"] for r in _RESULTS)
    print(f"{len(_RESULTS) - failures} passed, {failures} failed")
    return failures


if __name__ == "__main__":
    sys.exit(main())
