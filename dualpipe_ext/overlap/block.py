"""The project's transformer block as the overlap engine's layer: pre-norm causal
self-attention, then an expert-parallel MoE MLP, both with residuals.

The engine needs two things of a layer: ``moe`` (a ``dualpipe_ext.moe.MoE``, whose route,
dispatch, experts, combine, shared experts and backward exchanges it calls one by one) and
``attention(x, context) -> (h, u)``: the residual stream after attention and the MoE's input.
The layer's output is ``h + moe(u)``. Any decoder layer can be given that form (see
``dualpipe_ext.integrations.hf`` for transformers models).
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from dualpipe_ext.moe import MoE
from dualpipe_ext.moe.experts import linear

from .config import BlockConfig, OverlapConfig

__all__ = ["MoEBlock", "rms_norm"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


class MoEBlock(nn.Module):
    """Pre-norm causal self-attention then an expert-parallel MoE MLP, both with residuals.

    Input and output: [batch, seq, hidden]. Weight gradients of the attention, router and
    experts can be deferred through WeightGradStore; the two norm weights get theirs at once.
    ``ep``: an ``EPBuffer`` for the device-side exchanges (None: the collective path).
    """

    def __init__(self, config: BlockConfig, group=None, overlap: Optional[OverlapConfig] = None,
                 device=None, dtype=None, ep=None) -> None:
        super().__init__()
        self.config, self.group = config, group
        self.overlap = overlap or OverlapConfig()
        h = config.moe.hidden
        self.norm1 = nn.Parameter(torch.ones(h, device=device, dtype=dtype))
        self.wqkv = nn.Parameter(torch.empty(3 * h, h, device=device, dtype=dtype))
        self.wo = nn.Parameter(torch.empty(h, h, device=device, dtype=dtype))
        nn.init.normal_(self.wqkv, std=h ** -0.5)
        nn.init.normal_(self.wo, std=h ** -0.5)
        self.norm2 = nn.Parameter(torch.ones(h, device=device, dtype=dtype))
        self.moe = MoE(config.moe, group, num_comm_sms=self.overlap.num_comm_sms, ep=ep, device=device, dtype=dtype)

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        nh = self.config.num_heads
        q, k, v = linear(x, self.wqkv).view(b, s, 3, nh, h // nh).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return linear(o.transpose(1, 2).reshape(b, s, h), self.wo)

    def attention(self, x: torch.Tensor, context: Any = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """x [batch, seq, hidden] -> (h = x + attention(norm1(x)), u = norm2(h)), both [batch, seq, hidden]."""
        eps = self.config.norm_eps
        h = x + self._attention(rms_norm(x, self.norm1, eps))
        return h, rms_norm(h, self.norm2, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block as one autograd graph (the engine runs it component by component instead)."""
        h, u = self.attention(x)
        return h + self.moe(u)
