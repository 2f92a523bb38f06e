"""Configuration of the component-split MoE block and of the overlap engine."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from dualpipe_ext.moe.layer import MoEConfig

__all__ = ["BlockConfig", "OverlapConfig"]


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
class OverlapConfig:
    """Tuning knobs of the overlap engine; none changes the results."""

    # SM budget of the communication-side kernels (dispatch packing, combine reduction,
    # expand/reduce) on CUDA, so that GEMMs keep the rest (DeepSeek-V3: 20 of 132). Passed
    # as ``num_sms`` to those kernels; ignored on CPU. None: unbounded.
    num_comm_sms: Optional[int] = None
    # Testing and benchmarking: every all-to-all of the block completes no earlier than
    # this many seconds after it was issued (a slow interconnect on loopback gloo).
    inject_latency_s: float = 0.0

    def __post_init__(self) -> None:
        if self.num_comm_sms is not None and (not isinstance(self.num_comm_sms, int) or self.num_comm_sms < 1):
            raise ValueError(f"OverlapConfig.num_comm_sms must be None or a positive int, got {self.num_comm_sms!r}")
        if not (self.inject_latency_s >= 0):
            raise ValueError(f"OverlapConfig.inject_latency_s must be >= 0, got {self.inject_latency_s}")
