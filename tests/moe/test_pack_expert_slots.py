"""The collective dispatch packs each send row's local expert indices and weights without a host read
(the counts' transfer is the dispatch's only one), as a loop over the routing says."""
from __future__ import annotations

import itertools

import pytest
import torch

from dualpipe_ext.debug import HostReadCounter
from dualpipe_ext.kernels.dispatch_layout import dispatch_layout_reference
from dualpipe_ext.moe.dispatch import _pack_expert_slots


@pytest.mark.parametrize("tokens,world,topk", list(itertools.product([0, 1, 11], [1, 2, 4], [1, 3])))
def test_send_rows_carry_their_local_experts_and_weights(tokens, world, topk):
    experts = 8
    g = torch.Generator().manual_seed(tokens + 10 * world + 100 * topk)
    idx = torch.randint(-1, experts, (tokens, topk), generator=g)
    w = torch.rand(tokens, topk, generator=g)
    layout = dispatch_layout_reference(idx, experts, world)
    num_rows = int(layout.num_tokens_per_rank.sum())
    with HostReadCounter() as reads:
        send_idx, send_w = _pack_expert_slots(idx, w, layout.send_pos, num_rows, experts // world)
    assert reads.calls == [], reads.report()
    local = experts // world
    want_idx = torch.full((num_rows, topk), -1, dtype=torch.int64)
    want_w = torch.zeros(num_rows, topk)
    for t in range(tokens):
        for r in range(world):
            row = int(layout.send_pos[t, r])
            if row < 0:
                continue
            for k in range(topk):
                e = int(idx[t, k])
                if e >= 0 and e // local == r:
                    want_idx[row, k], want_w[row, k] = e - r * local, w[t, k]
    assert torch.equal(send_idx, want_idx) and torch.equal(send_w, want_w)
