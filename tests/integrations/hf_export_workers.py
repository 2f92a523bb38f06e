"""Ranks of the export test: train after replace_moe + pipeline_stages, export to transformers."""
from __future__ import annotations

import torch


def train_and_export(rank: int, world: int, name: str, folder: str, out: str) -> dict:
    """One AdamW step of the swapped, staged model (the same tokens on every rank), then export.

    Returns this rank's trained tensors under global names (experts: only its own)."""
    from hf_models import build, tokens

    from dualpipe_ext import checkpoint as ckpt
    from dualpipe_ext.integrations import causal_lm_loss, hf
    from dualpipe_ext.integrations.hf_export import export

    model = build(name)
    hf.replace_moe(model)  # the default group: every rank
    names = {id(p): n for n, p in model.named_parameters()}
    stages = hf.pipeline_stages(model, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = tokens(4, seed=7)
    x = ids
    for stage in stages:
        x = stage(x)
    causal_lm_loss(x, ids).backward()
    opt.step()
    mine = {k: v.clone() for k, v in ckpt.model_state(stages, [names, names], for_save=True).items()
            if not k.endswith("expert_load")}
    export(stages, [names, names], build(name, seed=1), folder, out)
    return mine
