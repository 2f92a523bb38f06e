"""transformers decoder layers as the overlap engine's layers, and pipeline stages of them.

The engine runs a layer as components (attention, shared experts, dispatch, experts,
combine, and their backward passes) and needs two things of it: ``moe``, a
``dualpipe_ext.moe.MoE`` (what ``replace_moe`` put in the layer's ``mlp``), and
``attention(x, context) -> (h, u)``, the residual stream after attention and the MoE's input.
``HFLayer`` gives a transformers decoder layer (DeepseekV3, Qwen3-MoE, Mixtral, and any layer
of the usual ``input_layernorm -> self_attn -> residual -> post_attention_layernorm -> mlp ->
residual`` form) that shape with the layer's own modules, so the user's model runs through
``overlapped_forward_backward`` without being rewritten. Dense layers (DeepSeek-V3's first
``first_k_dense_replace``, Qwen3-MoE's ``mlp_only_layers``) have no exchange to overlap: each
runs whole, at the start of the next MoE layer's attention component, or after the stage's
last MoE layer in its epilogue::

    hf.replace_moe(model, group=ep_group)                # every layer's mlp: an MoE
    stages = hf.overlap_stages(model, num_stages=2)       # embedding / layers / norm + head
    pipe = DualPipe((stages[r], other_copy_stages[1 - r]))
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from dualpipe_ext.moe import MoE
from dualpipe_ext.overlap import ComponentStage, OverlapConfig, OverlappedStage

from ._deps import require_transformers
from .hf_moe import is_moe_block
from .hf_pipeline import _attention_kinds, layer_context, run_layer, split_layers

__all__ = ["HFLayer", "HFStage", "OverlappedHFStage", "overlap_stages"]


class HFLayer(nn.Module):
    """A transformers decoder layer whose ``mlp`` is an ``MoE``, in the engine's layer form.

    ``attention(x, context)``: x [batch, seq, hidden] -> (h = x + self_attn(input_layernorm(x)),
    u = post_attention_layernorm(h)); ``context`` holds the position ids, rotary embeddings and
    masks of the chunk (``layer_context``). The layer's output is ``h + mlp(u)``.
    ``dense_before``: (dense decoder layer, attention kind) pairs that precede this layer in the
    model; ``attention`` runs them whole first.
    """

    def __init__(self, layer: nn.Module, attention_kind: str = "full_attention",
                 dense_before: Sequence[Tuple[nn.Module, str]] = ()) -> None:
        super().__init__()
        for name in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"):
            if not hasattr(layer, name):
                raise TypeError(f"HFLayer: {type(layer).__name__} has no {name}; expected a decoder layer of the "
                                f"input_layernorm -> self_attn -> post_attention_layernorm -> mlp form")
        if not isinstance(layer.mlp, MoE):
            raise TypeError(f"HFLayer: the mlp of this {type(layer).__name__} is {type(layer.mlp).__name__}, not a "
                            f"dualpipe_ext.moe.MoE: call replace_moe(model, ...) first (a dense layer goes in "
                            f"dense_before of the MoE layer after it, as overlap_stages does)")
        self.layer = layer
        self.attention_kind = attention_kind
        self.dense_before = nn.ModuleList([d for d, _ in dense_before])
        self.dense_kinds = tuple(kind for _, kind in dense_before)

    @property
    def moe(self) -> MoE:
        return self.layer.mlp

    def attention(self, x: torch.Tensor, context: Dict[str, Any]) -> Tuple[torch.Tensor, torch.Tensor]:
        for dense, kind in zip(self.dense_before, self.dense_kinds):
            x = run_layer(dense, x, context, kind)
        layer = self.layer
        out = layer.self_attn(hidden_states=layer.input_layernorm(x), attention_mask=context["masks"][self.attention_kind],
                              position_ids=context["position_ids"], position_embeddings=context["position_embeddings"])
        h = x + (out[0] if isinstance(out, tuple) else out)
        return h, layer.post_attention_layernorm(h)

    def forward(self, x: torch.Tensor, context: Dict[str, Any]) -> torch.Tensor:
        h, u = self.attention(x, context)
        return h + self.moe(u)


class _Epilogue(nn.Module):
    """What follows a stage's last MoE layer: its dense layers, then on the last stage the final
    norm and the LM head. hidden [batch, seq, hidden] -> hidden, or logits [batch, seq, vocab]."""

    def __init__(self, dense: Sequence[Tuple[nn.Module, str]], context_fn: "_Context",
                 norm: Optional[nn.Module] = None, lm_head: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.dense = nn.ModuleList([d for d, _ in dense])
        self.dense_kinds = tuple(kind for _, kind in dense)
        self.context_fn = context_fn
        self.norm, self.lm_head = norm, lm_head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if len(self.dense):
            context = self.context_fn(hidden)
            for dense, kind in zip(self.dense, self.dense_kinds):
                hidden = run_layer(dense, hidden, context, kind)
        return hidden if self.lm_head is None else self.lm_head(self.norm(hidden))


class _Context:
    """Computes every layer's context from a chunk's hidden states (picklable, no global state)."""

    def __init__(self, config: Any, rotary_emb: nn.Module, kinds: Sequence[str]) -> None:
        self.config, self.rotary_emb, self.kinds = config, rotary_emb, tuple(sorted(set(kinds)))

    def __call__(self, hidden: torch.Tensor) -> Dict[str, Any]:
        return layer_context(self.config, self.rotary_emb, self.kinds, hidden)


class _CausalLMInput:
    """What a stage of a causal LM takes: input ids on the first stage, hidden states after it."""

    takes_ids: bool = False
    hidden_size: int = 0

    def check_input(self, x: torch.Tensor) -> None:
        if self.takes_ids and (x.dim() != 2 or x.dtype not in (torch.int32, torch.int64)):
            raise ValueError(f"the first stage takes input ids [batch, seq] int64, got {x.dtype} {tuple(x.shape)}")
        if not self.takes_ids and (x.dim() != 3 or x.shape[-1] != self.hidden_size):
            raise ValueError(f"a stage after the first takes hidden states [batch, seq, {self.hidden_size}], got "
                             f"{x.dtype} {tuple(x.shape)}")


class HFStage(_CausalLMInput, ComponentStage):
    """Consecutive layers of a causal LM run component by component, one after another."""


class OverlappedHFStage(_CausalLMInput, OverlappedStage):
    """Consecutive layers of a causal LM whose pairs (and two-batch halves) the overlap engine interleaves."""


def _component_layers(layers: Sequence[nn.Module], kinds: Sequence[str]
                      ) -> Tuple[List[HFLayer], List[Tuple[nn.Module, str]]]:
    """The MoE layers as ``HFLayer``\\ s (each with the dense layers before it), and the dense layers after them."""
    wrapped: List[HFLayer] = []
    dense: List[Tuple[nn.Module, str]] = []
    for layer, kind in zip(layers, kinds):
        mlp = getattr(layer, "mlp", None)
        if mlp is None or isinstance(mlp, MoE) or is_moe_block(mlp):  # HFLayer refuses what is missing or unswapped
            wrapped.append(HFLayer(layer, kind, dense_before=dense))
            dense = []
        else:
            dense.append((layer, kind))
    return wrapped, dense


def overlap_stages(model: nn.Module, num_stages: int, *, overlap: Optional[OverlapConfig] = None,
                   interleave: bool = True, layers_per_stage: Optional[Sequence[int]] = None) -> List[ComponentStage]:
    """Cut ``model`` (a ``*ForCausalLM`` whose MoE blocks ``replace_moe`` swapped) into component stages.

    Stage i holds consecutive decoder layers as ``HFLayer``\\ s; the first also the token
    embedding (its prologue: input ids [batch, seq] -> hidden), the last the final norm and LM
    head (its epilogue: -> logits [batch, seq, vocab]). A dense layer runs whole inside the next
    MoE layer's attention component, or in the epilogue after the stage's last MoE layer; every
    stage needs at least one MoE layer. With ``interleave`` the stages are
    ``OverlappedStage``\\ s (DualPipe's pairs, and with ``overlap.two_batch`` every chunk, run
    through the overlap engine), else ``ComponentStage``\\ s (the same components one after
    another). Parameters are the model's own. Use ``causal_lm_loss`` as the criterion.
    """
    require_transformers()
    if not isinstance(num_stages, int) or isinstance(num_stages, bool) or num_stages < 1:
        raise ValueError(f"overlap_stages: num_stages must be a positive int, got {num_stages!r}")
    base = getattr(model, "model", None)
    if getattr(model, "lm_head", None) is None or any(not hasattr(base, n) for n in
                                                      ("embed_tokens", "layers", "norm", "rotary_emb")):
        raise TypeError(f"overlap_stages: {type(model).__name__} is not a decoder-only causal LM with model.embed_tokens, "
                        f"model.layers, model.norm, model.rotary_emb and lm_head")
    config = model.config
    layers = list(base.layers[:config.num_hidden_layers])
    counts = list(layers_per_stage) if layers_per_stage is not None else split_layers(len(layers), num_stages)
    if len(counts) != num_stages or any(not isinstance(c, int) or c < 1 for c in counts) or sum(counts) != len(layers):
        raise ValueError(f"overlap_stages: every one of the {num_stages} stages needs at least one of the model's "
                         f"{len(layers)} layers (layers_per_stage: positive ints summing to {len(layers)}), got {counts}")
    kinds = _attention_kinds(config, len(layers))
    cls = OverlappedHFStage if interleave else HFStage
    stages, begin = [], 0
    for i, count in enumerate(counts):
        first, last = i == 0, i == num_stages - 1
        context_fn = _Context(config, base.rotary_emb, kinds[begin:begin + count])
        wrapped, dense = _component_layers(layers[begin:begin + count], kinds[begin:begin + count])
        if not wrapped:
            raise ValueError(f"overlap_stages: stage {i} (layers {begin} to {begin + count - 1}) has no MoE layer; "
                             f"the engine overlaps MoE layers, so give every stage at least one (layers_per_stage)")
        epilogue = None
        if dense or last:
            epilogue = _Epilogue(dense, context_fn, base.norm if last else None, model.lm_head if last else None)
        stage = cls(wrapped, prologue=base.embed_tokens if first else None, epilogue=epilogue, overlap=overlap,
                    context_fn=context_fn)
        stage.takes_ids, stage.hidden_size = first, config.hidden_size
        stages.append(stage)
        begin += count
    return stages
