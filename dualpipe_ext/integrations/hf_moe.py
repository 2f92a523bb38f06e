"""Swap the MoE blocks of transformers 5.x models for ``dualpipe_ext.moe.MoE``.

Each supported block class has a reader that checks the block and returns its weights in
``MoE``'s layout together with the ``MoEConfig`` that reproduces its routing:

| block | scores | choice | weights |
| --- | --- | --- | --- |
| ``DeepseekV3MoE`` | sigmoid | + ``e_score_correction_bias``, group-limited (top-2 sum per group) | ``norm_topk_prob``, x ``routed_scaling_factor``; shared experts |
| ``Qwen3MoeSparseMoeBlock`` | softmax over all experts | top-k | renormalised if ``norm_topk_prob`` |
| ``MixtralSparseMoeBlock`` | softmax over all experts | top-k | renormalised |

transformers 5.x keeps the routed experts fused: ``gate_up_proj`` [num_experts, 2 * I, hidden]
(gate rows, then up rows) and ``down_proj`` [num_experts, hidden, I], which is
``GroupedExperts``' layout; a rank copies its slice of experts only. All blocks are read and
checked before the first is swapped, so an error leaves the model as it was.
"""
from __future__ import annotations

import functools
import inspect
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from dualpipe_ext.moe import MoE, MoEConfig
from dualpipe_ext.moe.collectives import group_size

from ._deps import require_transformers

__all__ = ["BlockWeights", "find_moe_blocks", "replace_moe", "supported_blocks"]


@dataclass(frozen=True)
class BlockWeights:
    """One HF block's weights in ``MoE``'s layout (views of the block's tensors, not copies)."""

    config: MoEConfig  # the routing and sizes that reproduce the block
    gate: torch.Tensor  # [num_experts, hidden] router weight, in its own dtype
    gate_up: torch.Tensor  # [num_experts, 2 * moe_intermediate, hidden]: gate rows, then up rows
    down: torch.Tensor  # [num_experts, hidden, moe_intermediate]
    expert_bias: Optional[torch.Tensor] = None  # [num_experts] float32, added to the scores for choosing
    shared_gate_up: Optional[torch.Tensor] = None  # [2 * shared_intermediate, hidden]
    shared_down: Optional[torch.Tensor] = None  # [hidden, shared_intermediate]


def _where(path: str, block: nn.Module) -> str:
    return f"{path} ({type(block).__name__})"


def _check_silu(act: nn.Module, what: str) -> None:
    from transformers.activations import ACT2FN

    silu = {nn.SiLU} | {type(ACT2FN[name]) for name in ("silu", "swish")}
    if type(act) not in silu:
        raise TypeError(f"replace_moe: {what} uses activation {type(act).__name__}; MoE's experts are SwiGLU (silu)")


