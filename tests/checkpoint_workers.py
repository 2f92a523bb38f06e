"""Ranks of the checkpoint tests: MoE layers split over an expert-parallel group, saved and loaded."""
from __future__ import annotations

import torch

CFG = dict(hidden=16, moe_intermediate=8, num_experts=8, topk=2, num_shared_experts=1, score_func="sigmoid",
           bias_update_speed=0.01)


def build(seed: int = 0, group=None):
    """Two MoE layers (the same weights for a seed in every process), experts split over ``group``."""
    from torch import nn

    from dualpipe_ext.moe import MoE, MoEConfig

    g = torch.Generator().manual_seed(seed)
    model = nn.ModuleDict({"a": MoE(MoEConfig(**CFG), group), "b": MoE(MoEConfig(**CFG), group)})
    with torch.no_grad():
        for moe in model.values():  # the whole layer drawn in every process, this rank's experts kept
            lo, n = moe.first_local_expert, moe.num_local_experts
            for t in (moe.gate, moe.shared.gate_up, moe.shared.down):
                t.copy_(torch.randn(t.shape, generator=g) * 0.3)
            for t in (moe.experts.gate_up, moe.experts.down):
                whole = torch.randn((CFG["num_experts"],) + tuple(t.shape[1:]), generator=g) * 0.3
                t.copy_(whole[lo:lo + n])
    return model


def names_of(model):
    return {id(p): n for n, p in model.named_parameters()}


def train_step(model, seed: int):
    """One AdamW step on this rank's own tokens (and a load count, then a bias update)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randn(12, CFG["hidden"], generator=torch.Generator().manual_seed(seed))
    for moe in model.values():
        x = moe(x)
    x.square().sum().backward()
    opt.step()
    model["a"].update_bias()  # layer b keeps a pending load
    x = torch.randn(12, CFG["hidden"], generator=torch.Generator().manual_seed(seed + 1))
    model["b"].route(x)
    model["b"].count_load(model["b"].route(x)[0])
    return opt


def save_trained(rank: int, world: int, root: str) -> dict:
    """Train one step with experts over ``world`` ranks, save; return this rank's state (under global names)."""
    import torch.distributed as dist

    from dualpipe_ext import checkpoint as ckpt

    model = build()
    opt = train_step(model, seed=0)  # the same tokens everywhere: replicated weights stay equal
    names = [names_of(model)]
    state = ckpt.model_state([model], names, for_save=True)
    state.update(ckpt.optimizer_state(opt, [model], names, for_save=True))
    ckpt.save(root, 1, state, {"world": world})
    load = {k: v.clone() for k, v in state.items() if k.endswith("expert_load")}
    dist.all_reduce(torch.zeros(1))
    return {"state": state, "load_sum": load}


def load_into(rank: int, world: int, root: str) -> dict:
    """Load the checkpoint under ``root`` into fresh layers with experts over ``world`` ranks."""
    from dualpipe_ext import checkpoint as ckpt

    model = build(seed=5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    names = [names_of(model)]
    state = ckpt.model_state([model], names, for_save=False)
    state.update(ckpt.optimizer_state(opt, [model], names, for_save=False))
    ckpt.load(ckpt.resolve(root), state)
    ckpt.finish_moe_load([model])
    loaded = ckpt.model_state([model], names, for_save=False)
    loaded.update(ckpt.optimizer_state(opt, [model], names, for_save=False))
    return {k: v.clone() for k, v in loaded.items()}
