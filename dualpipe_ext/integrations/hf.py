"""transformers models on dualpipe-ext: expert-parallel MoE blocks.

    from dualpipe_ext.integrations import hf

    hf.replace_moe(model, group=ep_group)              # MoE blocks -> dualpipe_ext.moe.MoE

Needs transformers >= 5.0 (``pip install -e ".[hf]"``); importing this module without it
raises one ImportError saying so.
"""
from __future__ import annotations

from ._deps import require_transformers

require_transformers()

from .hf_moe import find_moe_blocks, replace_moe, supported_blocks  # noqa: E402

__all__ = ["replace_moe", "find_moe_blocks", "supported_blocks"]