def _routed_experts(block: nn.Module, where: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(gate_up [E, 2I, H], down [E, H, I]) of the fused experts of ``block``."""
    experts = block.experts
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor):
        raise TypeError(f"replace_moe: the experts of {where} are not fused gate_up_proj/down_proj parameters "
                        f"(the transformers 5.x layout)")
    if getattr(experts, "has_bias", False) or getattr(experts, "is_transposed", False) or \
            not getattr(experts, "has_gate", True):
        raise TypeError(f"replace_moe: the experts of {where} have biases, a transposed layout or no gate projection; "
                        f"MoE's experts are bias-free SwiGLU in [out, in] layout")
    _check_silu(experts.act_fn, f"the experts of {where}")
    if gate_up.dim() != 3 or down.dim() != 3 or gate_up.shape[1] % 2 or \
            down.shape != (gate_up.shape[0], gate_up.shape[2], gate_up.shape[1] // 2):
        raise TypeError(f"replace_moe: the experts of {where} have shapes gate_up_proj {tuple(gate_up.shape)} and "
                        f"down_proj {tuple(down.shape)}, expected [E, 2I, H] and [E, H, I]")
    return gate_up, down


def _shared_mlp(mlp: nn.Module, where: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(gate_up [2S, H], down [H, S]) of a dense SwiGLU MLP with gate_proj, up_proj, down_proj."""
    linears = [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    if not all(isinstance(m, nn.Linear) and m.bias is None for m in linears):
        raise TypeError(f"replace_moe: the shared experts of {where} are not bias-free gate_proj/up_proj/down_proj")
    _check_silu(mlp.act_fn, f"the shared experts of {where}")
    gate, up, down = (m.weight for m in linears)
    return torch.cat([gate, up], dim=0), down


def _read_deepseek_v3(block: nn.Module, where: str) -> BlockWeights:
    router = block.gate
    gate_up, down = _routed_experts(block, where)
    num_experts, hidden = router.weight.shape
    inter = down.shape[2]
    shared_gate_up, shared_down = _shared_mlp(block.shared_experts, where)
    shared_inter = shared_down.shape[1]
    if shared_inter % inter:
        raise TypeError(f"replace_moe: the shared experts of {where} are {shared_inter} wide, not a multiple of the "
                        f"routed experts' {inter}")
    config = MoEConfig(hidden=hidden, moe_intermediate=inter, num_experts=num_experts, topk=int(router.top_k),
                       n_group=int(router.num_group), topk_group=int(router.topk_group), score_func="sigmoid",
                       routed_scaling_factor=float(router.routed_scaling_factor),
                       norm_topk_prob=bool(router.norm_topk_prob), num_shared_experts=shared_inter // inter)
    return BlockWeights(config, router.weight, gate_up, down, router.e_score_correction_bias.float(),
                        shared_gate_up, shared_down)


def _read_softmax_topk(block: nn.Module, where: str, norm_topk_prob: bool) -> BlockWeights:
    router = block.gate
    gate_up, down = _routed_experts(block, where)
    num_experts, hidden = router.weight.shape
    config = MoEConfig(hidden=hidden, moe_intermediate=down.shape[2], num_experts=num_experts,
                       topk=int(router.top_k), score_func="softmax", norm_topk_prob=norm_topk_prob)
    return BlockWeights(config, router.weight, gate_up, down)


def _read_qwen3_moe(block: nn.Module, where: str) -> BlockWeights:
    return _read_softmax_topk(block, where, bool(block.gate.norm_topk_prob))


def _read_mixtral(block: nn.Module, where: str) -> BlockWeights:
    if getattr(block, "jitter_noise", 0) and block.jitter_noise > 0:
        raise ValueError(f"replace_moe: {where} has router_jitter_noise={block.jitter_noise}; MoE does not jitter its "
                         f"input (set config.router_jitter_noise = 0 before building the model)")
    return _read_softmax_topk(block, where, True)


@functools.lru_cache(maxsize=None)
def supported_blocks() -> Dict[type, Callable[[nn.Module, str], BlockWeights]]:
    """Block class -> reader (exact classes: a subclass may compute something else)."""
    require_transformers()
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    return {DeepseekV3MoE: _read_deepseek_v3, Qwen3MoeSparseMoeBlock: _read_qwen3_moe,
            MixtralSparseMoeBlock: _read_mixtral}


_MOE_NAME = re.compile(r"(MoE|Moe|MoeBlock|MoELayer|MoeLayer)$")


def _looks_like_moe(module: nn.Module) -> bool:
    """An experts child beside a gate or router child, or a class name ending in MoE/MoeBlock/MoeLayer."""
    if isinstance(module, MoE):
        return False
    has_experts = isinstance(getattr(module, "experts", None), nn.Module)
    has_router = any(isinstance(getattr(module, n, None), nn.Module) for n in ("gate", "router"))
    return (has_experts and has_router) or bool(_MOE_NAME.search(type(module).__name__))


def is_moe_block(module: nn.Module) -> bool:
    """Whether ``module`` is an MoE block that ``replace_moe`` would swap (or refuse), not a dense MLP."""
    return type(module) in supported_blocks() or _looks_like_moe(module)


def find_moe_blocks(model: nn.Module) -> List[Tuple[str, nn.Module, Optional[Callable]]]:
    """Every MoE block under ``model``: (qualified name, block, reader or None if unsupported).

    The search does not descend into a block, nor into an already swapped ``MoE``.
    """
    readers = supported_blocks()
    found: List[Tuple[str, nn.Module, Optional[Callable]]] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if isinstance(child, MoE):
                continue
            reader = readers.get(type(child))
            if reader is not None or _looks_like_moe(child):
                found.append((path, child, reader))
            else:
                visit(path, child)

    visit("", model)
    return found


_SET_BY_REPLACE = {"config": "read from the block", "group": "replace_moe's own argument",
                   "device": "the block's weights' device", "dtype": "the block's experts' dtype"}


def _check_options(options: Dict[str, Any]) -> None:
    """ValueError for an option that ``MoE(...)`` does not take or that replace_moe sets itself."""
    for name in options:
        if name in _SET_BY_REPLACE:
            raise ValueError(f"replace_moe: option {name!r} is set by replace_moe ({_SET_BY_REPLACE[name]})")
    params = inspect.signature(MoE.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = sorted(set(params) - {"self"} - set(_SET_BY_REPLACE))
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"replace_moe: unknown option(s) {unknown}; the MoE constructor takes {accepted}")
    if "num_comm_sms" in options:
        from dualpipe_ext.sm_budget import check_num_comm_sms

        check_num_comm_sms(options["num_comm_sms"], "replace_moe: num_comm_sms")


def _check_group(group: Optional[dist.ProcessGroup]) -> int:
    """Size of the expert-parallel group (None: the default group, or one process without torch.distributed)."""
    if group is None:
        return group_size(None)
    if not isinstance(group, dist.ProcessGroup):
        raise ValueError(f"replace_moe: group must be a torch.distributed ProcessGroup this process belongs to, or "
                         f"None, got {type(group).__name__} {group!r}")
    if not dist.is_initialized() or dist.get_rank(group) < 0:
        raise ValueError("replace_moe: this process is not a member of group")
    return group.size()


def _swap_in(model: nn.Module, path: str, block: nn.Module, weights: BlockWeights, group,
             options: Dict[str, Any]) -> MoE:
    """Build the ``MoE`` for ``block`` from ``weights`` (this rank's experts only) and put it at ``path``."""
    moe = MoE(weights.config, group, device=weights.gate_up.device, dtype=weights.gate_up.dtype, **options)
    first, num_local = moe.first_local_expert, moe.num_local_experts
    local = slice(first, first + num_local)
    with torch.no_grad():
        moe.gate = nn.Parameter(weights.gate.detach().clone(), requires_grad=weights.gate.requires_grad)
        pairs = [(moe.experts.gate_up, weights.gate_up[local]), (moe.experts.down, weights.down[local])]
        if weights.shared_gate_up is not None:
            pairs += [(moe.shared.gate_up, weights.shared_gate_up), (moe.shared.down, weights.shared_down)]
        for dst, src in pairs:
            dst.copy_(src)
            dst.requires_grad_(src.requires_grad)
        if weights.expert_bias is not None:
            moe.expert_bias.copy_(weights.expert_bias)
    moe.train(block.training)
    parent_path, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, attr, moe)
    return moe


def replace_moe(model: nn.Module, group: Optional[dist.ProcessGroup] = None, **options: Any) -> int:
    """Swap every MoE block of ``model`` in place for a ``dualpipe_ext.moe.MoE``; return how many.

    Each ``MoE`` computes the block's function (forward and backward, to the precision of
    the dtype) from the same weights: the router as ``MoE.gate`` (in the router's dtype),
    ``e_score_correction_bias`` as the ``MoE.expert_bias`` buffer, and, when ``group`` spans
    several ranks, this rank's share of the routed experts (rank r: experts
    ``[r * L, (r + 1) * L)``). It takes and returns ``[batch, seq, hidden]`` tensors as the
    HF decoder layer expects.

    Args:
        model: a transformers 5.x model (any module holding supported blocks).
        group: expert-parallel process group; None is the default group (all ranks once
            torch.distributed is initialised, else this process alone), as for ``MoE``.
        options: passed to the ``MoE`` constructor (e.g. ``num_comm_sms=``).
    Raises:
        TypeError: an MoE block of an unsupported class (named), or no MoE block at all.
        ValueError: a bad ``group`` or option, experts that do not split over the group, or a
            block feature ``MoE`` does not reproduce (router jitter, recorded router logits).
    """
    require_transformers()
    world = _check_group(group)
    _check_options(options)
    blocks = find_moe_blocks(model)
    unsupported = [_where(path, block) for path, block, reader in blocks if reader is None]
    names = ", ".join(cls.__name__ for cls in supported_blocks())
    if unsupported:
        raise TypeError(f"replace_moe: {type(model).__name__} has MoE blocks of an unsupported type: "
                        f"{', '.join(unsupported)}; supported: {names}")
    if not blocks:
        hint = " (pass the model that holds the block)" if _looks_like_moe(model) else ""
        raise TypeError(f"replace_moe: {type(model).__name__} has no MoE block{hint}; supported: {names}")
    if getattr(getattr(model, "config", None), "output_router_logits", False):
        raise ValueError("replace_moe: the model's config has output_router_logits=True, but MoE does not record "
                         "router logits (nor the auxiliary loss made from them); set model.config."
                         "output_router_logits = False (MoE balances load with its bias instead)")
    read = [(path, block, reader(block, _where(path, block))) for path, block, reader in blocks]
    for path, block, weights in read:
        if weights.config.num_experts % world:
            raise ValueError(f"replace_moe: {_where(path, block)} has {weights.config.num_experts} experts, which do "
                             f"not split over the {world} ranks of the expert-parallel group")
    for path, block, weights in read:
        _swap_in(model, path, block, weights, group, options)
    return len(read)
