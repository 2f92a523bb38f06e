"""A transformer block split into components that run, and backpropagate, one at a time.

Per block: ``attn`` (residual add of the previous block's outputs, pre-norm causal
self-attention, the MoE pre-norm, router and shared experts), ``dispatch`` (tokens to the
ranks of their experts), ``mlp`` (the routed experts) and ``combine`` (expert outputs back).
Every computation runs on detached inputs that require grad, so its backward can run on
its own: ``B`` gives the input gradients and queues the weight-gradient closures (through
``WeightGradStore``), ``W`` runs them. Communication is issued asynchronously and waited
on later (:mod:`dualpipe_ext.overlap.comm`).

:class:`MoEStage` runs the components back to back: forward, then (through autograd, on
the stage output) the backward of every component from the top layer down. The overlap
engine (:mod:`dualpipe_ext.overlap.engine`) runs the same components interleaved.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from dualpipe_ext.moe import MoE, combine, dispatch, experts_forward
from dualpipe_ext.moe.experts import linear
from dualpipe_ext.utils import WeightGradStore, run_backward

from . import comm
from .config import BlockConfig, OverlapConfig

__all__ = ["MoEBlock", "MoEStage"]


@contextmanager
def weight_grads(collect: bool) -> Iterator[List]:
    """Around an input-gradient backward: with ``collect``, the weight-gradient closures it
    queues land in the yielded list (not in WeightGradStore's batch)."""
    if not collect:
        yield []
        return
    enabled, cache = WeightGradStore.enabled, WeightGradStore.cache
    WeightGradStore.enabled, WeightGradStore.cache = True, []
    out: List = []
    try:
        yield out
    finally:
        out.extend(WeightGradStore.cache)
        WeightGradStore.enabled, WeightGradStore.cache = enabled, cache


class LayerState:
    """What one block keeps of one micro-batch between its components."""

    __slots__ = ("ins", "r", "u", "w", "idx", "handle", "recv_x", "recv_w", "e", "y", "grad_e", "grad_uw",
                 "w_mlp", "w_attn", "pending", "idx_recv")

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, None)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


