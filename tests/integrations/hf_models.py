"""Tiny random transformers models for the integration tests: built from configs, float32, no download."""
from __future__ import annotations

from typing import Callable, Dict

import torch

VOCAB, HIDDEN, SEQ = 64, 16, 8


def _deepseek_v3(num_layers: int):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    # 8 experts in 4 groups, 2 groups per token, top-2, one shared expert; layer 0 dense
    config = DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=24, moe_intermediate_size=8,
        num_hidden_layers=num_layers, num_attention_heads=2, num_key_value_heads=2, n_shared_experts=1,
        n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, routed_scaling_factor=2.5,
        norm_topk_prob=True, first_k_dense_replace=1, kv_lora_rank=8, q_lora_rank=None, qk_rope_head_dim=4,
        qk_nope_head_dim=4, v_head_dim=8, max_position_embeddings=64, tie_word_embeddings=False)
    return DeepseekV3ForCausalLM(config)


def _qwen3_moe(num_layers: int):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=24, moe_intermediate_size=8,
        num_hidden_layers=num_layers, num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=64, tie_word_embeddings=False)
    return Qwen3MoeForCausalLM(config)


def _mixtral(num_layers: int):
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=8, num_hidden_layers=num_layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=64, tie_word_embeddings=False)
    return MixtralForCausalLM(config)


BUILDERS: Dict[str, Callable] = {"deepseek_v3": _deepseek_v3, "qwen3_moe": _qwen3_moe, "mixtral": _mixtral}
# MoE blocks of each model with 2 decoder layers (DeepSeek-V3's first layer is dense)
NUM_MOE_BLOCKS = {"deepseek_v3": 1, "qwen3_moe": 2, "mixtral": 2}


@torch.no_grad()
def _spread(model) -> None:
    """Decisive routing (router rows far apart) and a non-zero bias, so fp32 noise cannot flip a choice."""
    g = torch.Generator().manual_seed(1234)
    for name, p in model.named_parameters():
        if name.endswith("mlp.gate.weight"):
            p.copy_(torch.randn(p.shape, generator=g))
        elif name.endswith(("gate_up_proj", "down_proj")) and p.dim() == 3:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(torch.randint(0, 8, b.shape, generator=g).float() / 64)


def build(name: str, num_layers: int = 2, seed: int = 0):
    """The same float32 model for a name and seed, in every process (eager attention)."""
    torch.manual_seed(seed)
    model = BUILDERS[name](num_layers)
    model.config._attn_implementation = "eager"
    _spread(model)
    return model.float()


def tokens(batch: int, seed: int = 0) -> torch.Tensor:
    """[batch, SEQ] int64 token ids."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, SEQ), generator=g)


def moe_layout(model, world: int = 1):
    """The gradients of an untouched HF model, named and laid out as after ``replace_moe``.

    Returns ``(full, sharded)``: ``full`` maps each parameter name of the swapped model to the
    reference gradient over all experts; names in ``sharded`` hold routed experts, of which
    rank r has rows ``[r * L, (r + 1) * L)`` (L = experts / world), the others are replicated.
    """
    grads = {name: p.grad for name, p in model.named_parameters()}
    full, sharded = {}, set()
    for name, g in grads.items():
        head, _, leaf = name.rpartition(".mlp.")
        prefix = f"{head}.mlp." if leaf else ""
        if leaf == "gate.weight" and g.dim() == 2 and f"{prefix}experts.gate_up_proj" in grads:
            full[prefix + "gate"] = g
        elif leaf in ("experts.gate_up_proj", "experts.down_proj"):
            full[prefix + leaf[: -len("_proj")]] = g
            sharded.add(prefix + leaf[: -len("_proj")])
        elif leaf == "shared_experts.gate_proj.weight":
            full[prefix + "shared.gate_up"] = torch.cat([g, grads[prefix + "shared_experts.up_proj.weight"]])
        elif leaf == "shared_experts.down_proj.weight":
            full[prefix + "shared.down"] = g
        elif leaf != "shared_experts.up_proj.weight":
            full[name] = g
    return full, sharded


def output_grad(batch: int, seed: int = 1) -> torch.Tensor:
    """A fixed [batch, SEQ, VOCAB] float32 gradient for the logits (the loss sum(logits * it) is linear)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, SEQ, VOCAB, generator=g)
