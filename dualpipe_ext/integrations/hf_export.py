"""Back to transformers: a model trained after ``replace_moe`` (and cut by ``pipeline_stages`` or
``overlap_stages``, its experts split over ranks) written into the original transformers layout.

    from dualpipe_ext.integrations import hf_export
    hf_export.export(stage_modules, names, fresh_hf_model, "ckpt/", "out/")  # every rank; rank 0 writes out/

``names[i]`` maps ``id(parameter)`` of ``stage_modules[i]`` to its name in the swapped model
(``{id(p): n for n, p in model.named_parameters()}`` taken right after ``replace_moe``). The
weights go through a ``dualpipe_ext.checkpoint`` folder, so a checkpoint saved by any layout
converts the same way in one process: ``to_transformers(load_full(path), fresh_hf_model)``.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence

import torch
from torch import nn

from dualpipe_ext import checkpoint as ckpt

__all__ = ["load_full", "to_transformers", "export"]


def load_full(path: str) -> Dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, read in this process alone (no collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = dcp.FileSystemReader(path).read_metadata()
    state = {k: torch.empty(tuple(v.size), dtype=v.properties.dtype)
             for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
    dcp.load(state, checkpoint_id=path, no_dist=True)
    return state


def _take(state: Mapping[str, torch.Tensor], key: str, like: torch.Tensor, used: set) -> torch.Tensor:
    if key not in state:
        raise ckpt.CheckpointError(f"to_transformers: the checkpoint has no {key!r} (another model?)")
    t = state[key]
    if tuple(t.shape) != tuple(like.shape):
        raise ckpt.CheckpointError(f"to_transformers: {key!r} is {list(t.shape)} in the checkpoint, "
                                   f"{list(like.shape)} in the model (another model config?)")
    used.add(key)
    return t


@torch.no_grad()
def to_transformers(state: Mapping[str, torch.Tensor], model: nn.Module) -> nn.Module:
    """Copy ``state`` (global names of the swapped model, one key per routed expert) into the
    untouched transformers ``model`` in place (its MoE blocks not replaced); returns it.
    Every parameter and persistent buffer of ``model`` outside the MoE blocks must be in ``state``."""
    from .hf_moe import find_moe_blocks

    used: set = set()
    blocks = find_moe_blocks(model)
    if not blocks:
        raise TypeError(f"to_transformers: {type(model).__name__} has no MoE block (pass the untouched model)")
    inside = tuple(path + "." for path, _, _ in blocks)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name.startswith(inside):
            continue
        if name not in state:
            short = name.rsplit(".", 1)[-1]
            if short in ("inv_freq", "original_inv_freq"):  # derived from the config, not trained
                continue
        t.copy_(_take(state, name, t, used))
    for path, block, _ in blocks:
        p = path + "."
        router, experts = block.gate, block.experts
        router.weight.copy_(_take(state, p + "gate", router.weight, used))
        bias = getattr(router, "e_score_correction_bias", None)
        if isinstance(bias, torch.Tensor):
            bias.copy_(_take(state, p + "expert_bias", bias, used).to(bias.dtype))
        for hf_name, ours in (("gate_up_proj", "gate_up"), ("down_proj", "down")):
            whole = getattr(experts, hf_name)
            for e in range(whole.shape[0]):
                whole[e].copy_(_take(state, f"{p}experts.{ours}.{e}", whole[e], used))
        shared = getattr(block, "shared_experts", None)
        if shared is not None:
            s = shared.gate_proj.weight.shape[0]
            gate_up = _take(state, p + "shared.gate_up", torch.empty(2 * s, shared.gate_proj.weight.shape[1]), used)
            shared.gate_proj.weight.copy_(gate_up[:s])
            shared.up_proj.weight.copy_(gate_up[s:])
            shared.down_proj.weight.copy_(_take(state, p + "shared.down", shared.down_proj.weight, used))
    return model


def export(modules: Sequence[nn.Module], names: Sequence[Mapping[int, str]], model: nn.Module, folder: str,
           out: Optional[str] = None, step: int = 0) -> Optional[nn.Module]:
    """Collective over all ranks: save the stages as a checkpoint under ``folder``, then on rank 0
    fill the untouched transformers ``model`` from it (and ``save_pretrained(out)`` when given).
    Returns the filled model on rank 0, None elsewhere."""
    import torch.distributed as dist

    state = ckpt.model_state(modules, names, for_save=True)
    path = ckpt.save(folder, step, state, {"kind": "export"})
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return None
    to_transformers(load_full(path), model)
    if out is not None:
        model.save_pretrained(out)
    return model
