"""Expert MLPs: grouped SwiGLU experts, dense shared experts, and the linear maps under them.

Every weight gradient can be deferred: while ``WeightGradStore.enabled`` is set during a
backward, the input gradient is computed at once and a closure computing (and accumulating
into ``.grad``) the weight gradient goes to ``WeightGradStore.put``, so zero-bubble schedules
run it later as a separate ``W`` step.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from dualpipe_ext.utils import WeightGradStore

from .grouped_mm import BACKENDS, grouped_mm, grouped_wgrad

__all__ = ["linear", "grouped_linear", "GroupedExperts", "SharedExperts", "experts_forward"]


def _positive(owner: str, **values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")


@torch.no_grad()
def _accumulate(param: torch.Tensor, compute_grad) -> None:
    """Add ``compute_grad()`` to ``param.grad`` (a deferred weight gradient running outside backward)."""
    grad = compute_grad()
    if param.grad is None:
        param.grad = grad
    else:
        param.grad += grad


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad @ weight if ctx.needs_input_grad[0] else None
        if not ctx.needs_input_grad[1]:
            return grad_x, None

        def weight_grad() -> torch.Tensor:
            return grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1])

        if WeightGradStore.enabled:
            WeightGradStore.put(lambda: _accumulate(weight, weight_grad))
            return grad_x, None
        return grad_x, weight_grad()


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight^T`` (x [..., k], weight [n, k]) whose weight gradient can be deferred."""
    return _Linear.apply(x, weight)


class _GroupedLinear(torch.autograd.Function):
    """The budget ``num_comm_sms`` travels in the context to the backward's GEMMs (which autograd
    may run on another thread), the deferred weight gradient's included."""

    @staticmethod
    def forward(ctx, x, weight, group_ends, backend, num_comm_sms):
        ctx.save_for_backward(x, weight, group_ends)
        ctx.backend, ctx.num_comm_sms = backend, num_comm_sms
        return grouped_mm(x, weight, group_ends, backend, num_comm_sms)

    @staticmethod
    def backward(ctx, grad):
        x, weight, group_ends = ctx.saved_tensors
        backend, num_comm_sms = ctx.backend, ctx.num_comm_sms
        grad = grad.contiguous()
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grouped_mm(grad, weight.transpose(1, 2), group_ends, backend, num_comm_sms)  # a view: no copy
        if not ctx.needs_input_grad[1]:
            return grad_x, None, None, None, None

        def weight_grad() -> torch.Tensor:
            return grouped_wgrad(grad, x, group_ends, backend, num_comm_sms)

        if WeightGradStore.enabled:
            WeightGradStore.put(lambda: _accumulate(weight, weight_grad))
            return grad_x, None, None, None, None
        return grad_x, weight_grad(), None, None, None


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, group_ends: torch.Tensor, backend: str = "auto",
                   num_comm_sms: Optional[int] = None) -> torch.Tensor:
    """``out[rows of g] = x[rows of g] @ weight[g]^T``; weight gradient deferrable.

    x: [num_rows, k]; weight: [num_groups, n, k]; group_ends: [num_groups] int64 cumulative
    row counts ending at num_rows. Returns [num_rows, n]. The GEMMs of forward and backward
    leave ``num_comm_sms`` SMs to communication (None: the whole device).
    """
    return _GroupedLinear.apply(x, weight, group_ends, backend, num_comm_sms)


