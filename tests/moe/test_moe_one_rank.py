"""One rank on the collective path: ``MoE.forward`` skips dispatch and combine (they would copy every
row to itself) and the host reads they need, bitwise equal to the path through them, forward and
backward, with and without FP8 dispatch."""
from __future__ import annotations

import pytest
import torch

from dualpipe_ext import moe

HIDDEN, INTER, EXPERTS, TOPK, TOKENS = 128, 32, 8, 2, 24


def _layer(fp8: bool) -> moe.MoE:
    cfg = moe.MoEConfig(hidden=HIDDEN, moe_intermediate=INTER, num_experts=EXPERTS, topk=TOPK, n_group=4,
                        topk_group=2, score_func="sigmoid", routed_scaling_factor=2.5, num_shared_experts=1,
                        fp8_dispatch=fp8)
    torch.manual_seed(0)
    return moe.MoE(cfg)


def _through_exchanges(layer: moe.MoE, x: torch.Tensor) -> torch.Tensor:
    """``forward`` as it runs with more than one rank: route, dispatch, experts, combine, shared."""
    topk_idx, topk_weights = layer.route(x)
    recv_x, recv_idx, recv_w, handle = layer.dispatch(x, topk_idx, topk_weights)
    out = layer.combine(layer.experts_forward(recv_x, recv_idx, recv_w).to(x.dtype), handle)
    return out + layer.shared(x)


def _step(layer, fn, x, grad):
    for p in layer.parameters():
        p.grad = None
    leaf = x.clone().requires_grad_(True)
    out = fn(leaf)
    out.backward(grad)
    return [out.detach(), leaf.grad] + [p.grad for p in layer.parameters()]


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16-rows", "fp8-dispatch"])
def test_one_rank_forward_equals_the_exchanged_path_bitwise(fp8):
    layer = _layer(fp8)
    assert not layer.exchanges_tokens
    rows = []
    layer.register_dispatch_hook(lambda lay, handle: rows.append(lay.dispatch_stats(handle).received_rows))
    g = torch.Generator().manual_seed(1)
    x, grad = torch.randn(TOKENS, HIDDEN, generator=g), torch.randn(TOKENS, HIDDEN, generator=g)
    got = _step(layer, layer, x, grad)
    want = _step(layer, lambda t: _through_exchanges(layer, t), x, grad)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a is not None and torch.equal(a, b)
    assert rows == [TOKENS, TOKENS]  # both paths report the rows the experts took


def test_one_rank_forward_reads_nothing_on_the_host_outside_the_gemm():
    from dualpipe_ext.debug import HostReadCounter

    layer = _layer(False)
    x = torch.randn(TOKENS, HIDDEN)
    with HostReadCounter() as reads:
        layer(x)
    # the CPU grouped GEMM (a loop over experts) reads its group ends; a GPU backend does not
    outside = [(name, where) for name, where in reads.calls if "grouped_mm.py" not in where]
    assert outside == [], reads.report()
    with HostReadCounter() as reads:
        _through_exchanges(layer, x)
    assert [w for _, w in reads.calls if "grouped_mm.py" not in w], "the exchanged path reads the counts"
