"""Cut a transformers decoder-only causal LM into pipeline stages, and its loss.

A stage holds consecutive decoder layers of the model (the first also the token embedding,
the last also the final norm and the LM head) and shares their parameters with it. Only one
tensor crosses a stage boundary, the hidden states ``[batch, seq, hidden]`` in the model
dtype, so every stage computes the position ids, the rotary embeddings and the causal masks
of its layers itself, from the sequence length, as the model's own forward does (no padding
mask, no cache: a training step over full sequences).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._deps import require_transformers

__all__ = ["CausalLMStage", "pipeline_stages", "causal_lm_loss", "split_layers", "layer_context", "run_layer"]

# attention kind of a layer -> name of the transformers.masking_utils function that builds its mask
_MASKS = {"full_attention": "create_causal_mask", "sliding_attention": "create_sliding_window_causal_mask"}


class CausalLMStage(nn.Module):
    """Stage of a pipelined causal LM: tensor in, tensor out.

    First stage: input_ids [batch, seq] int64 -> hidden [batch, seq, hidden]; middle stages:
    hidden -> hidden; last stage: -> logits [batch, seq, vocab], all in the model dtype. The
    modules are the model's own (shared, not copied); the stage keeps no global state.
    """

    def __init__(self, config: Any, layers: Sequence[nn.Module], attention_kinds: Sequence[str],
                 rotary_emb: nn.Module, embed_tokens: Optional[nn.Module] = None, norm: Optional[nn.Module] = None,
                 lm_head: Optional[nn.Module] = None) -> None:
        super().__init__()
        if (norm is None) != (lm_head is None):
            raise ValueError("CausalLMStage: the last stage needs both norm and lm_head")
        self.config = config
        self.embed_tokens = embed_tokens
        self.layers = nn.ModuleList(layers)
        self.attention_kinds = tuple(attention_kinds)  # one per layer: a key of _MASKS
        self.rotary_emb = rotary_emb
        self.norm = norm
        self.lm_head = lm_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: input_ids [batch, seq] int64 on the first stage, else hidden [batch, seq, hidden]."""
        hidden = self.embed_tokens(x) if self.embed_tokens is not None else x
        if len(self.layers):
            ctx = layer_context(self.config, self.rotary_emb, set(self.attention_kinds), hidden)
            for layer, kind in zip(self.layers, self.attention_kinds):
                hidden = run_layer(layer, hidden, ctx, kind)
        if self.lm_head is not None:
            hidden = self.lm_head(self.norm(hidden))
        return hidden


def run_layer(layer: nn.Module, hidden: torch.Tensor, context: Dict[str, Any], kind: str) -> torch.Tensor:
    """A transformers decoder layer on hidden [batch, seq, hidden], with the ``layer_context`` of its chunk."""
    out = layer(hidden, attention_mask=context["masks"][kind], position_ids=context["position_ids"],
                position_embeddings=context["position_embeddings"])
    return out[0] if isinstance(out, tuple) else out  # layers that still return (hidden, ...)


def layer_context(config: Any, rotary_emb: nn.Module, kinds, hidden: torch.Tensor) -> Dict[str, Any]:
    """What the decoder layers of a chunk need beside their input, from its hidden states
    [batch, seq, hidden]: ``position_ids`` [1, seq], the rotary ``position_embeddings`` and one
    causal mask per attention kind (``masks[kind]``), as the model's own forward makes them."""
    import transformers.masking_utils as masking

    position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    # no cache: the fourth argument is named ``cache`` in newer transformers, ``past_key_values`` before
    masks = {kind: getattr(masking, _MASKS[kind])(config, hidden, None, None, position_ids=position_ids)
             for kind in kinds}
    return {"position_ids": position_ids, "position_embeddings": rotary_emb(hidden, position_ids), "masks": masks}


def split_layers(num_layers: int, num_stages: int) -> List[int]:
    """Layers per stage: as even as possible, the earlier stages taking one more."""
    base, extra = divmod(num_layers, num_stages)
    return [base + (i < extra) for i in range(num_stages)]


