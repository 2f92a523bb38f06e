"""FP8 dispatch on the collective path: the rows that arrive are exactly those of a plain dispatch
of the dequantized tokens, gradients go straight through in the activation dtype, and the MoE
layer's output and gradients stay within a stated distance of the unquantized path."""
from __future__ import annotations

import pytest
import torch

from moe_dist_utils import run_ranks

HIDDEN, INTER, EXPERTS, TOPK = 200, 16, 8, 3  # 200: one full group and a partial one of 72 columns
# e4m3 keeps 3 mantissa bits: each dispatched value moves by at most 2**-4 of itself (half a step),
# about 2.3 % RMS; the layer's output and gradients, sums over many such values, stay within 5 % RMS
FP8_REL_RMS = 0.05


def _rel_rms(a, b):
    a, b = a.double(), b.double()
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())


def _routing(num_tokens, g):
    idx = torch.stack([torch.randperm(EXPERTS, generator=g)[:TOPK] for _ in range(num_tokens)])
    idx[::4, -1] = -1  # some unused slots
    weights = torch.rand(num_tokens, TOPK, generator=g)
    return idx, torch.where(idx >= 0, weights, torch.zeros(()))


def _dispatch_worker(rank, world):
    from dualpipe_ext import moe
    from dualpipe_ext.kernels import fp8
    from dualpipe_ext.kernels._common import poison_outputs

    out = {}
    for dtype in (torch.bfloat16, torch.float32):
        for ue8m0 in (False, True):
            for async_op in (False, True):
                g = torch.Generator().manual_seed(100 * rank + 7)
                n = (97, 1, 123, 40)[rank]
                x = (torch.randn(n, HIDDEN, generator=g) * 3).to(dtype).requires_grad_(True)
                idx, w = _routing(n, g)
                grad_rows = None
                with poison_outputs():
                    res = moe.dispatch(x, idx, w, EXPERTS, async_op=async_op, fp8=True, ue8m0=ue8m0)
                    recv_x, recv_idx, recv_w, handle = res.wait() if async_op else res
                    plain = moe.dispatch(fp8.round_trip(x.detach(), ue8m0=ue8m0), idx, w, EXPERTS)
                assert recv_x.dtype == dtype
                same = (torch.equal(recv_x.detach().view(torch.uint8), plain[0].view(torch.uint8))
                        and torch.equal(recv_idx, plain[1]) and torch.equal(recv_w, plain[2]))
                # straight-through: the gradient of x is that of an unquantized dispatch of x
                grad_rows = torch.randn(recv_x.shape, generator=torch.Generator().manual_seed(rank)).to(dtype)
                (recv_x * grad_rows).sum().backward()
                x2 = x.detach().clone().requires_grad_(True)
                r2 = moe.dispatch(x2, idx, w, EXPERTS)
                (r2[0] * grad_rows).sum().backward()
                out[(str(dtype), ue8m0, async_op)] = dict(
                    same=same, grad_same=torch.equal(x.grad, x2.grad), rows=recv_x.shape[0],
                    moved=not torch.equal(recv_x.detach(), r2[0].detach()))
    return out


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_fp8_dispatch_is_a_dispatch_of_the_dequantized_tokens(world):
    results = run_ranks(_dispatch_worker, world, timeout_s=300)
    for rank, res in enumerate(results):
        for key, r in res.items():
            assert r["same"], (rank, key)
            assert r["grad_same"], (rank, key)
            assert r["moved"] or r["rows"] == 0, (rank, key)  # the rows really were rounded


def _layer_worker(rank, world, dtype):
    from dualpipe_ext import moe

    results = {}
    for fp8 in (False, True):
        torch.manual_seed(0)  # the same weights on every rank and in both runs
        cfg = moe.MoEConfig(hidden=HIDDEN, moe_intermediate=INTER, num_experts=EXPERTS, topk=TOPK,
                            num_shared_experts=1, fp8_dispatch=fp8)
        layer = moe.MoE(cfg, dtype=dtype)
        stats = []
        layer.register_dispatch_hook(lambda lay, handle: stats.append(lay.dispatch_stats(handle)))
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(64, HIDDEN, generator=g).to(dtype).requires_grad_(True)
        out = layer(x)
        (out.float() * torch.randn(out.shape, generator=g)).sum().backward()
        results[fp8] = dict(out=out.detach().float(), grad_x=x.grad.float(), row_bytes=layer.dispatch_row_bytes,
                            rows=sum(st.received_rows for st in stats),
                            grads={n: p.grad.float() for n, p in layer.named_parameters() if p.grad is not None})
    return results


