"""Overlap engine: component-split stages and the interleaved runs of their chunks.

    stage = OverlappedMoEStage(BlockConfig(MoEConfig(...)), num_layers=4, group=ep_group)
    pipe = DualPipe((stage_a, stage_b))  # overlapped pairs (FB) run through the engine

See ``docs/overlap.md``.
"""
from __future__ import annotations

from .block import MoEBlock
from .config import BlockConfig, ComponentCosts, OverlapConfig
from .engine import execute, overlapped_forward_backward
from .plan import component_plan, deepseek_plan, exposed_comm, format_plan, pair_runs, sequential_plan, validate_plan
from .stage import ComponentStage, MoEStage, OverlappedMoEStage, OverlappedStage

__all__ = ["BlockConfig", "ComponentCosts", "OverlapConfig", "MoEBlock", "ComponentStage", "OverlappedStage",
           "MoEStage", "OverlappedMoEStage", "execute", "overlapped_forward_backward", "component_plan",
           "sequential_plan", "deepseek_plan", "exposed_comm", "format_plan", "pair_runs", "validate_plan"]
