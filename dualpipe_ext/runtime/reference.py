"""The unpipelined run that defines what a pipeline step computes.

A pipeline step over stages ``s_0 .. s_{n-1}`` must give the same per-micro-batch losses
(bit for bit: each micro-batch sees the same operations) and the same gradients (up to
summation order) as running every micro-batch through all stages in one process. Tests
and the demo use these helpers to check the runtime.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

__all__ = ["sequential_step", "grad_cos_diff"]


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
