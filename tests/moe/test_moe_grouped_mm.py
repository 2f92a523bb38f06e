"""Grouped GEMMs: the Triton kernel (interpreter, fp32), the CUTLASS wrapper's CPU reference,
the autograd of grouped_linear on every CPU-runnable backend, and WeightGradStore deferral."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from dualpipe_ext.kernels.grouped_mm import grouped_mm_reference


def _operands(counts, n, k, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(counts), k, generator=g).to(dtype)
    w = torch.randn(len(counts), n, k, generator=g).to(dtype)
    ends = torch.cumsum(torch.tensor(counts, dtype=torch.int64), 0)
    return x, w, ends


def _per_group(x, w, counts):
    return torch.cat([x[b:b + c].double() @ w[g].double().t() for g, (b, c) in
                      enumerate(zip([0] + list(torch.cumsum(torch.tensor(counts), 0)[:-1]), counts))])


_INTERP_SCRIPT = r"""
import os, sys, torch
os.environ["TRITON_INTERPRET"] = "1"
from dualpipe_ext.kernels._common import poison_outputs
from dualpipe_ext.kernels.grouped_mm import Tiles, grouped_mm, grouped_mm_reference
for seed, counts, n, k in [(0, [5, 0, 17, 3], 24, 40), (1, [0, 0, 33], 8, 16), (2, [1], 97, 7)]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(counts), k, generator=g)
    w = torch.randn(len(counts), n, k, generator=g)
    ends = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
    with poison_outputs():
        got = grouped_mm(x, w, ends, tiles=Tiles(16, 16, 16), impl="triton")
    ref = grouped_mm_reference(x, w, ends)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
# capacity-sized rows: rows past the last end are not computed (left poisoned) and ignored by the wgrad
from dualpipe_ext.kernels.grouped_mm import grouped_wgrad, grouped_wgrad_reference
for seed, counts, pad, n, k in [(3, [4, 0, 9], 6, 24, 40), (4, [0, 0], 3, 8, 16), (5, [37], 0, 97, 7)]:
    g = torch.Generator().manual_seed(seed)
    rows = sum(counts) + pad
    x = torch.randn(rows, k, generator=g)
    grad = torch.randn(rows, n, generator=g)
    x[sum(counts):] = float("nan")
    grad[sum(counts):] = float("nan")
    w = torch.randn(len(counts), n, k, generator=g)
    ends = torch.cumsum(torch.tensor(counts), 0)
    with poison_outputs():
        out = grouped_mm(x, w, ends, tiles=Tiles(16, 16, 16), impl="triton")
        dw = grouped_wgrad(grad, x, ends, tiles=Tiles(16, 16, 16), impl="triton")
    valid = sum(counts)
    torch.testing.assert_close(out[:valid], grouped_mm_reference(x, w, ends)[:valid], rtol=1e-5, atol=1e-4)
    assert torch.isnan(out[valid:]).all()  # untouched
    ref = grouped_wgrad_reference(grad[:valid], x[:valid], ends)
    torch.testing.assert_close(dw, ref, rtol=1e-5, atol=1e-4)
    assert not torch.isnan(dw).any()
    # a persistent grid smaller than the tiles (an SM budget) computes the same
    with poison_outputs():
        out2 = grouped_mm(x, w, ends, tiles=Tiles(16, 16, 16), num_sms=2, impl="triton")
        dw2 = grouped_wgrad(grad, x, ends, tiles=Tiles(16, 16, 16), num_sms=3, impl="triton")
    assert torch.equal(out2[:valid], out[:valid]) and torch.equal(dw2, dw)
print("ok")
"""


def test_triton_grouped_mm_matches_reference_in_interpreter():
    # the interpreter must be enabled before triton is imported: run in a fresh process
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", _INTERP_SCRIPT], env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_reference_and_cutlass_wrapper_on_cpu():
    from dualpipe_ext.moe.grouped_mm import cutlass_grouped_mm

    counts = [3, 0, 9, 1]
    x, w, ends = _operands(counts, 8, 16)
    expected = _per_group(x, w, counts)
    torch.testing.assert_close(grouped_mm_reference(x, w, ends).double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cutlass_grouped_mm(x, w, ends.int()).double(), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="end at most at num_rows"):
        grouped_mm_reference(x, w, ends + 1)  # past the rows
    with pytest.raises(ValueError, match="non-decreasing"):
        grouped_mm_reference(x, w, ends.flip(0))
    short = grouped_mm_reference(x, w, ends - 1)  # capacity-sized: the rows past the last end are zero
    torch.testing.assert_close(short[:-1].double(), _per_group(x[:-1], w, [2, 0, 9, 1]), rtol=1e-5, atol=1e-5)
    assert torch.all(short[-1] == 0)
    with pytest.raises(ValueError, match="w must be"):
        grouped_mm_reference(x, w[:, :, :4], ends)


@pytest.mark.parametrize("backend", ["loop", "auto"])
def test_grouped_linear_autograd(backend):
    from dualpipe_ext.moe.experts import grouped_linear

    counts = [4, 0, 7]
    x, w, ends = _operands(counts, 6, 5, dtype=torch.float64)
    x.requires_grad_(True)
    w.requires_grad_(True)
    out = grouped_linear(x, w, ends, backend)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    x2, w2 = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    (_per_group(x2, w2, counts) * g).sum().backward()
    torch.testing.assert_close(out, _per_group(x, w, counts))
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(w.grad, w2.grad)
    assert torch.count_nonzero(w.grad[1]) == 0  # the group with no rows


def test_weight_grad_store_defers_expert_and_router_grads():
    from dualpipe_ext import moe
    from dualpipe_ext.moe.experts import linear
    from dualpipe_ext.utils import WeightGradStore

    from moe_dist_utils import reference_router

    torch.manual_seed(0)
    experts = moe.GroupedExperts(4, 8, 6, dtype=torch.float64)
    gate = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    x = torch.randn(10, 8, dtype=torch.float64, requires_grad=True)

    def run():
        logits_gate = linear(x, gate)  # deferrable router projection
        idx = logits_gate.topk(2, dim=-1).indices
        weights = torch.softmax(logits_gate, -1).gather(1, idx).float()
        recv_x, recv_idx, recv_w, handle = moe.dispatch(x, idx, weights, 4)
        return moe.combine(moe.experts_forward(experts, recv_x, recv_idx, recv_w), handle).sum()

    run().backward()
    expected = [p.grad.clone() for p in (x, gate, experts.gate_up, experts.down)]
    for p in (x, gate, experts.gate_up, experts.down):
        p.grad = None
    WeightGradStore.clear()
    WeightGradStore.enabled = True
    try:
        run().backward()
        WeightGradStore.flush()
    finally:
        WeightGradStore.enabled = False
    torch.testing.assert_close(x.grad, expected[0])  # input grads are not deferred
    assert gate.grad is None and experts.gate_up.grad is None and experts.down.grad is None
    WeightGradStore.pop()
    assert WeightGradStore.empty()
    for got, want in zip((gate.grad, experts.gate_up.grad, experts.down.grad), expected[1:]):
        torch.testing.assert_close(got, want)
