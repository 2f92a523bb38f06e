"""Runs: one chunk walked through a stage's components, one component at a time.

A ``ForwardRun`` takes a stage input through the prologue, every layer's components
(``attn``: residual stream, attention and router; ``shared``: shared experts; ``dispatch``;
``mlp``: routed experts; ``combine``) and the epilogue. Every computation starts from
detached inputs that require grad, so the ``BackwardRun`` of the same chunk can run each
component's backward on its own, top layer down: ``B`` computes input gradients and
collects the weight-gradient closures, ``W`` runs them. Exchanges are issued through the
layer's ``MoE`` (its collective path or its ``EPBuffer``) and return ``InFlight`` objects,
waited for only when the plan says so.

A layer is anything with an ``moe`` (``dualpipe_ext.moe.MoE``) and ``attention(x, context)``
returning ``(h, u)``: the residual stream after attention [batch, seq, hidden] and the
input of the MoE [batch, seq, hidden]; the layer's output is ``h + shared(u) + routed(u)``.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, List, Optional, Sequence

import torch

from dualpipe_ext.inflight import InFlight
from dualpipe_ext.utils import WeightGradStore, run_backward

__all__ = ["ForwardRun", "BackwardRun", "weight_grads"]


@contextmanager
def weight_grads(collect: bool) -> Iterator[List[Callable[[], None]]]:
    """Around an input-gradient backward: with ``collect`` the weight-gradient closures it queues
    land in the yielded list, run later by a ``W`` step; otherwise they go where WeightGradStore
    sends them (its current batch while enabled, computed at once when disabled)."""
    if not collect:
        yield []
        return
    with WeightGradStore.collect() as funcs:
        yield funcs


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(torch.is_grad_enabled())


class _Layer:
    """What one layer keeps of one chunk between its components."""

    __slots__ = ("x", "h", "u", "w", "idx", "us", "sh", "pending", "handle", "recv_x", "recv_idx", "recv_w", "e",
                 "y", "grad_e", "grad_uw", "w_mlp", "w_attn", "w_shared")

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, None)


class ForwardRun:
    """The forward of one chunk through ``stage``'s components (the state its backward needs).

    ``x``: the stage input (token ids for a stage with a prologue, else [batch, seq, hidden]);
    ``share``: its part of the chunk (1/2 for a two-batch half), which scales injected latency.
    """

    def __init__(self, stage, x: torch.Tensor, share: float = 1.0) -> None:
        self.stage = stage
        self.input = x
        self.layers = [_Layer() for _ in stage.layers]
        self.context: Any = None
        self.pro_out: Optional[torch.Tensor] = None  # prologue output (graph to its parameters)
        self.top: Optional[torch.Tensor] = None  # leaf: the last layer's output
        self.output: Optional[torch.Tensor] = None  # the stage output (epilogue output, or the top)
        self.delay = stage.overlap.inject_latency_s * share  # a transfer's time grows with its bytes
        if stage.prologue is None:
            self._begin(x)

    def _begin(self, x: torch.Tensor) -> None:
        self.layers[0].x = _leaf(x)
        self.context = self.stage.context_of(x)

    def _layer_input(self, l: int) -> torch.Tensor:
        if l == 0:
            return self.layers[0].x
        prev = self.layers[l - 1]
        out = prev.h + prev.y if prev.sh is None else prev.h + prev.sh + prev.y
        prev.y = None
        if not torch.is_grad_enabled():  # no backward: nothing of the layer is needed any more
            prev.h = prev.sh = prev.u = prev.w = None
        st = self.layers[l]
        st.x = _leaf(out)
        return st.x

    # components ---------------------------------------------------------------------------

    def prologue(self) -> None:
        self.pro_out = self.stage.prologue(self.input)
        self._begin(self.pro_out)

    def attn(self, l: int) -> None:
        st, layer = self.layers[l], self.stage.layers[l]
        x = self._layer_input(l)
        st.h, u = layer.attention(x, self.context)
        st.u = u.reshape(-1, u.shape[-1])
        st.idx, st.w = layer.moe.route(st.u)
        layer.moe.count_load(st.idx)

    def shared(self, l: int) -> None:
        st, moe = self.layers[l], self.stage.layers[l].moe
        st.us = _leaf(st.u)
        st.sh = moe.shared(st.us).view_as(st.h)

    def dispatch_issue(self, l: int) -> InFlight:
        st, moe = self.layers[l], self.stage.layers[l].moe
        with torch.no_grad():
            st.pending = moe.dispatch(st.u.detach(), st.idx, st.w.detach(), async_op=True).with_delay(self.delay)
        return st.pending

    def dispatch_wait(self, l: int) -> None:
        st = self.layers[l]
        recv_x, st.recv_idx, recv_w, st.handle = st.pending.wait()
        st.pending = None
        st.recv_x, st.recv_w = _leaf(recv_x), _leaf(recv_w)

    def mlp(self, l: int) -> None:
        st, moe = self.layers[l], self.stage.layers[l].moe
        st.e = moe.experts_forward(st.recv_x, st.recv_idx, st.recv_w)

    def combine_issue(self, l: int) -> InFlight:
        st, moe = self.layers[l], self.stage.layers[l].moe
        with torch.no_grad():
            st.pending = moe.combine(st.e.detach().to(st.u.dtype), st.handle, async_op=True).with_delay(self.delay)
        return st.pending

    def combine_wait(self, l: int) -> None:
        st = self.layers[l]
        st.y = st.pending.wait().view_as(st.h)
        st.pending = None

    def epilogue(self) -> None:
        self.finish_layers()
        self.output = self.stage.epilogue(self.top)

    def finish_layers(self) -> None:
        """The last layer's output as a leaf (and the stage output when there is no epilogue)."""
        last = self.layers[-1]
        out = last.h + last.y if last.sh is None else last.h + last.sh + last.y
        last.y = None
        self.top = _leaf(out)
        if self.stage.epilogue is None:
            self.output = self.top


