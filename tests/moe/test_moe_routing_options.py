"""MoE routing options in one process: renormalised softmax, a float32 router beside other
expert dtypes, and a batch without tokens."""
from __future__ import annotations

import pytest
import torch

from moe_dist_utils import dense_moe_reference


def _layer(dtype=torch.float64, **kw):
    from dualpipe_ext import moe

    torch.manual_seed(0)
    cfg = moe.MoEConfig(hidden=16, moe_intermediate=8, num_experts=8, topk=2, **kw)
    return moe.MoE(cfg, dtype=dtype)


@pytest.mark.parametrize("norm_topk_prob", [None, True, False])
def test_softmax_router_normalisation(norm_topk_prob):
    layer = _layer(norm_topk_prob=norm_topk_prob)
    x = torch.randn(11, 16, dtype=torch.float64)
    scores = torch.softmax(x @ layer.gate.detach().t(), dim=-1)
    top = scores.topk(2, dim=-1)
    weights = top.values / top.values.sum(-1, keepdim=True) if norm_topk_prob else top.values
    want = dense_moe_reference(x, top.indices, weights.float(), layer.experts.gate_up.detach(),
                               layer.experts.down.detach())
    torch.testing.assert_close(layer(x).detach(), want, rtol=1e-5, atol=1e-6)


def test_router_in_its_own_dtype():
    # a float32 gate beside float64 experts: the logits are computed from up-cast (here: down-cast) tokens
    layer = _layer(score_func="sigmoid", n_group=2, topk_group=1)
    layer.gate = torch.nn.Parameter(layer.gate.detach().float())
    x = torch.randn(7, 16, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    out.sum().backward()
    assert out.dtype == torch.float64 and layer.gate.grad.dtype == torch.float32 and x.grad.dtype == torch.float64


@pytest.mark.parametrize("kw", [dict(score_func="sigmoid", n_group=4, topk_group=2), dict(norm_topk_prob=True)])
def test_no_tokens(kw):
    layer = _layer(num_shared_experts=1, **kw)
    x = torch.zeros(0, 16, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    out.sum().backward()
    assert out.shape == (0, 16) and x.grad.shape == (0, 16)
