"""The main job's model and its layout over ranks: a small DeepSeek-V3-style MoE language model
(the transformers DeepseekV3 architecture: MLA attention, sigmoid group-limited routing with a
bias, a shared expert) cut into pipeline stages, with its routed experts split over an
expert-parallel group.

Ranks: global rank ``g = replica * pp + p``. Pipeline groups are the ``pp`` ranks of one
replica; expert groups the ``ep`` ranks with the same pipeline rank ``p``, one per replica:
the same stages, a different share of every MoE layer's routed experts. DualPipe holds two
copies of the model per pipeline (module0: stage ``p`` of copy A, forward direction; module1:
stage ``pp - 1 - p`` of copy B, reverse direction); DualPipeV one copy of ``2 pp`` stages
(rank ``p`` holds stages ``p`` and ``2 pp - 1 - p``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import List, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["LMConfig", "Layout", "build_model", "build_stages", "sync_grads", "is_expert", "moe_layers"]


@dataclass(frozen=True)
class LMConfig:
    """Sizes of the demo's model (the first ``dense_layers`` layers dense, the others MoE)."""

    vocab: int = 256
    hidden: int = 64
    layers: int = 4
    heads: int = 4
    experts: int = 8
    topk: int = 2
    groups: int = 2  # expert groups of the group-limited routing
    topk_groups: int = 1
    moe_intermediate: int = 64
    seq: int = 64
    dense_layers: int = 0  # DeepSeek-V3's first_k_dense_replace
    seed: int = 0

    def transformers_config(self):
        from transformers import DeepseekV3Config

        return DeepseekV3Config(
            vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=2 * self.hidden,
            moe_intermediate_size=self.moe_intermediate, num_hidden_layers=self.layers,
            num_attention_heads=self.heads, num_key_value_heads=self.heads, n_shared_experts=1,
            n_routed_experts=self.experts, num_experts_per_tok=self.topk, n_group=self.groups,
            topk_group=self.topk_groups, routed_scaling_factor=1.0, norm_topk_prob=True,
            first_k_dense_replace=self.dense_layers,
            kv_lora_rank=self.hidden // 2, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8,
            v_head_dim=self.hidden // self.heads, max_position_embeddings=max(64, self.seq),
            tie_word_embeddings=False)


def build_model(cfg: LMConfig) -> nn.Module:
    """The float32 model, the same in every process for a seed (eager attention)."""
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(cfg.seed)
    model = DeepseekV3ForCausalLM(cfg.transformers_config()).float()
    model.config._attn_implementation = "eager"
    return model


