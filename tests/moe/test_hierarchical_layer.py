"""The MoE layer with node-limited routing and hierarchical dispatch equals the flat layer."""
from __future__ import annotations

import pytest
import torch

from moe_dist_utils import run_ranks

HIDDEN, INTER = 16, 8


def _cfg(world, hierarchical, **kw):
    from dualpipe_ext import moe

    return moe.MoEConfig(hidden=HIDDEN, moe_intermediate=INTER, num_experts=4 * world, topk=4, n_group=world,
                         topk_group=world // 2 + 1, score_func="sigmoid", num_shared_experts=1, topk_nodes=1,
                         ranks_per_node=2, hierarchical=hierarchical, **kw)


def _worker(rank, world, tokens):
    from dualpipe_ext import moe

    torch.manual_seed(0)
    flat = moe.MoE(_cfg(world, False), dtype=torch.float64)
    torch.manual_seed(0)
    hier = moe.MoE(_cfg(world, True), dtype=torch.float64)
    with torch.no_grad():
        flat.expert_bias.copy_(torch.linspace(-0.05, 0.05, flat.expert_bias.numel()))
        hier.expert_bias.copy_(flat.expert_bias)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(tokens[rank], HIDDEN, generator=g, dtype=torch.float64)
    grad_out = torch.randn(tokens[rank], HIDDEN, generator=g, dtype=torch.float64)
    stats = []
    hier.register_dispatch_hook(lambda layer, handle: stats.append(layer.dispatch_stats(handle)))
    out = {}
    for name, layer in (("flat", flat), ("hier", hier)):
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        (y * grad_out).sum().backward()
        idx, _ = layer.route(x)
        out[name] = dict(y=y.detach(), grad_x=xi.grad, idx=idx,
                         grads={n: (q.grad if q.grad is not None else torch.zeros_like(q))
                                for n, q in layer.named_parameters()})
    assert len(stats) == 1  # one dispatch: the forward (the backward runs the mirrored exchanges)
    out["stats"] = stats[0].nodes
    out["num_nodes"] = hier.num_nodes
    return out


@pytest.mark.slow
def test_hierarchical_layer_equals_flat_layer():
    world, tokens = 4, [9, 0, 12, 5]
    results = run_ranks(_worker, world, tokens, timeout_s=180)
    tol = dict(rtol=1e-6, atol=1e-7)
    for rank, r in enumerate(results):
        assert r["num_nodes"] == 2
        assert torch.equal(r["flat"]["idx"], r["hier"]["idx"])
        nodes = r["hier"]["idx"] // (4 * 2)  # 8 experts per node
        assert bool((nodes == nodes[:, :1]).all())  # topk_nodes=1: one node per token
        torch.testing.assert_close(r["hier"]["y"], r["flat"]["y"], **tol)
        torch.testing.assert_close(r["hier"]["grad_x"], r["flat"]["grad_x"], **tol)
        for name, grad in r["flat"]["grads"].items():
            torch.testing.assert_close(r["hier"]["grads"][name], grad, **tol)
        st = r["stats"]
        off_node = int((nodes[:, 0] != rank // 2).sum())
        assert st.inter_rows == off_node and st.inter_rows <= st.flat_inter_rows


def test_layer_rejects_an_impossible_node_limit():
    from dualpipe_ext import moe

    with pytest.raises(ValueError, match="topk_nodes must be None or a positive int"):
        moe.MoEConfig(hidden=8, moe_intermediate=4, num_experts=8, topk=2, topk_nodes=0)
    cfg = moe.MoEConfig(hidden=8, moe_intermediate=4, num_experts=8, topk=2, topk_nodes=1, ranks_per_node=1)
    layer = moe.MoE(cfg)  # one process: one node, the limit binds nothing
    assert layer.num_nodes == 1 and layer(torch.randn(5, 8)).shape == (5, 8)
    # hierarchical on one process: one node, the exchanges stay local and equal the flat layer
    hier = moe.MoE(moe.MoEConfig(hidden=8, moe_intermediate=4, num_experts=8, topk=2, hierarchical=True))
    hier.load_state_dict(layer.state_dict())
    x = torch.randn(7, 8)
    stats = []
    hier.register_dispatch_hook(lambda lay, handle: stats.append(lay.dispatch_stats(handle)))
    torch.testing.assert_close(hier(x), layer(x))
    assert stats[0].received_rows == 7
    st = stats[0].nodes
    assert st.inter_rows == 0 and st.flat_inter_rows == 0 and st.intra_rows == 0
