import pytest
import torch

from dualpipe_ext.kernels._common import poison_outputs
from dualpipe_ext.kernels.routing import route, route_reference


def grid_logits(num_tokens, num_experts, dtype=torch.float32):
    """Each row a permutation of evenly spaced values: no near-ties between experts."""
    ranks = torch.rand(num_tokens, num_experts).argsort(dim=1).float()
    return (ranks * (6.0 / max(1, num_experts)) - 3.0).to(dtype)


def grid_bias(num_experts):
    return torch.randint(0, 8, (num_experts,)).float() / 64


CASES = [
    # num_tokens, num_experts, topk, n_group, topk_group, score_func, with_bias
    (0, 8, 2, 1, 1, "softmax", False),
    (1, 1, 1, 1, 1, "softmax", False),
    (1, 4, 4, 2, 2, "sigmoid", True),
    (97, 64, 8, 8, 4, "sigmoid", True),  # DeepSeek-V3's gate, scaled down
    (97, 64, 8, 8, 4, "softmax", False),
    (123, 12, 3, 3, 2, "sigmoid", False),
    (300, 16, 4, 1, 1, "sigmoid", True),
    (300, 32, 1, 4, 1, "softmax", True),
    (1025, 8, 2, 1, 1, "softmax", False),
    (2049, 6, 5, 2, 2, "sigmoid", False),
]


@pytest.mark.parametrize("num_tokens,num_experts,topk,n_group,topk_group,score_func,with_bias", CASES)
def test_route_matches_reference(num_tokens, num_experts, topk, n_group, topk_group, score_func, with_bias):
    logits = grid_logits(num_tokens, num_experts)
    bias = grid_bias(num_experts) if with_bias else None
    args = (topk, score_func, n_group, topk_group, bias, 2.5)
    with poison_outputs():
        idx, weights = route(logits, *args)  # Triton: DUALPIPE_EXT_TRITON=1
    ref_idx, ref_weights = route_reference(logits, *args)
    assert idx.dtype == torch.int64 and weights.dtype == torch.float32
    assert idx.shape == weights.shape == (num_tokens, topk)
    assert torch.equal(idx, ref_idx)
    assert torch.allclose(weights, ref_weights, rtol=2e-6, atol=1e-7)
    if score_func == "sigmoid" and num_tokens:
        assert torch.allclose(weights.sum(1), torch.full((num_tokens,), 2.5), rtol=1e-5)


def test_reference_group_limit():
    # group scores 0.9 (group 0, max) vs 0.8+0.7 (group 1): max picks group 0, top-2 sum group 1
    scores = torch.tensor([[0.9, 0.1, 0.8, 0.7]])
    logits = torch.logit(scores)
    idx, _ = route_reference(logits, 1, "sigmoid", n_group=2, topk_group=1)
    assert idx.tolist() == [[0]]
    idx, weights = route_reference(logits, 1, "sigmoid", n_group=2, topk_group=1, bias=torch.zeros(4))
    assert idx.tolist() == [[2]]
    assert torch.allclose(weights, torch.ones(1, 1))


@pytest.mark.parametrize("n_group,topk_group,with_bias", [(1, 1, False), (4, 2, False), (4, 3, True)])
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_ties_go_to_lower_index(n_group, topk_group, with_bias, score_func):
    logits = torch.zeros(5, 16)  # every expert and every group ties
    bias = torch.zeros(16) if with_bias else None
    idx, _ = route(logits, 3, score_func, n_group, topk_group, bias)
    assert idx.tolist() == [[0, 1, 2]] * 5
    assert torch.equal(idx, route_reference(logits, 3, score_func, n_group, topk_group, bias)[0])