class MoEBlock(nn.Module):
    """Pre-norm causal self-attention then an expert-parallel MoE MLP, both with residuals.

    Input and output: [batch, seq, hidden]. Weight gradients of the attention, router and
    experts can be deferred through WeightGradStore; the two norm weights get theirs at once.
    """

    def __init__(self, config: BlockConfig, group=None, overlap: Optional[OverlapConfig] = None,
                 device=None, dtype=None) -> None:
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
        self.moe = MoE(config.moe, group, num_sms=self.overlap.num_comm_sms, device=device, dtype=dtype)

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        nh = self.config.num_heads
        q, k, v = linear(x, self.wqkv).view(b, s, 3, nh, h // nh).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return linear(o.transpose(1, 2).reshape(b, s, h), self.wo)

    # Forward components -------------------------------------------------------------------

    def attn_forward(self, st: LayerState, inputs: List[torch.Tensor]) -> None:
        """``inputs``: the stage input, or the previous block's (residual, combined) [b, s, h]."""
        st.ins = [t.detach().requires_grad_() for t in inputs]
        x = st.ins[0] if len(st.ins) == 1 else st.ins[0] + st.ins[1]
        eps = self.config.norm_eps
        h = x + self._attention(_rms_norm(x, self.norm1, eps))
        u = _rms_norm(h, self.norm2, eps).reshape(-1, h.shape[-1])
        st.idx, st.w = self.moe.route(u)
        st.u = u
        st.r = h if self.moe.shared is None else h + self.moe.shared(u).view_as(h)

    def dispatch_issue(self, st: LayerState) -> None:
        with torch.no_grad():
            st.pending = comm.issue(dispatch(st.u.detach(), st.idx, st.w.detach(), self.config.moe.num_experts,
                                             self.group, async_op=True, num_sms=self.overlap.num_comm_sms),
                                    self.overlap.inject_latency_s)

    def dispatch_wait(self, st: LayerState) -> None:
        recv_x, recv_idx, recv_w, st.handle = st.pending.wait()
        st.pending = None
        st.recv_x = recv_x.detach().requires_grad_()
        st.recv_w = recv_w.detach().requires_grad_()
        st.idx_recv = recv_idx

    def mlp_forward(self, st: LayerState) -> None:
        st.e = experts_forward(self.moe.experts, st.recv_x, st.idx_recv, st.recv_w, num_sms=self.overlap.num_comm_sms)

    def combine_issue(self, st: LayerState) -> None:
        with torch.no_grad():
            st.pending = comm.issue(combine(st.e.detach().to(st.u.dtype), st.handle, async_op=True,
                                            num_sms=self.overlap.num_comm_sms), self.overlap.inject_latency_s)

    def combine_wait(self, st: LayerState) -> None:
        st.y = st.pending.wait().view_as(st.r)
        st.pending = None

    # Backward components: ``grad_y`` / ``grad_r`` are the gradients of this block's combined
    # output and residual (the next block's input gradient, or the stage output gradient) -----

    def combine_backward_issue(self, st: LayerState, grad_y: torch.Tensor) -> None:
        g = grad_y.reshape(-1, grad_y.shape[-1])
        st.pending = comm.issue(comm.combine_backward(g, st.handle, self.overlap.num_comm_sms),
                                self.overlap.inject_latency_s)

    def combine_backward_wait(self, st: LayerState) -> None:
        st.grad_e = st.pending.wait().to(st.e.dtype)
        st.pending = None

    def mlp_backward(self, st: LayerState, collect: bool) -> None:
        with weight_grads(collect) as closures:
            run_backward([st.e], [st.grad_e])
        st.w_mlp, st.e, st.grad_e = closures, None, None

    def dispatch_backward_issue(self, st: LayerState) -> None:
        grad_w = st.recv_w.grad if st.recv_w.grad is not None else torch.zeros_like(st.recv_w)
        st.pending = comm.issue(comm.dispatch_backward(st.recv_x.grad, grad_w, st.handle, st.idx,
                                                       self.overlap.num_comm_sms), self.overlap.inject_latency_s)
        st.recv_x = st.recv_w = None

    def dispatch_backward_wait(self, st: LayerState) -> None:
        st.grad_uw = st.pending.wait()
        st.pending = None

    def attn_backward(self, st: LayerState, grad_r: torch.Tensor, collect: bool) -> None:
        grad_u, grad_w = st.grad_uw
        with weight_grads(collect) as closures:
            run_backward([st.r, st.u, st.w], [grad_r, grad_u.to(st.u.dtype), grad_w])
        st.w_attn = closures
        st.r = st.u = st.w = st.grad_uw = st.handle = None

    @staticmethod
    def run_weight(closures: Optional[List]) -> None:
        for fn in closures or ():
            fn()


class _Chain(torch.autograd.Function):
    """Connects a stage's output to its input and parameters; its backward runs the stage's
    component backward (or, while the engine captures, hands the output gradient over)."""

    capture: Optional[list] = None

    @staticmethod
    def forward(ctx, stage, states, x, anchor):
        ctx.stage, ctx.states = stage, states
        return states[-1].out

    @staticmethod
    def backward(ctx, grad):
        if _Chain.capture is not None:
            _Chain.capture.append((ctx.stage, ctx.states, grad))
            return None, None, None, None
        grad_x = ctx.stage.backward_components(ctx.states, grad)
        ctx.states = None
        return None, None, grad_x, None


class _Out(LayerState):
    __slots__ = ("out", "input")


class MoEStage(nn.Module):
    """A pipeline stage of ``num_layers`` :class:`MoEBlock`\\ s, run component by component.

    Input and output: one [batch, seq, hidden] tensor. Expert parallelism over ``group``.
    """

    def __init__(self, config: BlockConfig, num_layers: int, group=None, overlap: Optional[OverlapConfig] = None,
                 device=None, dtype=None) -> None:
        super().__init__()
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
        self.config, self.overlap = config, overlap or OverlapConfig()
        self.blocks = nn.ModuleList(MoEBlock(config, group, self.overlap, device, dtype) for _ in range(num_layers))

    def begin(self, x: torch.Tensor) -> List[LayerState]:
        if x.dim() != 3 or x.shape[-1] != self.config.moe.hidden:
            raise ValueError(f"MoEStage input must be [batch, seq, {self.config.moe.hidden}], got {tuple(x.shape)}")
        states: List[LayerState] = [LayerState() for _ in self.blocks] + [_Out()]
        states[-1].input = x
        return states

    @staticmethod
    def layer_inputs(states: List[LayerState], layer: int) -> List[torch.Tensor]:
        if layer == 0:
            return [states[-1].input]
        return [states[layer - 1].r, states[layer - 1].y]

    def finish(self, states: List[LayerState]) -> torch.Tensor:
        """The stage output, [batch, seq, hidden], connected to the component backward."""
        last = states[-2]
        states[-1].out = (last.r.detach() + last.y).detach()
        if not torch.is_grad_enabled():
            return states[-1].out
        anchor = next(p for p in self.parameters() if p.requires_grad)
        return _Chain.apply(self, states, states[-1].input, anchor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        states = self.begin(x)
        for layer, (block, st) in enumerate(zip(self.blocks, states)):
            block.attn_forward(st, self.layer_inputs(states, layer))
            block.dispatch_issue(st)
            block.dispatch_wait(st)
            block.mlp_forward(st)
            block.combine_issue(st)
            block.combine_wait(st)
        return self.finish(states)

    @staticmethod
    def upper_grads(states: List[LayerState], layer: int, grad_out: torch.Tensor):
        """(grad of residual, grad of combined output) of ``layer``."""
        if layer == len(states) - 2:
            return grad_out, grad_out
        ins = states[layer + 1].ins
        return ins[0].grad, ins[1].grad

    def backward_components(self, states: List[LayerState], grad_out: torch.Tensor) -> Optional[torch.Tensor]:
        """Every component's backward, top layer down; returns the gradient of the stage input.

        Weight gradients: queued in WeightGradStore while it is enabled, else computed at once.
        """
        collect = not WeightGradStore.enabled
        for layer in reversed(range(len(self.blocks))):
            block, st = self.blocks[layer], states[layer]
            grad_r, grad_y = self.upper_grads(states, layer, grad_out)
            block.combine_backward_issue(st, grad_y)
            block.combine_backward_wait(st)
            block.mlp_backward(st, collect)
            block.dispatch_backward_issue(st)
            block.run_weight(st.w_mlp)
            block.dispatch_backward_wait(st)
            block.attn_backward(st, grad_r, collect)
            block.run_weight(st.w_attn)
            if layer + 1 < len(self.blocks):
                states[layer + 1].ins = None
        grad_x = states[0].ins[0].grad
        states[0].ins = None
        return grad_x
