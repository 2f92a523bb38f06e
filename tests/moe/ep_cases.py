"""Inputs of the EPBuffer tests: every rank can rebuild every other rank's tokens from a seed,
and a dense single-process reference of route -> experts -> combine to check against."""
from __future__ import annotations

import torch

ROUTINGS = ("random", "holes", "skewed", "empty-rank")


def tokens_of(rank: int, world: int, routing: str, max_tokens: int) -> int:
    if routing == "empty-rank" and rank == world - 1:
        return 0
    return max(0, max_tokens - (rank % 3))


def problem(rank: int, world: int, routing: str, num_experts: int, topk: int, hidden: int, max_tokens: int,
            seed: int = 0, dtype=torch.float32):
    """(x [n, hidden], topk_idx [n, topk] int64, topk_weights [n, topk] float32) of ``rank``.

    random: distinct random experts per token; holes: as random with some slots -1;
    skewed: every token to the experts of rank 0 (the others receive nothing);
    empty-rank: the last rank has no tokens.
    """
    g = torch.Generator().manual_seed(1000 * seed + rank)
    n = tokens_of(rank, world, routing, max_tokens)
    x = torch.randn(n, hidden, generator=g).to(dtype)
    if routing == "skewed":
        local = num_experts // world
        idx = torch.rand(n, local, generator=g).argsort(1)[:, :min(topk, local)]
        idx = torch.cat([idx, torch.full((n, topk - idx.shape[1]), -1)], 1) if idx.shape[1] < topk else idx
    else:
        idx = torch.rand(n, num_experts, generator=g).argsort(1)[:, :topk]
    idx = idx.to(torch.int64).contiguous()
    if routing == "holes" and n:
        idx[::2, -1] = -1
    w = torch.rand(n, topk, generator=g)
    w = torch.where(idx >= 0, w, torch.zeros_like(w))
    return x, idx, w


def valid_rows(recv_idx: torch.Tensor) -> torch.Tensor:
    """Rows of a capacity-sized dispatch result that carry a token: [num_valid] int64, in order."""
    return (recv_idx >= 0).any(1).nonzero().flatten()
