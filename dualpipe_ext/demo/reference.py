"""The unpipelined runs that define what the demos' pipelined steps compute.

A pipeline step over stages ``s_0 .. s_{n-1}`` must give the same per-micro-batch losses
(bit for bit: each micro-batch sees the same operations) and the same gradients (up to
summation order) as running every micro-batch through all stages in one process
(``sequential_step``). The main job checks its first step against the untouched
transformers model on the whole global batch in one process (``lm_reference``). Tests use
these helpers too.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

__all__ = ["sequential_step", "grad_cos_diff", "lm_reference", "swapped_name", "fp8_round_expert_inputs"]


def sequential_step(stages: Sequence[nn.Module], inputs: Sequence[torch.Tensor], num_micro_batches: int,
                    criterion: Optional[Callable] = None, labels: Sequence[torch.Tensor] = (), batch_dim: int = 0
                    ) -> Tuple[Optional[torch.Tensor], Tuple[torch.Tensor, ...]]:
    """Run ``stages`` one after another on each micro-batch; backward each loss if grad is enabled.

    Returns ``(losses [num_micro_batches] or None, outputs concatenated along batch_dim)``.
    """
    split = [t.tensor_split(num_micro_batches, dim=batch_dim) for t in inputs]
    split_labels = [t.tensor_split(num_micro_batches, dim=batch_dim) for t in labels]
    losses: List[torch.Tensor] = []
    outputs: List[List[torch.Tensor]] = []
    for c in range(num_micro_batches):
        x = [s[c] for s in split]
        for stage in stages:
            x = stage(*x)
            x = [x] if isinstance(x, torch.Tensor) else list(x)
        outputs.append([t.detach() for t in x])
        if criterion is not None:
            loss = criterion(*x, *[s[c] for s in split_labels])
            if torch.is_grad_enabled():
                loss.backward()
            losses.append(loss.detach())
    cat = tuple(torch.cat(col, dim=batch_dim) for col in zip(*outputs))
    return (torch.stack(losses) if losses else None), cat


def grad_cos_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """``1 - 2 x.y / (|x|² + |y|²)`` in float64, deepseek-ai/DualPipe's gradient metric (``cal_diff``).

    That is ``|x - y|² / (|x|² + |y|²)``: 0 exactly when ``x == y`` (both zero included),
    equal to ``1 - cos(x, y)`` when ``|x| == |y|``, and unlike ``1 - cos`` it also grows when
    the two differ only in scale.
    """
    x, y = x.detach().double().flatten(), y.detach().double().flatten()
    denom = float((x * x).sum() + (y * y).sum())
    if denom == 0.0:
        return 0.0
    return 1.0 - 2.0 * float((x * y).sum()) / denom


def swapped_name(name: str) -> Tuple[str, Optional[str]]:
    """The name a transformers MoE parameter takes in ``dualpipe_ext.moe.MoE`` after ``replace_moe``,
    and which half of a fused tensor it is (``"gate"``/``"up"`` of ``shared.gate_up``, else None)."""
    head, sep, leaf = name.rpartition(".mlp.")
    if not sep:
        return name, None
    prefix = f"{head}.mlp."
    renames = {"gate.weight": ("gate", None), "experts.gate_up_proj": ("experts.gate_up", None),
               "experts.down_proj": ("experts.down", None),
               "shared_experts.gate_proj.weight": ("shared.gate_up", "gate"),
               "shared_experts.up_proj.weight": ("shared.gate_up", "up"),
               "shared_experts.down_proj.weight": ("shared.down", None)}
    if leaf in renames:
        new, part = renames[leaf]
        return prefix + new, part
    return name, None


def lm_reference(model: nn.Module, batches: Sequence[torch.Tensor], loss_fn: Callable) -> Tuple[float, dict]:
    """Mean loss of ``model`` over ``batches`` ([mb, seq] int64 input ids each, the labels too)
    and its gradient, by the names the parameters have after ``replace_moe`` (fused halves joined)."""
    model.zero_grad(set_to_none=True)
    losses = [loss_fn(model(ids).logits, ids) for ids in batches]
    mean = torch.stack(losses).mean()
    mean.backward()
    grads: dict = {}
    halves: dict = {}
    for name, p in model.named_parameters():
        new, part = swapped_name(name)
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        if part is None:
            grads[new] = g
        else:
            halves.setdefault(new, {})[part] = g
    for new, parts in halves.items():
        grads[new] = torch.cat([parts["gate"], parts["up"]])
    return float(mean.detach()), grads


class _FP8RoundTrip(torch.autograd.Function):
    """Rows as an FP8 dispatch delivers them (``kernels/fp8.py``); the gradient passes straight through."""

    @staticmethod
    def forward(ctx, x):
        from dualpipe_ext.kernels.fp8 import round_trip

        return round_trip(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def fp8_round_expert_inputs(model: nn.Module) -> int:
    """Make every routed-experts module of a transformers MoE model see its input rows rounded as an FP8
    dispatch rounds them (router and shared experts keep the unrounded rows); returns how many."""
    count = 0
    for module in model.modules():
        if type(module).__name__.endswith("Experts") and hasattr(module, "gate_up_proj"):
            module.register_forward_pre_hook(lambda _m, args: (_FP8RoundTrip.apply(args[0]), *args[1:]))
            count += 1
    return count