@dataclass(frozen=True)
class Layout:
    """Where this rank sits: its replica (= expert-parallel rank) and pipeline rank, and the groups."""

    schedule: str
    pp: int
    ep: int
    replica: int
    pp_rank: int
    pipe_group: object
    ep_group: object
    mirror_group: object  # ranks holding the same stages (replicated weights are summed over it)
    expert_mirror_group: object  # ranks holding the same stages and the same expert share

    @staticmethod
    def make(schedule: str, pp: int, ep: int) -> "Layout":
        rank = dist.get_rank()
        replica, p = divmod(rank, pp)
        # every rank creates every group, in the same order
        pipes = [dist.new_group([r * pp + q for q in range(pp)]) for r in range(ep)]
        experts = [dist.new_group([r * pp + q for r in range(ep)]) for q in range(pp)]
        if schedule == "dualpipe":  # stage s lives on pipeline ranks s and pp - 1 - s
            mirrors = {q: dist.new_group(sorted({r * pp + q for r in range(ep)} | {r * pp + pp - 1 - q
                                                                                   for r in range(ep)}))
                       for q in range(pp // 2)}
            mirror = mirrors[min(p, pp - 1 - p)]
            expert_mirrors = {(r, q): dist.new_group(sorted({r * pp + q, r * pp + pp - 1 - q}))
                              for r in range(ep) for q in range(pp // 2)}
            expert_mirror = expert_mirrors[(replica, min(p, pp - 1 - p))]
        else:  # DualPipeV: each stage once per replica
            mirror, expert_mirror = experts[p], None
        return Layout(schedule, pp, ep, replica, p, pipes[replica], experts[p], mirror, expert_mirror)

    @property
    def num_stages(self) -> int:
        return self.pp if self.schedule == "dualpipe" else 2 * self.pp

    def local_stage_ids(self) -> Tuple[int, int]:
        """(stage of module0, stage of module1) on this rank."""
        if self.schedule == "dualpipe":
            return self.pp_rank, self.pp - 1 - self.pp_rank
        return self.pp_rank, 2 * self.pp - 1 - self.pp_rank


def is_expert(name: str) -> bool:
    return ".mlp.experts." in name


def build_stages(cfg: LMConfig, layout: Layout, overlap, interleave: bool, ep_buffer=None, fp8_dispatch: bool = False):
    """This rank's two stage modules, with its share of the experts (``fp8_dispatch``: tokens cross as FP8).

    Returns ``(modules, stage ids, names)``: ``names[i]`` maps ``id(parameter)`` of module i to
    its name in the (swapped) model.
    """
    from dualpipe_ext.integrations import hf

    ids = layout.local_stage_ids()
    copies = []
    for _ in range(2 if layout.schedule == "dualpipe" else 1):
        model = build_model(cfg)
        options = {"ep": ep_buffer} if ep_buffer is not None else {}
        hf.replace_moe(model, group=layout.ep_group, **options)
        if fp8_dispatch:
            for moe in moe_layers([model]):
                moe.config = replace(moe.config, fp8_dispatch=True)
        names = {id(p): n for n, p in model.named_parameters()}
        copies.append((hf.overlap_stages(model, layout.num_stages, overlap=overlap, interleave=interleave), names))
    picks = [(copies[0], ids[0]), (copies[-1], ids[1])]
    return tuple(c[0][i] for c, i in picks), ids, [c[1] for c, _ in picks]


def moe_layers(modules: Sequence[nn.Module]) -> list:
    """The ``dualpipe_ext.moe.MoE`` layers inside ``modules``, in order."""
    from dualpipe_ext.moe import MoE

    return [m for module in modules for m in module.modules() if isinstance(m, MoE)]


def _params_by_stage(modules: Sequence[nn.Module], ids: Sequence[int], expert: bool) -> List[torch.Tensor]:
    """The local copies of the weights, ordered by stage so that every rank lists them alike."""
    out = []
    for _, module in sorted(zip(ids, modules), key=lambda pair: pair[0]):
        out += [p for n, p in module.named_parameters() if is_expert(n) == expert]
    return out


def _all_reduce_grads(params: List[torch.Tensor], group, scale: float) -> None:
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    if group is not None:
        dist.all_reduce(flat, group=group)
    flat.mul_(scale)
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
        offset += g.numel()


def sync_grads(modules: Sequence[nn.Module], ids: Sequence[int], layout: Layout, scale: float) -> None:
    """Sum the gradients of every copy of each weight over the ranks holding it, then scale."""
    _all_reduce_grads(_params_by_stage(modules, ids, False), layout.mirror_group, scale)
    _all_reduce_grads(_params_by_stage(modules, ids, True), layout.expert_mirror_group, scale)


def copies_differ(modules: Sequence[nn.Module], ids: Sequence[int], layout: Layout) -> bool:
    """Whether the copies of some weight differ between the ranks holding it."""
    differ = False
    for expert, group in ((False, layout.mirror_group), (True, layout.expert_mirror_group)):
        params = _params_by_stage(modules, ids, expert)
        if group is None or not params:
            continue
        flat = torch.cat([p.detach().flatten() for p in params])
        hi, lo = flat.clone(), flat.clone()
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
        differ |= not torch.equal(hi, lo)
    return differ
