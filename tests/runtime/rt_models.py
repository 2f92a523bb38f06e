"""Tiny stage modules for runtime tests: one or two tensors in and out, deferred weight grads."""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

from dualpipe_ext import WeightGradStore
from dualpipe_ext.utils import run_backward


class _LinearFn(torch.autograd.Function):
    """x @ W^T + b whose weight gradient is deferred to WeightGradStore when it is enabled."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.bias = bias
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        bias = ctx.bias

        @torch.no_grad()
        def weight_grad():
            gw = grad.flatten(0, -2).t() @ x.flatten(0, -2)
            gb = grad.flatten(0, -2).sum(0)
            for p, g in ((weight, gw), (bias, gb)):
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad += g

        if WeightGradStore.enabled:
            WeightGradStore.put(weight_grad)
        else:
            weight_grad()
        return grad @ weight, None, None


class ZBLinear(nn.Linear):
    def forward(self, x):
        return _LinearFn.apply(x, self.weight, self.bias)


class Stage(nn.Module):
    """A pipeline stage: ``num_tensors`` tensors of width ``hidden`` in and out."""

    def __init__(self, hidden: int, num_tensors: int = 1) -> None:
        super().__init__()
        self.num_tensors = num_tensors
        self.lin = nn.ModuleList(ZBLinear(hidden, hidden) for _ in range(num_tensors))

    def forward(self, *xs):
        if self.num_tensors == 1:
            return torch.tanh(self.lin[0](xs[0])) + xs[0]
        x, y = xs
        return torch.tanh(self.lin[0](x)) + y, x * torch.sigmoid(self.lin[1](y))


class OverlapStage(Stage):
    """A stage that runs F&B pairs itself; counts its calls."""

    calls = 0

    @classmethod
    def overlapped_forward_backward(cls, module0, inputs0, criterion0, labels0, module1, loss1, outputs1,
                                    output_grads1):
        cls.calls += 1
        outputs0 = module0(*inputs0)
        outputs0 = [outputs0] if isinstance(outputs0, torch.Tensor) else list(outputs0)
        loss0 = criterion0(*outputs0, *labels0) if criterion0 is not None else None
        if loss1 is not None:
            loss1.backward()
            loss1.detach_()
        else:
            run_backward(outputs1, output_grads1)
        return outputs0, loss0


def criterion(*args):
    """MSE of each output against its label, summed: called as criterion(*outputs, *labels)."""
    n = len(args) // 2
    loss = F.mse_loss(args[0], args[n])
    for o, l in zip(args[1:n], args[n + 1:]):
        loss = loss + F.mse_loss(o, l)
    return loss


def make_stages(num_stages: int, hidden: int, num_tensors: int, seed: int, cls=Stage) -> List[Stage]:
    torch.manual_seed(seed)
    return [cls(hidden, num_tensors) for _ in range(num_stages)]