class BackwardRun:
    """The backward of one chunk whose ``ForwardRun`` is ``fwd``, from ``grad`` (the stage output's).

    ``collect``: keep the weight-gradient closures for the plan's ``W`` steps (else they go to
    WeightGradStore's current batch, for a zero-bubble schedule's later ``W``).
    """

    def __init__(self, fwd: ForwardRun, grad: torch.Tensor, collect: bool) -> None:
        self.fwd, self.stage, self.collect = fwd, fwd.stage, collect
        self.layers = fwd.layers
        self.grad_out = grad
        self.delay = fwd.delay
        self.input_grad: Optional[torch.Tensor] = None
        if self.stage.epilogue is None:
            fwd.top.grad = None
            self._top_grad = grad
        else:
            self._top_grad = None

    def _grad_of_output(self, l: int) -> torch.Tensor:
        """Gradient of layer ``l``'s output [batch, seq, hidden]."""
        if l == len(self.layers) - 1:
            if self._top_grad is None:
                self._top_grad = self.fwd.top.grad
            return self._top_grad
        return self.layers[l + 1].x.grad

    def epilogue(self) -> None:
        run_backward([self.fwd.output], [self.grad_out])
        self.fwd.output = None

    def combine_issue(self, l: int) -> InFlight:
        st, moe = self.layers[l], self.stage.layers[l].moe
        g = self._grad_of_output(l)
        with torch.no_grad():
            st.pending = moe.combine_backward(g.reshape(-1, g.shape[-1]).to(st.u.dtype), st.handle,
                                              async_op=True).with_delay(self.delay)
        return st.pending

    def combine_wait(self, l: int) -> None:
        st = self.layers[l]
        st.grad_e = st.pending.wait().to(st.e.dtype)
        st.pending = None

    def shared(self, l: int) -> None:
        st = self.layers[l]
        with weight_grads(self.collect) as funcs:
            run_backward([st.sh], [self._grad_of_output(l)])
        st.w_shared, st.sh = funcs, None

    def mlp(self, l: int) -> None:
        st = self.layers[l]
        with weight_grads(self.collect) as funcs:
            run_backward([st.e], [st.grad_e])
        st.w_mlp, st.e, st.grad_e = funcs, None, None

    def dispatch_issue(self, l: int) -> InFlight:
        st, moe = self.layers[l], self.stage.layers[l].moe
        grad_x = st.recv_x.grad if st.recv_x.grad is not None else torch.zeros_like(st.recv_x)
        grad_w = st.recv_w.grad if st.recv_w.grad is not None else torch.zeros_like(st.recv_w)
        with torch.no_grad():
            st.pending = moe.dispatch_backward(grad_x, grad_w, st.handle, async_op=True).with_delay(self.delay)
        st.recv_x = st.recv_w = None
        return st.pending

    def dispatch_wait(self, l: int) -> None:
        st = self.layers[l]
        st.grad_uw = st.pending.wait()
        st.pending = None

    def attn(self, l: int) -> None:
        st = self.layers[l]
        grad_u, grad_w = st.grad_uw
        grad_u = grad_u.to(st.u.dtype)
        if st.us is not None and st.us.grad is not None:
            grad_u = grad_u + st.us.grad
        with weight_grads(self.collect) as funcs:
            run_backward([st.h, st.u, st.w], [self._grad_of_output(l), grad_u, grad_w])
        st.w_attn = funcs
        st.h = st.u = st.w = st.us = st.grad_uw = st.handle = None
        if l + 1 < len(self.layers):
            self.layers[l + 1].x = None
        else:
            self.fwd.top = self._top_grad = None

    def weight(self, l: int, which: str) -> None:
        st = self.layers[l]
        for fn in getattr(st, which) or ():
            fn()
        setattr(st, which, None)

    def prologue(self) -> None:
        x0 = self.layers[0].x
        run_backward([self.fwd.pro_out], [x0.grad])
        self.layers[0].x = self.fwd.pro_out = None

    def finish(self) -> Optional[torch.Tensor]:
        """Gradient of the stage input (None for a stage with a prologue: it went into the prologue)."""
        if self.stage.prologue is None:
            x0 = self.layers[0].x
            self.input_grad = x0.grad if x0 is not None else None
            self.layers[0].x = None
        return self.input_grad


def split_halves(x: torch.Tensor) -> Sequence[torch.Tensor]:
    """The two halves of a micro-batch along dim 0 (the first one larger when odd)."""
    n = x.shape[0]
    return (x[: (n + 1) // 2], x[(n + 1) // 2:])
