"""Overlap engine: a component-split MoE block and the interleaved forward+backward pair.

    stage = OverlappedMoEStage(BlockConfig(MoEConfig(...)), num_layers=4, group=ep_group)
    pipe = DualPipe((stage_a, stage_b))  # F&B pairs run through the engine

See ``docs/overlap.md``.
"""
from __future__ import annotations

from .block import MoEBlock, MoEStage
from .config import BlockConfig, OverlapConfig
from .engine import OverlappedMoEStage, overlapped_forward_backward
from .plan import component_plan, format_plan, validate_plan

__all__ = ["BlockConfig", "OverlapConfig", "MoEBlock", "MoEStage", "OverlappedMoEStage",
           "overlapped_forward_backward", "component_plan", "format_plan", "validate_plan"]
