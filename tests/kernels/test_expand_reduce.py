import pytest
import torch
from moe_kernel_inputs import random_topk_idx

from dualpipe_ext.kernels._common import poison_outputs
from dualpipe_ext.kernels.expand_reduce import expand, reduce


def _expert_loop(recv_x, recv_idx, recv_weights, num_local_experts, weight_of_expert):
    """Per-expert loop: expert e scales its tokens by weight_of_expert[e]; weighted sum back."""
    out = torch.zeros(recv_x.shape, dtype=torch.float64)
    for e in range(num_local_experts):
        token_idx, slot = (recv_idx == e).nonzero(as_tuple=True)
        y = recv_x[token_idx].double() * weight_of_expert[e]
        out.index_add_(0, token_idx, y * recv_weights[token_idx, slot].double().unsqueeze(1))
    return out


@pytest.mark.parametrize("num_tokens,hidden,num_topk,num_local_experts", [(0, 8, 2, 4), (1, 97, 1, 1), (150, 33, 4, 6)])
def test_expand_groups_by_expert(num_tokens, hidden, num_topk, num_local_experts):
    recv_idx = random_topk_idx(num_tokens, num_topk, max(num_topk, num_local_experts), drop=0.3)
    recv_idx[recv_idx >= num_local_experts] = -1
    recv_x = torch.randn(num_tokens, hidden)
    with poison_outputs():
        expanded = expand(recv_x, recv_idx, num_local_experts)
    counts = torch.bincount(recv_idx[recv_idx >= 0], minlength=num_local_experts)
    assert torch.equal(expanded.num_tokens_per_local_expert, counts)
    # group e holds, in received-token order, the tokens that chose local expert e
    start = 0
    for e in range(num_local_experts):
        token_idx = (recv_idx == e).any(1).nonzero().flatten()
        assert torch.equal(expanded.expanded_x[start : start + len(token_idx)], recv_x[token_idx])
        start += len(token_idx)
    assert start == expanded.expanded_x.shape[0]
    assert torch.equal(expanded.expand_pos < 0, recv_idx < 0)


def test_expand_reduce_round_trip_and_gradient():
    num_local_experts = 4
    recv_idx = random_topk_idx(90, 3, 8, drop=0.2)
    recv_idx[recv_idx >= num_local_experts] = -1
    recv_x = torch.randn(90, 21, dtype=torch.float64, requires_grad=True)
    recv_weights = torch.rand(90, 3, requires_grad=True)
    scale = torch.arange(1, num_local_experts + 1, dtype=torch.float64)
    expanded = expand(recv_x, recv_idx, num_local_experts)
    expert_of_row = torch.repeat_interleave(torch.arange(num_local_experts), expanded.num_tokens_per_local_expert)
    expert_out = expanded.expanded_x * scale[expert_of_row].unsqueeze(1)
    with poison_outputs():
        out = reduce(expert_out, expanded.expand_pos, recv_weights)
    want = _expert_loop(recv_x, recv_idx, recv_weights, num_local_experts, scale)
    assert torch.allclose(out, want, rtol=1e-6, atol=1e-6)  # weights are float32
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (recv_x, recv_weights), grad)
    ref = torch.autograd.grad(_expert_loop(recv_x, recv_idx, recv_weights, num_local_experts, scale), (recv_x, recv_weights), grad)
    assert torch.allclose(got[0], ref[0], rtol=1e-6, atol=1e-6)
    assert torch.allclose(got[1], ref[1].float(), rtol=1e-5, atol=1e-5)


def test_expand_bad_input(monkeypatch):
    with pytest.raises(ValueError, match="one row per received token"):
        expand(torch.randn(3, 4), torch.zeros(2, 1, dtype=torch.int64), 2)
    monkeypatch.setenv("DUALPIPE_EXT_CHECKS", "1")  # value checks read the host: debug mode
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        expand(torch.randn(2, 4), torch.tensor([[0], [2]]), 2)
