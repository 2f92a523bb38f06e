"""Per-rank bodies of the transformers integration tests (run in spawned processes by run_ranks)."""
from __future__ import annotations

from typing import Dict, Sequence

import torch
import torch.distributed as dist

from hf_models import build, output_grad, tokens


def expert_parallel(rank: int, world: int, names: Sequence[str], batch_per_rank: int) -> Dict[str, Dict]:
    """Each model with its MoE blocks swapped, EP over all ranks: this rank's logits and gradients.

    Every rank builds the same model and feeds its own slice of one batch; the reference is
    the untouched model on the whole batch (computed by the caller).
    """
    from dualpipe_ext.integrations import replace_moe

    out = {}
    for name in names:
        model = build(name)
        # the default group for one model, an explicit one for the others
        group = None if name == "deepseek_v3" else dist.new_group(list(range(world)))
        count = replace_moe(model, group)
        rows = slice(rank * batch_per_rank, (rank + 1) * batch_per_rank)
        logits = model(tokens(world * batch_per_rank)[rows]).logits
        (logits * output_grad(world * batch_per_rank)[rows]).sum().backward()
        out[name] = {"count": count, "logits": logits.detach(),
                     "grads": {n: p.grad for n, p in model.named_parameters()}}
    return out
