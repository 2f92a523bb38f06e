"""transformers models on dualpipe-ext: expert-parallel MoE blocks and pipeline stages.

    from dualpipe_ext.integrations import hf

    hf.replace_moe(model, group=ep_group)              # MoE blocks -> dualpipe_ext.moe.MoE
    stages = hf.pipeline_stages(model, num_stages=4)   # embedding ... layers ... lm_head
    stages = hf.overlap_stages(model, num_stages=4)    # the same, run through the overlap engine
    pipe = DualPipeV((stages[rank], stages[3 - rank]))
    loss, _ = pipe.step(input_ids, num_chunks=8, criterion=hf.causal_lm_loss, labels=(input_ids,))
    hf.export_transformers(my_stages, names, fresh_model, "ckpt/", "out/")  # back to transformers (collective)

Needs transformers >= 5.0 (``pip install -e ".[hf]"``); importing this module without it
raises one ImportError saying so.
"""
from __future__ import annotations

from ._deps import require_transformers

require_transformers()

from .hf_export import export as export_transformers, to_transformers  # noqa: E402
from .hf_moe import find_moe_blocks, replace_moe, supported_blocks  # noqa: E402
from .hf_overlap import HFLayer, HFStage, OverlappedHFStage, overlap_stages  # noqa: E402
from .hf_pipeline import CausalLMStage, causal_lm_loss, pipeline_stages, split_layers  # noqa: E402

__all__ = ["replace_moe", "find_moe_blocks", "supported_blocks", "pipeline_stages", "CausalLMStage",
           "causal_lm_loss", "split_layers", "overlap_stages", "HFLayer", "HFStage", "OverlappedHFStage",
           "to_transformers", "export_transformers"]
