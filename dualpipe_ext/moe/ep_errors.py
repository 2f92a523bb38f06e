"""``EPError``: why a rank's input to an expert-parallel exchange was rejected.

Both paths (``moe.dispatch``/``moe.combine`` and ``EPBuffer``) send a rank's code to every rank in place
of its rows (0: good input), so every rank raises the same ``ValueError`` naming each bad rank's code.
"""
from __future__ import annotations

import enum

__all__ = ["EPError"]


class EPError(enum.IntEnum):
    """Error codes of both expert-parallel paths; the values are what crosses the wire."""

    OK = 0
    X = 1  # x is not a [num_tokens, hidden] (float) tensor
    TOO_MANY_TOKENS = 2  # more tokens than the buffer's max_tokens
    HIDDEN = 3  # wrong hidden size
    DTYPE = 4  # wrong dtype
    DEVICE = 5  # wrong device
    TOPK_IDX = 6  # topk_idx is not a [num_tokens, num_topk] int64 tensor
    TOPK_WEIGHTS = 7  # topk_weights is not a float32 tensor of topk_idx's shape
    NUM_TOPK = 8  # num_topk above the buffer's max_topk
    NUM_EXPERTS = 9  # num_experts not a positive multiple of the group size
    TOPK_IDX_VALUES = 10  # topk_idx values out of range (read in debug mode or by the collective path)
    TOPK_WEIGHTS_VALUES = 11  # topk_weights not finite
    ROWS = 12  # y (or a gradient) does not have the rows the exchange delivered
    HANDLE = 13  # the handle is not from this buffer / not a dispatch handle
    FP8_DTYPE = 14  # fp8 dispatch of a dtype it does not quantize
    FP8_ROW_BYTES = 15  # fp8 rows do not fit the buffer's rows
    SHAPES = 16  # x, topk_idx and topk_weights disagree in shape
    Y = 17  # y is not a [rows, hidden] float tensor
    DISAGREE = 99  # the ranks passed different num_experts or num_topk (decided by the receivers)