class GroupedExperts(nn.Module):
    """``num_experts`` SwiGLU MLPs ``down(silu(gate(x)) * up(x))`` run as grouped GEMMs.

    Parameters: ``gate_up`` [num_experts, 2 * intermediate, hidden] (gate rows first, then up),
    ``down`` [num_experts, hidden, intermediate].
    """

    def __init__(self, num_experts: int, hidden: int, intermediate: int, backend: str = "auto",
                 device=None, dtype=None) -> None:
        super().__init__()
        _positive("GroupedExperts", num_experts=num_experts, hidden=hidden, intermediate=intermediate)
        if backend not in BACKENDS:
            raise ValueError(f"GroupedExperts: backend must be one of {BACKENDS}, got {backend!r}")
        self.num_experts, self.hidden, self.intermediate, self.backend = num_experts, hidden, intermediate, backend
        self.gate_up = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden, device=device, dtype=dtype))
        self.down = nn.Parameter(torch.empty(num_experts, hidden, intermediate, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.gate_up, -1 / math.sqrt(self.hidden), 1 / math.sqrt(self.hidden))
        nn.init.uniform_(self.down, -1 / math.sqrt(self.intermediate), 1 / math.sqrt(self.intermediate))

    def forward(self, x: torch.Tensor, num_tokens_per_expert: torch.Tensor,
                num_comm_sms: Optional[int] = None) -> torch.Tensor:
        """x: [num_rows, hidden] grouped by expert; num_tokens_per_expert: [num_experts] int64.
        The grouped GEMMs (and their backward) leave ``num_comm_sms`` SMs to communication."""
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.hidden:
            raise ValueError(f"GroupedExperts input must be [num_rows, {self.hidden}], got "
                             f"{tuple(getattr(x, 'shape', ())) or type(x).__name__}")
        counts = num_tokens_per_expert
        if (not isinstance(counts, torch.Tensor) or counts.dtype not in (torch.int64, torch.int32)
                or tuple(counts.shape) != (self.num_experts,)):
            raise ValueError(f"num_tokens_per_expert must be a [{self.num_experts}] int64 tensor (rows per expert), "
                             f"got {getattr(counts, 'dtype', type(counts).__name__)} "
                             f"{tuple(getattr(counts, 'shape', ()))}")
        group_ends = torch.cumsum(num_tokens_per_expert, 0)
        h = grouped_linear(x, self.gate_up, group_ends, self.backend, num_comm_sms)
        gate, up = h.split(self.intermediate, dim=-1)
        return grouped_linear(F.silu(gate) * up, self.down, group_ends, self.backend, num_comm_sms)


class SharedExperts(nn.Module):
    """Dense SwiGLU MLP every token passes through (``num_shared * intermediate`` wide)."""

    def __init__(self, hidden: int, intermediate: int, device=None, dtype=None) -> None:
        super().__init__()
        _positive("SharedExperts", hidden=hidden, intermediate=intermediate)
        self.hidden, self.intermediate = hidden, intermediate
        self.gate_up = nn.Parameter(torch.empty(2 * intermediate, hidden, device=device, dtype=dtype))
        self.down = nn.Parameter(torch.empty(hidden, intermediate, device=device, dtype=dtype))
        nn.init.uniform_(self.gate_up, -1 / math.sqrt(hidden), 1 / math.sqrt(hidden))
        nn.init.uniform_(self.down, -1 / math.sqrt(intermediate), 1 / math.sqrt(intermediate))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.hidden:
            raise ValueError(f"SharedExperts input must be [..., {self.hidden}], got "
                             f"{tuple(getattr(x, 'shape', ())) or type(x).__name__}")
        gate, up = linear(x, self.gate_up).split(self.intermediate, dim=-1)
        return linear(F.silu(gate) * up, self.down)


def experts_forward(
    experts: GroupedExperts,
    recv_x: torch.Tensor,
    recv_idx: torch.Tensor,
    recv_weights: torch.Tensor,
    num_comm_sms: Optional[int] = None,
    capacity: bool = False,
) -> torch.Tensor:
    """Expert side of a dispatch: ``y[i] = sum_k recv_weights[i, k] * expert_{recv_idx[i, k]}(recv_x[i])``.

    recv_x: [num_recv, hidden]; recv_idx: [num_recv, num_topk] int64 local expert or -1;
    recv_weights: [num_recv, num_topk] float32. Returns [num_recv, hidden], dtype of recv_x.
    Gradients reach recv_x, recv_weights and the expert weights. With ``capacity`` (rows of an
    ``EPBuffer`` dispatch, padding included) the expanded buffer has its worst-case size
    ``num_recv * min(num_topk, num_experts)``, so nothing is read on the host; padding rows
    (all -1) give zero rows. ``num_comm_sms``: the grid of the expanding and reducing kernels,
    and the SMs the grouped GEMMs leave free (None: unbounded).
    """
    from dualpipe_ext.kernels.expand_reduce import expand, reduce

    if not isinstance(experts, GroupedExperts):
        raise TypeError(f"experts_forward takes the layer's GroupedExperts first, got {type(experts).__name__}")
    for name, t, dtype in (("recv_x", recv_x, None), ("recv_idx", recv_idx, torch.int64),
                           ("recv_weights", recv_weights, torch.float32)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or (dtype is not None and t.dtype != dtype):
            want = f"[num_recv, {'hidden' if dtype is None else 'num_topk'}]" + (f" {dtype}" if dtype else "")
            raise ValueError(f"experts_forward: {name} must be a {want} tensor, got "
                             f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    if recv_idx.shape != recv_weights.shape or recv_idx.shape[0] != recv_x.shape[0]:
        raise ValueError(f"experts_forward: recv_x {tuple(recv_x.shape)}, recv_idx {tuple(recv_idx.shape)} and "
                         f"recv_weights {tuple(recv_weights.shape)} must agree on num_recv (and num_topk)")
    num_rows = recv_idx.shape[0] * min(recv_idx.shape[1], experts.num_experts) if capacity else None
    expanded = expand(recv_x, recv_idx, experts.num_experts, num_rows=num_rows, num_sms=num_comm_sms)
    expert_out = experts(expanded.expanded_x, expanded.num_tokens_per_local_expert, num_comm_sms)
    return reduce(expert_out, expanded.expand_pos, recv_weights, num_sms=num_comm_sms)
