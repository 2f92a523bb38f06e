"""Bad input raises a clear ValueError before any payload moves, on every rank alike."""
from __future__ import annotations

import pytest
import torch

from moe_dist_utils import run_ranks


def _inputs(rank, bad_rank, kind):
    x = torch.randn(5, 8)
    idx = torch.tensor([[0, 1], [2, 3], [1, 2], [3, 0], [0, 2]], dtype=torch.int64)
    w = torch.full((5, 2), 0.5)
    num_experts = 4
    if rank == bad_rank:
        if kind == "topk_too_large":
            idx, w = torch.zeros(5, 6, dtype=torch.int64), torch.zeros(5, 6)
        elif kind == "not_divisible":
            num_experts = 3
        elif kind == "index_out_of_range":
            idx[2, 1] = 4
        elif kind == "nan_weights":
            w[1, 0] = float("nan")
        elif kind == "idx_dtype":
            idx = idx.int()
        elif kind == "x_device":
            x = x.to("meta")
        elif kind == "hidden_mismatch":
            x = torch.randn(5, 16)
    return x, idx, w, num_experts


CASES = [  # kind, bad rank, message expected on the bad rank
    ("topk_too_large", 1, "must not exceed num_experts"),
    ("not_divisible", 0, "divisible by the expert-parallel size"),
    ("index_out_of_range", 1, "found 4"),
    ("nan_weights", 1, "NaN"),
    ("idx_dtype", 0, "int64"),
    ("x_device", 1, "share a device"),
    ("hidden_mismatch", 1, "hidden ranges over [8, 16]"),
]


def _worker(rank, world):
    from dualpipe_ext import moe

    messages = {}
    for kind, bad_rank, _ in CASES:
        x, idx, w, num_experts = _inputs(rank, bad_rank, kind)
        try:
            moe.dispatch(x, idx, w, num_experts)
        except ValueError as e:
            messages[kind] = str(e)
        else:
            messages[kind] = None
    # combine with the wrong number of rows on one rank
    x, idx, w, num_experts = _inputs(rank, -1, "")
    recv_x, recv_idx, recv_w, handle = moe.dispatch(x, idx, w, num_experts)
    y = recv_x if rank == 0 else recv_x[:-1]
    try:
        moe.combine(y, handle)
        messages["combine_rows"] = None
    except ValueError as e:
        messages["combine_rows"] = str(e)
    # the group still works after all these errors
    out = moe.combine(recv_x, handle)
    return messages, torch.equal(out, _expected(x, idx))


def _expected(x, idx):
    # y = recv_x on every rank: each token comes back once per rank holding one of its experts
    num_ranks_used = torch.stack([((idx // 2) == r).any(1) for r in range(2)], 1).sum(1, keepdim=True)
    return x * num_ranks_used


def test_bad_input_raises_on_every_rank_without_hanging():
    results = run_ranks(_worker, 2, timeout_s=90)
    for rank, (messages, group_ok) in enumerate(results):
        assert group_ok, rank
        for kind, bad_rank, expected in CASES:
            msg = messages[kind]
            assert msg is not None, (kind, rank)
            if kind == "hidden_mismatch":
                assert expected in msg, (kind, rank, msg)
            elif rank == bad_rank:
                assert expected in msg and f"rank {rank}" in msg, (kind, rank, msg)
            else:
                assert f"rank(s) [{bad_rank}]" in msg, (kind, rank, msg)
        assert messages["combine_rows"] is not None
        assert ("rows" in messages["combine_rows"]) == (rank == 1), messages["combine_rows"]


def test_single_process_errors_and_config_checks():
    from dualpipe_ext import moe

    x, idx, w, _ = _inputs(0, 0, "index_out_of_range")
    with pytest.raises(ValueError, match=r"found 4"):
        moe.dispatch(x, idx, w, 4)
    with pytest.raises(ValueError, match="topk_weights must be a float32"):
        moe.dispatch(x, idx, w.double(), 4)
    with pytest.raises(ValueError, match="topk .* must not exceed num_experts"):
        moe.MoEConfig(hidden=8, moe_intermediate=4, num_experts=4, topk=5)
    with pytest.raises(ValueError, match="topk_group .* must not exceed n_group"):
        moe.MoEConfig(hidden=8, moe_intermediate=4, num_experts=8, topk=2, n_group=2, topk_group=3)
    with pytest.raises(ValueError, match="divisible by n_group"):
        moe.MoEConfig(hidden=8, moe_intermediate=4, num_experts=6, topk=2, n_group=4, topk_group=1)
    with pytest.raises(ValueError, match="score_func"):
        moe.MoEConfig(hidden=8, moe_intermediate=4, num_experts=4, topk=2, score_func="relu")
    with pytest.raises(ValueError, match="norm_topk_prob"):
        moe.MoEConfig(hidden=8, moe_intermediate=4, num_experts=4, topk=2, norm_topk_prob="yes")