@pytest.mark.parametrize("world,dtype", [(2, torch.bfloat16), pytest.param(4, torch.float32, marks=pytest.mark.slow)])
def test_moe_layer_with_fp8_dispatch_stays_close_to_the_unquantized_path(world, dtype):
    results = run_ranks(_layer_worker, world, dtype, timeout_s=300)
    for res in results:
        ref, got = res[False], res[True]
        err = _rel_rms(got["out"], ref["out"])
        assert 1e-4 < err < FP8_REL_RMS, err  # rounded, and not by much
        assert _rel_rms(got["grad_x"], ref["grad_x"]) < FP8_REL_RMS
        assert set(got["grads"]) == set(ref["grads"])
        for name in got["grads"]:
            assert _rel_rms(got["grads"][name], ref["grads"][name]) < FP8_REL_RMS, name
        assert got["rows"] == ref["rows"] > 0  # the same routing: the same rows cross
        assert got["row_bytes"] == HIDDEN + 4 * 2
        assert ref["row_bytes"] == HIDDEN * torch.empty(0, dtype=dtype).element_size()


def _error_worker(rank, world):
    from dualpipe_ext import moe

    messages = []
    for kind in ("disagree", "float64"):
        x = torch.randn(5, HIDDEN)
        idx = torch.tensor([[0, 1, 2], [2, 3, 4], [5, 6, 7], [3, 0, 1], [0, 2, 7]])
        w = torch.full((5, 3), 0.3)
        fp8 = not (kind == "disagree" and rank == 1)
        if kind == "float64" and rank == 0:
            x = x.double()
        try:
            moe.dispatch(x, idx, w, EXPERTS, fp8=fp8)
            messages.append(None)
        except ValueError as e:
            messages.append(str(e))
    return messages


def test_fp8_dispatch_errors_on_every_rank():
    for disagree, float64 in run_ranks(_error_worker, 2, timeout_s=120):
        assert disagree is not None and "fp8 ranges over [0, 1]" in disagree, disagree
        assert float64 is not None and "rank(s) [0] of the group passed bad input (rank 0: x dtype for fp8)" in float64


def test_fp8_dispatch_on_one_process_rounds_too():
    from dualpipe_ext import moe
    from dualpipe_ext.kernels import fp8

    x = torch.randn(33, HIDDEN, dtype=torch.bfloat16, requires_grad=True)
    idx, w = _routing(33, torch.Generator().manual_seed(3))
    recv_x, _, _, _ = moe.dispatch(x, idx, w, EXPERTS, fp8=True)
    assert torch.equal(recv_x.detach(), fp8.round_trip(x.detach()))
    recv_x.float().sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # straight-through


def test_moe_config_fp8_fields():
    from dualpipe_ext import moe

    cfg = moe.MoEConfig(hidden=7168, moe_intermediate=8, num_experts=8, topk=2, fp8_dispatch=True)
    layer = moe.MoE(cfg, dtype=torch.bfloat16, device="meta")
    bf16 = moe.MoE(moe.MoEConfig(hidden=7168, moe_intermediate=8, num_experts=8, topk=2), dtype=torch.bfloat16,
                   device="meta")
    assert layer.dispatch_row_bytes == 7168 + 4 * 56 == 7392 and bf16.dispatch_row_bytes == 2 * 7168
    assert abs(layer.dispatch_row_bytes / bf16.dispatch_row_bytes - 0.5156) < 1e-4
    with pytest.raises(ValueError, match="fp8_ue8m0 only applies with fp8_dispatch=True"):
        moe.MoEConfig(hidden=8, moe_intermediate=8, num_experts=8, topk=2, fp8_ue8m0=True)
    with pytest.raises(ValueError, match="fp8_dispatch must be True or False"):
        moe.MoEConfig(hidden=8, moe_intermediate=8, num_experts=8, topk=2, fp8_dispatch=1)
