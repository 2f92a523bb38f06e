"""Mixture-of-experts with expert parallelism: routing, dispatch/combine, the MoE layer.

    topk_idx, topk_weights = moe.route(logits, topk, score_func="sigmoid", n_group=8, topk_group=4, bias=b)
    recv_x, recv_idx, recv_weights, handle = moe.dispatch(x, topk_idx, topk_weights, num_experts, group)
    y = ...  # one row per received token: the weighted sum over its local experts
    out = moe.combine(y, handle)
"""
from __future__ import annotations

from typing import Any

from .dispatch import DispatchHandle, combine, combine_backward, dispatch, dispatch_backward
from .ep_buffer import EPBuffer, EPBufferError, EPHandle
from . import ep_ops  # noqa: F401  (it defines EPBuffer.dispatch and EPBuffer.combine)
from .experts import GroupedExperts, SharedExperts, experts_forward
from .layer import DispatchStats, MoE, MoEConfig

__all__ = ["route", "dispatch", "combine", "combine_backward", "dispatch_backward", "DispatchHandle", "EPBuffer",
           "EPHandle", "EPBufferError",
           "MoE", "MoEConfig", "DispatchStats",
           "GroupedExperts", "SharedExperts", "experts_forward"]


def __getattr__(name: str) -> Any:
    if name == "route":  # the routing kernel module loads on first use
        from dualpipe_ext.kernels.routing import route

        return route
    raise AttributeError(f"module 'dualpipe_ext.moe' has no attribute {name!r}")