def test_skewed_routing():
    logits = grid_logits(200, 16)
    logits[:, 5] = 50.0  # every token prefers expert 5
    idx, weights = route(logits, 2, "softmax")
    assert torch.all(idx[:, 0] == 5)
    ref_idx, ref_weights = route_reference(logits, 2, "softmax")
    assert torch.equal(idx, ref_idx) and torch.allclose(weights, ref_weights, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_low_precision_logits(dtype, with_bias):
    # scores are computed in fp32 from the up-cast logits in both implementations
    logits = grid_logits(150, 32, dtype)
    bias = grid_bias(32) if with_bias else None
    with poison_outputs():
        idx, weights = route(logits, 4, "sigmoid", 4, 2, bias)
    ref_idx, ref_weights = route_reference(logits, 4, "sigmoid", 4, 2, bias)
    assert torch.equal(idx, ref_idx)
    assert torch.allclose(weights, ref_weights, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize(
    "num_experts,topk,n_group,topk_group,score_func,with_bias",
    [
        (8, 2, 1, 1, "softmax", False),
        (64, 8, 8, 4, "sigmoid", True),
        (12, 3, 3, 2, "sigmoid", False),
        (16, 4, 4, 2, "softmax", True),
    ],
)
def test_route_backward(num_experts, topk, n_group, topk_group, score_func, with_bias):
    logits = grid_logits(77, num_experts).requires_grad_()
    bias = grid_bias(num_experts) if with_bias else None
    args = (topk, score_func, n_group, topk_group, bias, 2.5)
    grad = torch.randn(77, topk)
    with poison_outputs():
        (got,) = torch.autograd.grad(route(logits, *args)[1], logits, grad)
    (want,) = torch.autograd.grad(route_reference(logits, *args)[1], logits, grad)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def test_route_backward_fp64_logits():
    logits = grid_logits(40, 8, torch.float64).requires_grad_()
    grad = torch.randn(40, 3)
    (got,) = torch.autograd.grad(route(logits, 3, "sigmoid", 2, 1)[1], logits, grad)
    (want,) = torch.autograd.grad(route_reference(logits, 3, "sigmoid", 2, 1)[1], logits, grad)
    assert got.dtype == torch.float64
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(topk=9), "must not exceed the number of experts"),
        (dict(topk=2, n_group=3), "divisible by n_group"),
        (dict(topk=2, n_group=2, topk_group=3), "topk_group"),
        (dict(topk=5, n_group=4, topk_group=2), "eligible groups"),
        (dict(topk=2, score_func="relu"), "score_func"),
        (dict(topk=2, bias=torch.zeros(7)), "shape"),
        (dict(topk=2, bias=torch.zeros(8, dtype=torch.float64)), "float32"),
        (dict(topk=2, bias=torch.zeros(8, device="meta")), "device"),
        (dict(topk=0), "positive"),
        (dict(topk=2, n_group=8, topk_group=2, bias=torch.zeros(8)), "2 experts per group"),
    ],
)
def test_route_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        route(torch.randn(4, 8), **kwargs)


def test_route_rejects_nan():
    logits = torch.randn(4, 8)
    logits[2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        route(logits, 2)


NORM_CASES = [
    # num_tokens, num_experts, topk, n_group, topk_group, score_func, with_bias
    (97, 8, 2, 1, 1, "softmax", False),  # Mixtral, Qwen3-MoE: softmax over all experts, top-k, renormalise
    (123, 12, 3, 3, 2, "softmax", False),
    (97, 16, 4, 4, 2, "sigmoid", True),  # DeepSeek-V3 with norm_topk_prob off
    (65, 6, 1, 1, 1, "sigmoid", False),
]


@pytest.mark.parametrize("norm_topk_prob", [None, True, False])
@pytest.mark.parametrize("num_tokens,num_experts,topk,n_group,topk_group,score_func,with_bias", NORM_CASES)
def test_route_norm_topk_prob(num_tokens, num_experts, topk, n_group, topk_group, score_func, with_bias,
                              norm_topk_prob):
    logits = grid_logits(num_tokens, num_experts).requires_grad_()
    bias = grid_bias(num_experts) if with_bias else None
    args = (topk, score_func, n_group, topk_group, bias, 2.5)
    grad = torch.randn(num_tokens, topk)
    with poison_outputs():
        idx, weights = route(logits, *args, norm_topk_prob=norm_topk_prob)
        (got,) = torch.autograd.grad(weights, logits, grad)
    ref_idx, ref_weights = route_reference(logits, *args, norm_topk_prob=norm_topk_prob)
    (want,) = torch.autograd.grad(ref_weights, logits, grad)
    assert torch.equal(idx, ref_idx)
    assert torch.allclose(weights, ref_weights, rtol=2e-6, atol=1e-7)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    normalised = score_func == "sigmoid" if norm_topk_prob is None else norm_topk_prob
    sums = weights.detach().sum(1)
    assert torch.allclose(sums, torch.full((num_tokens,), 2.5), rtol=1e-5) == normalised
    # the chosen experts do not depend on the normalisation
    assert torch.equal(idx, route_reference(logits, *args)[0])


def test_softmax_renormalised_is_softmax_over_the_chosen_experts():
    logits = grid_logits(50, 8)
    idx, weights = route(logits, 3, "softmax", norm_topk_prob=True)
    assert torch.allclose(weights, logits.gather(1, idx).softmax(dim=-1), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("score_func,with_bias", [("sigmoid", True), ("softmax", False)])
def test_route_no_tokens_grouped(impl, score_func, with_bias):
    # a rank without tokens is ordinary in expert parallelism
    logits = torch.zeros(0, 16, requires_grad=True)
    bias = grid_bias(16) if with_bias else None
    idx, weights = route(logits, 4, score_func, 4, 2, bias, 2.5, impl=impl)
    assert idx.shape == weights.shape == (0, 4) and idx.dtype == torch.int64
    (grad,) = torch.autograd.grad(weights.sum(), logits)
    assert grad.shape == (0, 16)


def test_route_bad_norm_topk_prob():
    with pytest.raises(ValueError, match="norm_topk_prob"):
        route(torch.randn(4, 8), 2, norm_topk_prob=1)
