"""Dispatch layout: which tokens go to which rank, and where each lands in the send buffer.

Given the experts each token chose, compute per-expert and per-rank token counts, the
token-by-rank membership matrix, and each token's row in a send buffer whose segments are
ordered by destination rank and, inside a segment, by token index. A token goes to a rank
once, however many of its experts live there. Experts are split evenly and contiguously
over ranks: expert ``e`` lives on rank ``e // (num_experts // world)``.

The same computation serves the expert side: with ``world = num_experts =
num_local_experts`` applied to received expert indices it gives each received token's row
in a buffer grouped by local expert (see ``expand_reduce.expand``).

Triton path: three small kernels (per-block counts, a scan over blocks per column, final
positions), so no atomics and a deterministic result.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ._common import check_tensor, new_output, next_pow2, use_triton

from ._triton import tl, triton  # None without Triton: the references run without it

__all__ = ["DispatchLayout", "dispatch_layout", "dispatch_layout_reference"]


class DispatchLayout(NamedTuple):
    """Result of ``dispatch_layout``. All tensors live on the device of ``topk_idx``."""

    num_tokens_per_expert: torch.Tensor  # [num_experts] int64: (token, slot) pairs choosing each expert
    num_tokens_per_rank: torch.Tensor  # [world] int64: tokens sent to each rank (once per rank)
    is_token_in_rank: torch.Tensor  # [num_tokens, world] bool: token t goes to rank r
    send_pos: torch.Tensor  # [num_tokens, world] int64: row of token t in the send buffer, -1 if not sent


def _check(topk_idx: torch.Tensor, num_experts: int, world: int, check_indices: bool) -> None:
    check_tensor("topk_idx", topk_idx, ndim=2, dtypes=(torch.int64,))
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if not isinstance(world, int) or world < 1:
        raise ValueError(f"world (the ranks the experts are split over) must be a positive int, got {world!r}")
    if num_experts % world != 0:
        raise ValueError(f"num_experts ({num_experts}) must be divisible by world, the ranks the experts are split "
                         f"over ({world})")
    if check_indices and topk_idx.numel():
        bad = (topk_idx < -1) | (topk_idx >= num_experts)
        if bool(bad.any()):
            raise ValueError(
                f"topk_idx entries must be -1 (no expert) or in [0, {num_experts}), found {topk_idx[bad][0].item()}"
            )


def dispatch_layout(
    topk_idx: torch.Tensor,
    num_experts: int,
    world: int,
    *,
    check_indices: bool = True,
    impl: str = "auto",
) -> DispatchLayout:
    """Counts, membership and send-buffer rows for dispatching tokens to expert ranks.

    Args:
        topk_idx: [num_tokens, num_topk] int64, chosen experts; -1 marks an unused slot.
        num_experts: total number of experts, divisible by ``world``.
        world: number of ranks the experts are split over.
        check_indices: verify index range (costs a device-to-host sync on CUDA).
        impl: "auto" | "triton" | "reference".
    """
    _check(topk_idx, num_experts, world, check_indices)
    if use_triton(impl, topk_idx):
        return _dispatch_layout_triton(topk_idx, num_experts, world)
    return dispatch_layout_reference(topk_idx, num_experts, world)


# Triton

# 64 tokens x 8 slots x 32 ranks/experts per compare tile keeps the int tiles of one
# program small; not tuned on a GPU yet (this step moves only num_tokens * top-k indices).
_BLOCK_T = 64
_COL_BLOCK = 32
_SCAN_BLOCK = 256

if triton is not None:

    @triton.jit
    def _load_ranks(topk_idx_ptr, pid, num_tokens, num_topk, experts_per_rank, BLOCK_T: tl.constexpr,
                    K_PAD: tl.constexpr):
        t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        k = tl.arange(0, K_PAD)
        mask = (t < num_tokens)[:, None] & (k < num_topk)[None, :]
        idx = tl.load(topk_idx_ptr + t.to(tl.int64)[:, None] * num_topk + k[None, :], mask=mask, other=-1)
        rank = tl.where(idx >= 0, idx // experts_per_rank, -1)
        return t, idx, rank

    @triton.jit
    def _layout_count_kernel(topk_idx_ptr, block_counts_ptr, num_tokens, num_topk, num_experts, world,
                             experts_per_rank, BLOCK_T: tl.constexpr, K_PAD: tl.constexpr,
                             COL_BLOCK: tl.constexpr):
        # block_counts[pid, :world]: tokens of this block per rank; [pid, world:]: slots per expert
        pid = tl.program_id(0)
        t, idx, rank = _load_ranks(topk_idx_ptr, pid, num_tokens, num_topk, experts_per_rank, BLOCK_T, K_PAD)
        row = block_counts_ptr + pid.to(tl.int64) * (world + num_experts)
        for c0 in range(0, world, COL_BLOCK):
            r = c0 + tl.arange(0, COL_BLOCK)
            in_rank = tl.max((rank[:, :, None] == r[None, None, :]).to(tl.int64), axis=1)
            tl.store(row + r, tl.sum(in_rank, axis=0), mask=r < world)
        for c0 in range(0, num_experts, COL_BLOCK):
            e = c0 + tl.arange(0, COL_BLOCK)
            hits = tl.sum((idx[:, :, None] == e[None, None, :]).to(tl.int64), axis=1)
            tl.store(row + world + e, tl.sum(hits, axis=0), mask=e < num_experts)

    @triton.jit
    def _layout_scan_kernel(block_counts_ptr, num_tokens_per_rank_ptr, num_tokens_per_expert_ptr, num_blocks,
                            world, num_experts, SCAN_BLOCK: tl.constexpr):
        # One program per column: totals, and (rank columns) exclusive prefix over blocks in place.
        col = tl.program_id(0)
        num_cols = world + num_experts
        total = tl.zeros((), dtype=tl.int64)
        for b0 in range(0, num_blocks, SCAN_BLOCK):
            b = b0 + tl.arange(0, SCAN_BLOCK)
            ptrs = block_counts_ptr + b.to(tl.int64) * num_cols + col
            counts = tl.load(ptrs, mask=b < num_blocks, other=0)
            if col < world:
                tl.store(ptrs, total + tl.cumsum(counts, axis=0) - counts, mask=b < num_blocks)
            total += tl.sum(counts, axis=0)
        if col < world:
            tl.store(num_tokens_per_rank_ptr + col, total)
        else:
            tl.store(num_tokens_per_expert_ptr + (col - world), total)

    @triton.jit
    def _layout_pos_kernel(topk_idx_ptr, block_counts_ptr, num_tokens_per_rank_ptr, is_token_in_rank_ptr,
                           send_pos_ptr, num_tokens, num_topk, num_experts, world, experts_per_rank,
                           BLOCK_T: tl.constexpr, K_PAD: tl.constexpr, COL_BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        t, idx, rank = _load_ranks(topk_idx_ptr, pid, num_tokens, num_topk, experts_per_rank, BLOCK_T, K_PAD)
        block_offsets = block_counts_ptr + pid.to(tl.int64) * (world + num_experts)
        rank_base = tl.zeros((), dtype=tl.int64)  # rows of all ranks before this column chunk
        for c0 in range(0, world, COL_BLOCK):
            r = c0 + tl.arange(0, COL_BLOCK)
            rmask = r < world
            in_rank = tl.max((rank[:, :, None] == r[None, None, :]).to(tl.int64), axis=1)
            totals = tl.load(num_tokens_per_rank_ptr + r, mask=rmask, other=0)
            rank_start = rank_base + tl.cumsum(totals, axis=0) - totals
            rank_base += tl.sum(totals, axis=0)
            block_start = tl.load(block_offsets + r, mask=rmask, other=0)
            pos = (rank_start + block_start)[None, :] + tl.cumsum(in_rank, axis=0) - in_rank
            out = t.to(tl.int64)[:, None] * world + r[None, :]
            mask = (t < num_tokens)[:, None] & rmask[None, :]
            tl.store(send_pos_ptr + out, tl.where(in_rank > 0, pos, -1), mask=mask)
            tl.store(is_token_in_rank_ptr + out, in_rank > 0, mask=mask)


def _dispatch_layout_triton(topk_idx: torch.Tensor, num_experts: int, world: int) -> DispatchLayout:
    num_tokens, num_topk = topk_idx.shape
    device = topk_idx.device
    topk_idx = topk_idx.contiguous()
    num_blocks = triton.cdiv(num_tokens, _BLOCK_T)
    k_pad = next_pow2(num_topk)
    experts_per_rank = num_experts // world
    block_counts = torch.empty((num_blocks, world + num_experts), dtype=torch.int64, device=device)
    num_tokens_per_rank = new_output((world,), torch.int64, device)
    num_tokens_per_expert = new_output((num_experts,), torch.int64, device)
    is_token_in_rank = new_output((num_tokens, world), torch.bool, device)
    send_pos = new_output((num_tokens, world), torch.int64, device)
    if num_blocks:
        _layout_count_kernel[(num_blocks,)](
            topk_idx, block_counts, num_tokens, num_topk, num_experts, world, experts_per_rank,
            BLOCK_T=_BLOCK_T, K_PAD=k_pad, COL_BLOCK=_COL_BLOCK,
        )
    _layout_scan_kernel[(world + num_experts,)](
        block_counts, num_tokens_per_rank, num_tokens_per_expert, num_blocks, world, num_experts,
        SCAN_BLOCK=_SCAN_BLOCK,
    )
    if num_blocks:
        _layout_pos_kernel[(num_blocks,)](
            topk_idx, block_counts, num_tokens_per_rank, is_token_in_rank, send_pos, num_tokens, num_topk,
            num_experts, world, experts_per_rank, BLOCK_T=_BLOCK_T, K_PAD=k_pad, COL_BLOCK=_COL_BLOCK,
        )
    return DispatchLayout(num_tokens_per_expert, num_tokens_per_rank, is_token_in_rank, send_pos)


# torch reference


def dispatch_layout_reference(topk_idx: torch.Tensor, num_experts: int, world: int) -> DispatchLayout:
    """Plain PyTorch definition of ``dispatch_layout`` (same arguments, no checks)."""
    num_tokens = topk_idx.shape[0]
    valid = topk_idx >= 0
    num_tokens_per_expert = torch.bincount(topk_idx[valid], minlength=num_experts)
    rank_of_slot = torch.where(valid, topk_idx // (num_experts // world), -1)
    ranks = torch.arange(world, device=topk_idx.device)
    is_token_in_rank = (rank_of_slot.unsqueeze(-1) == ranks).any(dim=1).reshape(num_tokens, world)
    num_tokens_per_rank = is_token_in_rank.sum(dim=0, dtype=torch.int64)
    rank_start = torch.cumsum(num_tokens_per_rank, 0) - num_tokens_per_rank
    row_in_rank = torch.cumsum(is_token_in_rank.to(torch.int64), 0) - 1
    send_pos = torch.where(is_token_in_rank, row_in_rank + rank_start, -1)
    return DispatchLayout(num_tokens_per_expert, num_tokens_per_rank, is_token_in_rank, send_pos)
