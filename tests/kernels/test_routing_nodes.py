"""Node-limited routing: Triton kernel against its reference, and the node limit itself."""
import pytest
import torch

from dualpipe_ext.kernels._common import poison_outputs
from dualpipe_ext.kernels.routing import check_node_limit, route, route_reference

from test_routing import grid_bias, grid_logits

CASES = [
    # num_tokens, num_experts, topk, n_group, topk_group, num_nodes, topk_nodes, score_func, with_bias
    (0, 8, 2, 1, 1, 2, 1, "softmax", False),
    (97, 64, 8, 8, 4, 8, 4, "sigmoid", True),  # DeepSeek-V3's gate (groups are nodes), scaled down
    (97, 64, 8, 1, 1, 4, 2, "sigmoid", True),  # nodes alone
    (123, 32, 6, 8, 3, 4, 2, "sigmoid", True),  # groups inside nodes
    (123, 32, 4, 2, 1, 8, 2, "softmax", False),  # nodes inside groups
    (200, 16, 3, 1, 1, 4, 3, "softmax", True),  # ceil(3 / 3) = 1 score per node
    (300, 24, 5, 1, 1, 3, 2, "sigmoid", False),  # ceil(5 / 2) = 3 scores per node
]


def _nodes_per_token(idx: torch.Tensor, num_experts: int, num_nodes: int) -> torch.Tensor:
    node = idx // (num_experts // num_nodes)
    hit = torch.zeros(idx.shape[0], num_nodes, dtype=torch.bool).scatter_(1, node, True)
    return hit.sum(1)


@pytest.mark.parametrize("num_tokens,num_experts,topk,n_group,topk_group,num_nodes,topk_nodes,score_func,with_bias",
                         CASES)
def test_node_limited_route_matches_reference(num_tokens, num_experts, topk, n_group, topk_group, num_nodes,
                                              topk_nodes, score_func, with_bias):
    logits = grid_logits(num_tokens, num_experts)
    bias = grid_bias(num_experts) if with_bias else None
    args = (topk, score_func, n_group, topk_group, bias, 1.5)
    nodes = dict(num_nodes=num_nodes, topk_nodes=topk_nodes)
    with poison_outputs():
        idx, weights = route(logits, *args, **nodes)
    ref_idx, ref_weights = route_reference(logits, *args, **nodes)
    assert torch.equal(idx, ref_idx)
    assert torch.allclose(weights, ref_weights, rtol=2e-6, atol=1e-7)
    if num_tokens:
        assert int(_nodes_per_token(idx, num_experts, num_nodes).max()) <= topk_nodes
        assert bool((idx.sort(1).values.diff(dim=1) > 0).all())  # distinct experts


def test_node_limit_binds_on_random_inputs():
    # without the limit tokens spread over more nodes; with it never over topk_nodes
    torch.manual_seed(1)
    logits, bias = torch.randn(512, 64), torch.randn(64) * 0.1
    free, _ = route_reference(logits, 8, "sigmoid", 8, 8, bias)
    limited, _ = route_reference(logits, 8, "sigmoid", 8, 8, bias, num_nodes=8, topk_nodes=3)
    assert int(_nodes_per_token(free, 64, 8).max()) > 3
    assert int(_nodes_per_token(limited, 64, 8).max()) <= 3


def test_node_score_sums_best_experts():
    # node 0: 0.9, 0.1 (sum 1.0); node 1: 0.6, 0.55 (sum 1.15): top-2 sums choose node 1
    scores = torch.tensor([[0.9, 0.1, 0.6, 0.55]])
    idx, _ = route_reference(torch.logit(scores), 2, "sigmoid", num_nodes=2, topk_nodes=1)
    assert idx.tolist() == [[2, 3]]
    idx, _ = route_reference(torch.logit(scores), 1, "sigmoid", num_nodes=2, topk_nodes=1)
    assert idx.tolist() == [[0]]  # one score per node: node 0's 0.9 wins


def test_node_limit_gradients_match_reference():
    logits = grid_logits(37, 32).requires_grad_()
    ref_logits = logits.detach().clone().requires_grad_()
    bias = grid_bias(32)
    kw = dict(num_nodes=4, topk_nodes=2)
    idx, w = route(logits, 4, "sigmoid", 1, 1, bias, **kw)
    ref_idx, rw = route_reference(ref_logits, 4, "sigmoid", 1, 1, bias, **kw)
    assert torch.equal(idx, ref_idx)
    g = torch.randn_like(w)
    (w * g).sum().backward()
    (rw * g).sum().backward()
    assert torch.allclose(logits.grad, ref_logits.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_experts=12, topk=2, n_group=1, topk_group=1, num_nodes=5, topk_nodes=1), "divisible by num_nodes"),
    (dict(num_experts=16, topk=2, n_group=1, topk_group=1, num_nodes=4, topk_nodes=5), "must not exceed num_nodes"),
    (dict(num_experts=16, topk=5, n_group=1, topk_group=1, num_nodes=4, topk_nodes=1), "exceeds the 4 experts"),
    (dict(num_experts=24, topk=2, n_group=3, topk_group=1, num_nodes=2, topk_nodes=1), "divide one another"),
    (dict(num_experts=32, topk=8, n_group=8, topk_group=4, num_nodes=4, topk_nodes=1), "exceeds the 4 experts"),
    (dict(num_experts=16, topk=2, n_group=1, topk_group=1, num_nodes=0, topk_nodes=1), "positive int"),
])
def test_bad_node_limits(kwargs, match):
    with pytest.raises(ValueError, match=match):
        check_node_limit(**kwargs)
    logits = torch.randn(3, kwargs["num_experts"])
    with pytest.raises(ValueError, match=match):
        route(logits, kwargs["topk"], "sigmoid", kwargs["n_group"], kwargs["topk_group"],
              num_nodes=kwargs["num_nodes"], topk_nodes=kwargs["topk_nodes"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CPU twin: test_node_limited_route_matches_reference)")
@pytest.mark.parametrize("num_tokens,n_group,topk_group,num_nodes,topk_nodes", [
    (4096, 8, 4, 8, 4),  # DeepSeek-V3: groups are nodes
    (4096, 8, 4, 4, 2),  # 2 groups per node
    (1025, 1, 1, 8, 3),  # nodes alone, 3 scores per node
])
def test_node_limited_route_on_cuda_matches_reference(num_tokens, n_group, topk_group, num_nodes, topk_nodes):
    logits = grid_logits(num_tokens, 256).cuda()
    bias = grid_bias(256).cuda()
    args = (8, "sigmoid", n_group, topk_group, bias, 2.5)
    nodes = dict(num_nodes=num_nodes, topk_nodes=topk_nodes)
    with poison_outputs():
        idx, weights = route(logits, *args, **nodes, impl="triton")
    ref_idx, ref_weights = route_reference(logits, *args, **nodes)
    assert torch.equal(idx, ref_idx)
    assert torch.allclose(weights, ref_weights, rtol=2e-6, atol=1e-7)
    assert int(_nodes_per_token(idx.cpu(), 256, num_nodes).max()) <= topk_nodes
