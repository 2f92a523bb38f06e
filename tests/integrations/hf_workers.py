"""Per-rank bodies of the transformers integration tests (run in spawned processes by run_ranks)."""
from __future__ import annotations

import copy
from typing import Dict, List, Sequence

import torch
import torch.distributed as dist

from hf_models import BUILDERS, HIDDEN, SEQ, build, output_grad, tokens

EP_NAMES = list(BUILDERS)
EP_BATCH_PER_RANK = 2
# every model under each schedule: DualPipe, DualPipeV and a baseline, 4 chunks on 2 ranks
PIPELINE_CASES = [dict(name=name, schedule=schedule, chunks=4)
                  for name in BUILDERS for schedule in ("dualpipe", "dualpipev", "1f1b")]


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


def _grad_failures(model, ref, held: set, what: str, failures: List[str]) -> List[str]:
    """Compare the gradients of the parameters in ``held`` (ids) with the reference's; return their names."""
    from dualpipe_ext.demo.reference import grad_cos_diff

    names = []
    for (name, p), (ref_name, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert name == ref_name
        if id(p) not in held:
            if p.grad is not None:
                failures.append(f"{what}: {name} is on no local stage but has a gradient")
            continue
        names.append(name)
        if p.grad is None or q.grad is None:
            failures.append(f"{what}: {name}: gradient missing (pipeline {p.grad is None}, reference {q.grad is None})")
        elif not grad_cos_diff(p.grad, q.grad) < 1e-10:
            failures.append(f"{what}: {name}: 1 - cos = {grad_cos_diff(p.grad, q.grad):.3g}")
    return names


def _reference_step(model, ids: torch.Tensor, num_micro_batches: int) -> torch.Tensor:
    """The unsplit model over each micro-batch, loss backward after each: the losses [num_micro_batches]."""
    from dualpipe_ext.integrations import causal_lm_loss

    losses = []
    for mb in ids.tensor_split(num_micro_batches):
        loss = causal_lm_loss(model(mb).logits, mb)
        loss.backward()
        losses.append(loss.detach())
    return torch.stack(losses)


def pipelines(rank: int, world: int, cases: Sequence[Dict]) -> List[Dict]:
    return [pipeline(rank, world, **case) for case in cases]


def schedule_stages(schedule: str, model, rank: int, world: int):
    """This rank's stage modules for ``schedule`` and the pipelines they belong to.

    DualPipe: two replicas of the model, each cut into ``world`` stages (rank r: stage r of
    the forward one, stage R-1-r of the reverse one); DualPipeV: one model in 2R stages (rank
    r: r and 2R-1-r); a baseline ("1f1b", "gpipe", "zb1p"): R stages, one per rank. Returns
    ``(local modules, [(model copy, feeding rank, loss rank, its stages held here), ...])``.
    """
    from dualpipe_ext.integrations import pipeline_stages

    R = world
    if schedule == "dualpipe":
        replica = copy.deepcopy(model)
        fwd, rev = pipeline_stages(model, R), pipeline_stages(replica, R)
        local = [fwd[rank], rev[R - 1 - rank]]
        return local, [(model, 0, R - 1, [local[0]]), (replica, R - 1, 0, [local[1]])]
    if schedule == "dualpipev":
        stages = pipeline_stages(model, 2 * R)
        local = [stages[rank], stages[2 * R - 1 - rank]]
        return local, [(model, 0, 0, local)]
    local = [pipeline_stages(model, R)[rank]]
    return local, [(model, 0, R - 1, local)]


def pipeline(rank: int, world: int, name: str, schedule: str, chunks: int, mb_size: int = 1) -> Dict:
    """One training step of ``schedule`` over the stages of a 4-layer model against the unsplit model:
    losses bitwise, the gradients of the parameters this rank holds by ``1 - cos``."""
    from dualpipe_ext import DualPipe, DualPipeV, PipelineSchedule, RuntimeConfig
    from dualpipe_ext import set_p2p_tensor_dtype, set_p2p_tensor_shapes
    from dualpipe_ext.integrations import causal_lm_loss

    cfg = RuntimeConfig(comm_timeout_s=30.0)
    set_p2p_tensor_shapes([(mb_size, SEQ, HIDDEN)])
    set_p2p_tensor_dtype(torch.float32)
    local, directions = schedule_stages(schedule, build(name, num_layers=4), rank, world)
    if schedule == "dualpipe":
        pipe, num_mbs = DualPipe(local, config=cfg), chunks // 2
    elif schedule == "dualpipev":
        pipe, num_mbs = DualPipeV(local, config=cfg), chunks
    else:
        pipe, num_mbs = PipelineSchedule(local[0], schedule, config=cfg), chunks
    refs = [copy.deepcopy(m) for m, _, _, _ in directions]
    data = [tokens(num_mbs * mb_size, seed=10 + i) for i in range(len(directions))]
    inputs, labels = [], []
    for (_, feed, loss_rank, _), ids in zip(directions, data):
        inputs = [ids] if rank == feed else inputs
        labels = [ids] if rank == loss_rank else labels
    loss, _ = pipe.step(*inputs, num_chunks=chunks, criterion=causal_lm_loss if labels else None, labels=labels)

    failures: List[str] = []
    held_names = []
    for (m, feed, loss_rank, held), ref, ids in zip(directions, refs, data):
        ref_loss = _reference_step(ref, ids, num_mbs)
        if rank == loss_rank and (loss is None or not torch.equal(loss, ref_loss)):
            failures.append(f"loss {loss} != unsplit model's {ref_loss}")
        ids_held = {id(p) for stage in held for p in stage.parameters()}
        held_names.append(_grad_failures(m, ref, ids_held, f"direction fed by rank {feed}", failures))
    return {"failures": failures, "held": held_names}


def two_rank_checks(rank: int, world: int, ep_names: Sequence[str], batch_per_rank: int,
                    pipeline_cases: Sequence[Dict]) -> Dict:
    """Every multi-process check of the integration tests in one process group (spawning dominates)."""
    return {"expert_parallel": expert_parallel(rank, world, ep_names, batch_per_rank),
            "pipelines": pipelines(rank, world, pipeline_cases)}
