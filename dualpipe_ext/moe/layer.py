"""The expert-parallel MoE layer: router, dispatch, grouped experts, combine, shared experts."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .comm import group_rank, group_size
from .dispatch import combine, dispatch
from .experts import GroupedExperts, SharedExperts, experts_forward, linear
from .grouped_mm import BACKENDS

__all__ = ["MoEConfig", "MoE"]


@dataclass(frozen=True)
class MoEConfig:
    """Semantics of an MoE layer (DeepSeek-V3's gate and SwiGLU experts)."""

    hidden: int  # model width
    moe_intermediate: int  # intermediate width of each routed expert
    num_experts: int  # routed experts over the whole expert-parallel group
    topk: int  # experts chosen per token
    n_group: int = 1  # expert groups for group-limited routing
    topk_group: int = 1  # groups a token may choose from (<= n_group)
    score_func: str = "softmax"  # "softmax" or "sigmoid"
    routed_scaling_factor: float = 1.0  # multiplies the routing weights
    # normalise the chosen weights to sum 1 (before the scaling); None: for sigmoid only (DeepSeek-V3);
    # True with softmax: Mixtral and Qwen3-MoE (softmax over all experts, top-k, renormalised)
    norm_topk_prob: Optional[bool] = None
    num_shared_experts: int = 0  # shared experts (one dense MLP num_shared_experts * moe_intermediate wide)
    bias_update_speed: float = 0.0  # step of the aux-loss-free bias per update_bias() call (0: bias frozen)
    gemm_backend: str = "auto"  # grouped GEMM path: "auto", "torch", "cutlass", "triton", "loop"

    def __post_init__(self) -> None:
        for name in ("hidden", "moe_intermediate", "num_experts", "topk", "n_group", "topk_group"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MoEConfig.{name} must be a positive int, got {value!r}")
        if self.topk > self.num_experts:
            raise ValueError(f"MoEConfig.topk ({self.topk}) must not exceed num_experts ({self.num_experts})")
        if self.num_experts % self.n_group:
            raise ValueError(f"MoEConfig.num_experts ({self.num_experts}) must be divisible by n_group ({self.n_group})")
        if self.topk_group > self.n_group:
            raise ValueError(f"MoEConfig.topk_group ({self.topk_group}) must not exceed n_group ({self.n_group})")
        if self.topk > self.topk_group * (self.num_experts // self.n_group):
            raise ValueError(f"MoEConfig.topk ({self.topk}) exceeds the experts of topk_group ({self.topk_group}) groups")
        if self.score_func not in ("softmax", "sigmoid"):
            raise ValueError(f"MoEConfig.score_func must be 'softmax' or 'sigmoid', got {self.score_func!r}")
        if self.norm_topk_prob is not None and not isinstance(self.norm_topk_prob, bool):
            raise ValueError(f"MoEConfig.norm_topk_prob must be None, True or False, got {self.norm_topk_prob!r}")
        if self.num_shared_experts < 0:
            raise ValueError(f"MoEConfig.num_shared_experts must be >= 0, got {self.num_shared_experts}")
        if self.gemm_backend not in BACKENDS:
            raise ValueError(f"MoEConfig.gemm_backend must be one of {BACKENDS}, got {self.gemm_backend!r}")


class MoE(nn.Module):
    """Mixture-of-experts MLP with expert parallelism over ``group``.

    Each rank holds ``num_experts / group size`` consecutive experts (rank r: experts
    ``[r * L, (r + 1) * L)``), a full copy of the router and of the shared experts. Every
    weight gradient can be deferred through ``WeightGradStore``.
    """

    def __init__(self, config: MoEConfig, group=None, *, num_sms: Optional[int] = None, device=None, dtype=None):
        super().__init__()
        world = group_size(group)
        if config.num_experts % world:
            raise ValueError(f"num_experts ({config.num_experts}) must be divisible by the expert-parallel size ({world})")
        self.config, self.group, self.num_sms = config, group, num_sms
        self.num_local_experts = config.num_experts // world
        self.first_local_expert = group_rank(group) * self.num_local_experts
        self.gate = nn.Parameter(torch.empty(config.num_experts, config.hidden, device=device, dtype=dtype))
        nn.init.normal_(self.gate, std=config.hidden ** -0.5)
        # aux-loss-free load balancing: added to scores for choosing experts only
        self.register_buffer("expert_bias", torch.zeros(config.num_experts, device=device, dtype=torch.float32))
        # tokens routed to each expert since the last update_bias() (this rank's tokens)
        self.register_buffer("expert_load", torch.zeros(config.num_experts, device=device, dtype=torch.float32))
        self.experts = GroupedExperts(self.num_local_experts, config.hidden, config.moe_intermediate,
                                      config.gemm_backend, device=device, dtype=dtype)
        self.shared = None
        if config.num_shared_experts:
            self.shared = SharedExperts(config.hidden, config.num_shared_experts * config.moe_intermediate,
                                        device=device, dtype=dtype)

    def route(self, x: torch.Tensor):
        """Router of ``x`` [num_tokens, hidden]: (topk_idx [num_tokens, topk] int64, topk_weights float32).

        The logits are computed in the dtype of ``gate``, so a router kept in float32 beside
        bfloat16 experts (as DeepSeek-V3 checkpoints keep it) sees up-cast tokens.
        """
        from dualpipe_ext.kernels.routing import route

        c = self.config
        logits = linear(x.to(self.gate.dtype), self.gate).float()
        bias = self.expert_bias if c.score_func == "sigmoid" or c.bias_update_speed > 0 else None
        return route(logits, c.topk, c.score_func, c.n_group, c.topk_group, bias, c.routed_scaling_factor,
                     norm_topk_prob=c.norm_topk_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., hidden] -> [..., hidden], same dtype."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        topk_idx, topk_weights = self.route(x)
        if self.training and self.config.bias_update_speed > 0:
            with torch.no_grad():
                self.expert_load += torch.bincount(topk_idx.flatten(), minlength=self.config.num_experts).float()
        recv_x, recv_idx, recv_weights, handle = dispatch(x, topk_idx, topk_weights, self.config.num_experts,
                                                          self.group, num_sms=self.num_sms)
        y = experts_forward(self.experts, recv_x, recv_idx, recv_weights, num_sms=self.num_sms)
        out = combine(y.to(x.dtype), handle, num_sms=self.num_sms)
        if self.shared is not None:
            out = out + self.shared(x)
        return out.reshape(shape)

    @torch.no_grad()
    def update_bias(self) -> None:
        """Aux-loss-free balancing step: raise the bias of under-loaded experts, lower over-loaded ones.

        Sums the load over the group first, so every rank applies the same step.
        """
        load = self.expert_load.clone()
        if group_size(self.group) > 1:
            torch.distributed.all_reduce(load, group=self.group)
        self.expert_bias += self.config.bias_update_speed * torch.sign(load.mean() - load)
        self.expert_load.zero_()
