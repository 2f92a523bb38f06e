import pytest
import torch
from moe_kernel_inputs import random_topk_idx

from dualpipe_ext.kernels._common import poison_outputs
from dualpipe_ext.kernels.dispatch_layout import dispatch_layout, dispatch_layout_reference

CASES = [
    # num_tokens, num_topk, num_experts, world, drop, skew
    (0, 2, 8, 2, 0.0, None),
    (1, 1, 4, 4, 0.0, None),
    (1, 8, 64, 8, 0.0, None),
    (97, 8, 64, 8, 0.1, None),
    (123, 3, 12, 3, 0.0, None),
    (1025, 8, 64, 8, 0.0, None),
    (3001, 2, 16, 4, 0.2, None),
    (500, 1, 8, 8, 0.0, "expert"),
    (257, 4, 32, 4, 0.0, "rank"),
    (200, 6, 8, 8, 0.5, None),  # expand layout: one "rank" per expert
    (64, 5, 5, 1, 1.0, None),  # every slot empty
]


def _loop_layout(topk_idx, num_experts, world):
    """Token-by-token definition, to check the reference itself."""
    per_rank = num_experts // world
    num_tokens = topk_idx.shape[0]
    per_expert = [0] * num_experts
    in_rank = [[False] * world for _ in range(num_tokens)]
    for t in range(num_tokens):
        for e in topk_idx[t].tolist():
            if e >= 0:
                per_expert[e] += 1
                in_rank[t][e // per_rank] = True
    send_pos = [[-1] * world for _ in range(num_tokens)]
    row = 0
    for r in range(world):
        for t in range(num_tokens):
            if in_rank[t][r]:
                send_pos[t][r] = row
                row += 1
    per_rank_counts = [sum(in_rank[t][r] for t in range(num_tokens)) for r in range(world)]
    return per_expert, per_rank_counts, in_rank, send_pos


def test_reference_matches_token_loop():
    topk_idx = random_topk_idx(50, 3, 12, drop=0.2)
    ref = dispatch_layout_reference(topk_idx, 12, 4)
    per_expert, per_rank, in_rank, send_pos = _loop_layout(topk_idx, 12, 4)
    assert ref.num_tokens_per_expert.tolist() == per_expert
    assert ref.num_tokens_per_rank.tolist() == per_rank
    assert ref.is_token_in_rank.tolist() == in_rank
    assert ref.send_pos.tolist() == send_pos


@pytest.mark.parametrize("num_tokens,num_topk,num_experts,world,drop,skew", CASES)
def test_triton_matches_reference(num_tokens, num_topk, num_experts, world, drop, skew):
    topk_idx = random_topk_idx(num_tokens, num_topk, num_experts, drop=drop, skew=skew)
    with poison_outputs():
        out = dispatch_layout(topk_idx, num_experts, world)  # Triton: DUALPIPE_EXT_TRITON=1
    ref = dispatch_layout_reference(topk_idx, num_experts, world)
    for name, got, want in zip(ref._fields, out, ref):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(got, want), name
    # the send buffer is filled exactly: valid positions are a permutation of its rows
    valid = out.send_pos[out.send_pos >= 0]
    assert torch.equal(valid.sort().values, torch.arange(int(out.num_tokens_per_rank.sum())))


def test_torch_impl_is_reference():
    topk_idx = random_topk_idx(40, 2, 8)
    a = dispatch_layout(topk_idx, 8, 2, impl="reference")
    b = dispatch_layout(topk_idx, 8, 2, impl="triton")
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize(
    "topk_idx,num_experts,world,match",
    [
        (torch.tensor([[0, 8]]), 8, 2, r"\[0, 8\)"),
        (torch.tensor([[0, -2]]), 8, 2, "-1"),
        (torch.tensor([[0, 1]]), 8, 3, "divisible"),
        (torch.tensor([[0, 1]], dtype=torch.int32), 8, 2, "int64"),
        (torch.tensor([0, 1]), 8, 2, "2 dimensions"),
        (torch.tensor([[0, 1]]), 0, 1, "positive"),
    ],
)
def test_bad_input(topk_idx, num_experts, world, match):
    with pytest.raises(ValueError, match=match):
        dispatch_layout(topk_idx, num_experts, world)


def test_bad_impl():
    with pytest.raises(ValueError, match="impl must be one of"):
        dispatch_layout(torch.zeros(1, 1, dtype=torch.int64), 2, 1, impl="cuda")


def test_auto_runs_triton_here():
    # the suite checks the kernels, not the reference against itself
    from dualpipe_ext.kernels._common import use_triton

    assert use_triton("auto", torch.zeros(1))
    assert not use_triton("reference", torch.zeros(1))
