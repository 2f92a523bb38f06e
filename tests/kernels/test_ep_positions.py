"""``compact_positions`` (the layout of an EPBuffer dispatch) against a loop over tokens, in a fixed,
small number of device operations (each one a launch on a GPU, on the host's time per dispatch)."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dualpipe_ext.kernels.ep_common import compact_positions


def _loop(topk_idx: torch.Tensor, num_experts: int, world: int):
    local = num_experts // world
    pos = torch.full((topk_idx.shape[0], world), -1, dtype=torch.int64)
    counts = torch.zeros(world, dtype=torch.int64)
    for t, row in enumerate(topk_idx.tolist()):
        for r in sorted({e // local for e in row if e >= 0}):
            pos[t, r] = counts[r]
            counts[r] += 1
    return pos, counts


@pytest.mark.parametrize("tokens,world,num_experts,topk",
                         list(itertools.product([0, 1, 9, 40], [1, 2, 3, 8], [24], [1, 4])))
def test_positions_and_counts_match_a_loop(tokens, world, num_experts, topk):
    g = torch.Generator().manual_seed(tokens * 100 + world * 10 + topk)
    idx = torch.randint(-1, num_experts, (tokens, topk), generator=g)  # -1: no expert in that slot
    pos, counts = compact_positions(idx, num_experts, world)
    want_pos, want_counts = _loop(idx, num_experts, world)
    assert pos.dtype == counts.dtype == torch.int64
    assert torch.equal(pos, want_pos) and torch.equal(counts, want_counts)


class _Ops(TorchDispatchMode):
    VIEWS = ("unsqueeze", "select", "slice", "view", "alias", "detach", "expand")

    def __init__(self) -> None:
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not any(v in str(func) for v in self.VIEWS):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_positions_take_six_device_operations():
    idx = torch.randint(-1, 64, (128, 8))
    compact_positions(idx, 64, 8)  # the rank table is made once per (world, device)
    with _Ops() as ops:
        compact_positions(idx, 64, 8)
    assert len(ops.ops) <= 6, ops.ops