def _attention_kinds(config, num_layers: int) -> List[str]:
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        kind = "full_attention" if getattr(config, "sliding_window", None) is None else "sliding_attention"
        return [kind] * num_layers
    kinds = list(layer_types[:num_layers])
    unknown = sorted(set(kinds) - set(_MASKS))
    if unknown:
        raise ValueError(f"pipeline_stages: layer types {unknown} are not supported (only {sorted(_MASKS)})")
    return kinds


def pipeline_stages(model: nn.Module, num_stages: int, *,
                    layers_per_stage: Optional[Sequence[int]] = None) -> List[CausalLMStage]:
    """Cut ``model`` (a ``*ForCausalLM``) into ``num_stages`` consecutive stages.

    The model needs ``model.model.embed_tokens``, ``.layers``, ``.norm``, ``.rotary_emb`` and
    ``model.lm_head`` (DeepseekV3, Qwen3-MoE, Mixtral, Llama, Qwen and most decoder-only
    models of transformers 5.x). Run the stages with ``DualPipe``, ``DualPipeV`` or
    ``PipelineSchedule``, with ``set_p2p_tensor_shapes([(micro_batch, seq, hidden)])``,
    the model dtype, and ``causal_lm_loss`` as the criterion. Parameters stay the model's,
    so gradients land in ``model``'s ``.grad``. Tied embeddings (``lm_head.weight is
    embed_tokens.weight``) on two ranks get two partial gradients that the caller must sum.

    Args:
        model: the causal LM.
        num_stages: stages to cut (DualPipe: ranks, per replica; DualPipeV: 2 x ranks).
        layers_per_stage: decoder layers of each stage (sums to the number of layers; zeros
            allowed); default ``split_layers``, at least one layer per stage.
    """
    require_transformers()
    if not isinstance(num_stages, int) or isinstance(num_stages, bool) or num_stages < 1:
        raise ValueError(f"pipeline_stages: num_stages must be a positive int, got {num_stages!r}")
    base = getattr(model, "model", None)
    missing = [n for n in ("embed_tokens", "layers", "norm", "rotary_emb") if not hasattr(base, n)]
    if getattr(model, "lm_head", None) is None or missing:
        what = ["lm_head"] * (getattr(model, "lm_head", None) is None) + [f"model.{n}" for n in missing]
        raise TypeError(f"pipeline_stages: {type(model).__name__} is not a decoder-only causal LM of the expected "
                        f"shape: no {', '.join(what)}")
    config = model.config
    layers = list(base.layers[:config.num_hidden_layers])
    if layers_per_stage is None:
        if num_stages > len(layers):
            raise ValueError(f"pipeline_stages: {num_stages} stages need at least as many decoder layers, the model "
                             f"has {len(layers)} (or pass layers_per_stage with zeros)")
        layers_per_stage = split_layers(len(layers), num_stages)
    counts = list(layers_per_stage)
    if len(counts) != num_stages or any(not isinstance(c, int) or c < 0 for c in counts) or sum(counts) != len(layers):
        raise ValueError(f"pipeline_stages: layers_per_stage must be {num_stages} non-negative ints summing to "
                         f"{len(layers)}, got {counts}")
    kinds = _attention_kinds(config, len(layers))
    stages, begin = [], 0
    for i, count in enumerate(counts):
        last = i == num_stages - 1
        stages.append(CausalLMStage(
            config, layers[begin:begin + count], kinds[begin:begin + count], base.rotary_emb,
            embed_tokens=base.embed_tokens if i == 0 else None,
            norm=base.norm if last else None, lm_head=model.lm_head if last else None))
        begin += count
    return stages


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Next-token cross-entropy of a causal LM, as its HF ``forward(labels=...)`` computes it.

    Position t predicts ``labels[:, t + 1]``; the last position and labels equal to
    ``ignore_index`` count for nothing; the mean is over the counted tokens, in float32.

    Args:
        logits: [batch, seq, vocab], any float dtype.
        labels: [batch, seq] int64 (usually the input ids).
    Returns:
        a float32 scalar.
    """
    targets = F.pad(labels[:, 1:], (0, 1), value=ignore_index)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1).to(logits.device),
                           ignore_index=ignore_index)
