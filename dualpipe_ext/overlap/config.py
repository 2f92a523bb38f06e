"""Configuration of the component-split MoE block and of the overlap engine."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from dualpipe_ext import _C
from dualpipe_ext.moe.layer import MoEConfig
from dualpipe_ext.sm_budget import check_num_comm_sms

__all__ = ["BlockConfig", "OverlapConfig", "ComponentCosts"]


@dataclass(frozen=True)
class BlockConfig:
    """Semantics of one transformer block: pre-norm causal self-attention, then an MoE MLP."""

    moe: MoEConfig  # router, routed and shared experts (hidden width comes from here)
    num_heads: int = 1  # attention heads; moe.hidden must be divisible by it
    norm_eps: float = 1e-6  # RMSNorm epsilon

    def __post_init__(self) -> None:
        if not isinstance(self.moe, MoEConfig):
            raise ValueError(f"BlockConfig.moe must be a MoEConfig, got {type(self.moe).__name__}")
        if not isinstance(self.num_heads, int) or self.num_heads < 1 or self.moe.hidden % self.num_heads:
            raise ValueError(f"BlockConfig.num_heads must be a positive divisor of hidden ({self.moe.hidden}), "
                             f"got {self.num_heads!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"BlockConfig.norm_eps must be positive, got {self.norm_eps}")


@dataclass(frozen=True)
class ComponentCosts:
    """Relative costs the component plan is made with: computation per pass (B and W cost the
    F figure) and the duration of one exchange. Only the order of the steps depends on them."""

    attn: float = _C.PlanCosts().attn  # the defaults are the C++ planner's (csrc/overlap/steps.h)
    mlp: float = _C.PlanCosts().mlp
    shared: float = _C.PlanCosts().shared
    prologue: float = _C.PlanCosts().prologue
    epilogue: float = _C.PlanCosts().epilogue
    comm: float = _C.PlanCosts().comm

    def __post_init__(self) -> None:
        for name in ("attn", "mlp", "shared", "prologue", "epilogue", "comm"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value < float("inf")):
                raise ValueError(f"ComponentCosts.{name} must be a finite number >= 0, got {value!r}")

    def to_core(self) -> "_C.PlanCosts":
        return _C.PlanCosts(self.attn, self.mlp, self.shared, self.prologue, self.epilogue, self.comm)


@dataclass(frozen=True)
class OverlapConfig:
    """Tuning knobs of the overlap engine; none changes the results, except ``two_batch``, which
    changes how weight-gradient sums are rounded (halves accumulate one after the other)."""

    # SMs of the communication, passed to every MoE layer of the stage: the grid of the exchange
    # kernels (an EPBuffer's num_sms must match), and what the experts' grouped GEMMs leave
    # free (their grids, forward and backward) and cuBLAS during an overlapped step (its
    # carveout). DeepSeek-V3: 20 of 132. None: no partition.
    num_comm_sms: Optional[int] = None
    # Split every chunk into two halves of its batch, whose exchanges run under each other's
    # computation: a chunk with no partner (warm-up, cool-down, PP=1) then overlaps with itself.
    two_batch: bool = False
    # Costs the component plan is made with (the same on every rank of an expert group).
    costs: ComponentCosts = field(default_factory=ComponentCosts)
    # Exchanges of each shape in flight at once (an EPBuffer needs num_slots >= this).
    max_in_flight: int = 2
    # Testing and benchmarking: every exchange of a whole chunk completes no earlier than this
    # many seconds after it was issued, a two-batch half's after half of it (a slow
    # interconnect on loopback gloo, its time proportional to the bytes).
    inject_latency_s: float = 0.0

    def __post_init__(self) -> None:
        check_num_comm_sms(self.num_comm_sms, "OverlapConfig.num_comm_sms")
        if not (self.inject_latency_s >= 0):
            raise ValueError(f"OverlapConfig.inject_latency_s must be >= 0, got {self.inject_latency_s}")
        if not isinstance(self.costs, ComponentCosts):
            raise ValueError(f"OverlapConfig.costs must be a ComponentCosts, got {type(self.costs).__name__}")
        if not isinstance(self.max_in_flight, int) or self.max_in_flight < 1:
            raise ValueError(f"OverlapConfig.max_in_flight must be a positive int, got {self.max_in_flight!r}")

    @property
    def plan_costs(self) -> "_C.PlanCosts":
        return self.costs.to_core()
