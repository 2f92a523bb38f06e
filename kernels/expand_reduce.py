"""Expert-side expand and reduce, built on dispatch_layout, permute and combine.

``expand`` copies each received token once per local expert it chose into a buffer grouped
by local expert (inside a group, in received-token order), ready for a grouped GEMM.
``reduce`` sums each token's expert outputs back, weighted by its routing weights.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ._common import check_tensor, checks_enabled
from .combine import combine
from .dispatch_layout import dispatch_layout
from .permute import permute

__all__ = ["Expanded", "expand", "reduce"]


class Expanded(NamedTuple):
    """Result of ``expand``."""

    expanded_x: torch.Tensor  # [num_expanded, hidden], rows grouped by local expert
    num_tokens_per_local_expert: torch.Tensor  # [num_local_experts] int64, rows of each group
    expand_pos: torch.Tensor  # [num_recv_tokens, num_topk] int64, row of (token, slot) or -1


def expand(
    recv_x: torch.Tensor,
    recv_idx: torch.Tensor,
    num_local_experts: int,
    *,
    num_rows: Optional[int] = None,
    num_sms: Optional[int] = None,
    impl: str = "auto",
) -> Expanded:
    """Group received tokens by local expert; differentiable in ``recv_x``.

    Args:
        recv_x: [num_recv_tokens, hidden] float.
        recv_idx: [num_recv_tokens, num_topk] int64, local expert of each slot or -1.
        num_local_experts: experts on this rank.
        num_rows: rows of ``expanded_x`` when known, e.g. the capacity ``num_recv_tokens *
            min(num_topk, num_local_experts)`` (no host read then); by default the number of valid
            entries of ``recv_idx`` (read on the host). Rows past the valid ones are unspecified.
    Index and position checks read the host, so they run in debug mode (``DUALPIPE_EXT_CHECKS=1``).
        num_sms: cap on the persistent grid of the copy.
    """
    check_tensor("recv_x", recv_x, ndim=2)
    check_tensor("recv_idx", recv_idx, ndim=2, dtypes=(torch.int64,))
    if recv_idx.shape[0] != recv_x.shape[0]:
        raise ValueError(
            f"recv_idx must have one row per received token ({recv_x.shape[0]}), got shape {tuple(recv_idx.shape)}"
        )
    if num_rows is not None and (not isinstance(num_rows, int) or num_rows < 0):
        raise ValueError(f"num_rows must be a non-negative int, got {num_rows!r}")
    checks = checks_enabled()
    layout = dispatch_layout(recv_idx, num_local_experts, num_local_experts, check_indices=checks, impl=impl)
    valid = recv_idx >= 0
    expand_pos = torch.where(valid, layout.send_pos.gather(1, recv_idx.clamp(min=0)), -1)
    total = int(layout.num_tokens_per_rank.sum()) if num_rows is None else num_rows
    expanded_x = permute(recv_x, expand_pos, total, num_sms=num_sms, impl=impl)
    return Expanded(expanded_x, layout.num_tokens_per_rank, expand_pos)


def reduce(
    expert_out: torch.Tensor,
    expand_pos: torch.Tensor,
    recv_weights: torch.Tensor,
    *,
    num_sms: Optional[int] = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Weighted sum of each received token's expert outputs; differentiable in both inputs.

    Args:
        expert_out: [num_expanded, hidden] float, rows as laid out by ``expand``.
        expand_pos: [num_recv_tokens, num_topk] int64 from ``expand``.
        recv_weights: [num_recv_tokens, num_topk] float32, aligned with ``expand_pos``.
    Returns:
        [num_recv_tokens, hidden] in the dtype of ``expert_out``.
    """
    return combine(expert_out, expand_pos, recv_weights, num_sms=num_sms, impl=impl)
