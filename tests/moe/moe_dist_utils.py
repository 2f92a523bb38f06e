"""Helpers of the MoE tests: a dense single-process reference of routing + experts, and
``run_ranks`` (from the shared ``dist_harness``) for the multi-process ones."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dist_harness import run_ranks  # noqa: F401 - re-exported for the MoE tests


def swiglu_expert(x, gate_up, down):
    """One expert: x [n, hidden], gate_up [2I, hidden], down [hidden, I]."""
    gate, up = (x @ gate_up.t()).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ down.t()


def dense_moe_reference(x, topk_idx, topk_weights, gate_up, down):
    """out[t] = sum_k w[t, k] * expert_{idx[t, k]}(x[t]) over slots with idx >= 0, token by token."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(topk_idx.shape[1]):
            e = int(topk_idx[t, k])
            if e >= 0:
                out[t] = out[t] + topk_weights[t, k] * swiglu_expert(x[t:t + 1], gate_up[e], down[e])[0]
    return out


def reference_router(x, gate, topk, mode, first_token=0):
    """Softmax router of the tests (differentiable in gate through the weights).

    mode "topk": top-k of the scores; "skewed": every token to experts 0..topk-1;
    "holes": top-k with the last slot of every even (global) token unused (-1, weight 0);
    ``first_token`` is the global index of ``x[0]``.
    """
    scores = torch.softmax(x @ gate.t(), dim=-1)
    if mode == "skewed":
        idx = torch.arange(topk).expand(x.shape[0], topk).contiguous()
    else:
        idx = scores.topk(topk, dim=-1).indices
    weights = scores.gather(1, idx)
    if mode == "holes" and topk > 1:
        idx = idx.clone()
        idx[(first_token % 2)::2, -1] = -1
        weights = torch.where(idx >= 0, weights, torch.zeros_like(weights))
    return idx, weights.float()


def load_weights(layer, p, rank, world):
    """Copy the dense model's weights ``p`` into ``layer`` (an ``MoE``): router, this rank's share of
    the routed experts, shared experts. Returns the rank's slice of the routed experts."""
    local = p["gate_up"].shape[0] // world
    share = slice(rank * local, (rank + 1) * local)
    with torch.no_grad():
        layer.gate.copy_(p["gate"])
        layer.experts.gate_up.copy_(p["gate_up"][share])
        layer.experts.down.copy_(p["down"][share])
        layer.shared.gate_up.copy_(p["shared_gate_up"])
        layer.shared.down.copy_(p["shared_down"])
    return share
