"""The overlap engine: one forward and one backward chunk run interleaved by components.

``OverlappedMoEStage.overlapped_forward_backward`` is what the runtime calls for a
forward+backward pair (``F{m}.{c}+B{n}.{d}``). It walks the component plan of the C++ core
(:func:`dualpipe_ext.overlap.plan.component_plan`): each all-to-all is issued
asynchronously, the computation the plan pairs with it runs while it is in flight, and
the result is waited for only just before its consumer. Each step is recorded as a span
(``attn.F0``, ``issue dispatch.F0``, ``wait dispatch.F0``, ...) in the running step's
timeline, so ``dualpipe-ext trace`` shows the components.

Results equal those of running the forward, then the backward, of the same components
(:class:`~dualpipe_ext.overlap.block.MoEStage`): the same operations run on the same
data, only in another order.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch

from dualpipe_ext import _C
from dualpipe_ext.runtime.timeline import span
from dualpipe_ext.utils import run_backward

from .block import LayerState, MoEStage, _Chain
from .plan import component_plan

__all__ = ["OverlappedMoEStage", "overlapped_forward_backward"]

_F, _B, _W = _C.Pass.F, _C.Pass.B, _C.Pass.W
_COMPUTE, _ISSUE, _WAIT = _C.StepKind.COMPUTE, _C.StepKind.ISSUE, _C.StepKind.WAIT
_ATTN, _MLP, _DISPATCH, _COMBINE = _C.Component.ATTN, _C.Component.MLP, _C.Component.DISPATCH, _C.Component.COMBINE


def _capture_output_grad(loss1: Optional[torch.Tensor], outputs1: Sequence[torch.Tensor],
                         grads1: Sequence[torch.Tensor]) -> Tuple[MoEStage, List[LayerState], torch.Tensor]:
    """Backpropagate the loss (or the output gradients) down to the stage output only."""
    captured: list = []
    _Chain.capture = captured
    try:
        if loss1 is not None:
            loss1.backward()
        elif outputs1:
            run_backward(list(outputs1), list(grads1))
    finally:
        _Chain.capture = None
    if len(captured) != 1:
        raise RuntimeError(f"overlapped_forward_backward: expected the backward chunk to reach one MoE stage output, "
                           f"reached {len(captured)}")
    return captured[0]


def _steps(stage0: MoEStage, states0: List[LayerState], stage1: MoEStage, states1: List[LayerState],
           grad_out: torch.Tensor) -> dict:
    """(kind, component, pass) -> callable(layer) for every step of the plan."""
    b0, b1 = stage0.blocks, stage1.blocks

    def attn_f(l):
        b0[l].attn_forward(states0[l], stage0.layer_inputs(states0, l))

    def combine_b_issue(l):
        b1[l].combine_backward_issue(states1[l], stage1.upper_grads(states1, l, grad_out)[1])

    def attn_b(l):
        b1[l].attn_backward(states1[l], stage1.upper_grads(states1, l, grad_out)[0], True)
        if l + 1 < len(b1):
            states1[l + 1].ins = None

    return {
        (_COMPUTE, _ATTN, _F): attn_f,
        (_ISSUE, _DISPATCH, _F): lambda l: b0[l].dispatch_issue(states0[l]),
        (_WAIT, _DISPATCH, _F): lambda l: b0[l].dispatch_wait(states0[l]),
        (_COMPUTE, _MLP, _F): lambda l: b0[l].mlp_forward(states0[l]),
        (_ISSUE, _COMBINE, _F): lambda l: b0[l].combine_issue(states0[l]),
        (_WAIT, _COMBINE, _F): lambda l: b0[l].combine_wait(states0[l]),
        (_ISSUE, _COMBINE, _B): combine_b_issue,
        (_WAIT, _COMBINE, _B): lambda l: b1[l].combine_backward_wait(states1[l]),
        (_COMPUTE, _MLP, _B): lambda l: b1[l].mlp_backward(states1[l], True),
        (_ISSUE, _DISPATCH, _B): lambda l: b1[l].dispatch_backward_issue(states1[l]),
        (_WAIT, _DISPATCH, _B): lambda l: b1[l].dispatch_backward_wait(states1[l]),
        (_COMPUTE, _MLP, _W): lambda l: b1[l].run_weight(states1[l].w_mlp),
        (_COMPUTE, _ATTN, _B): attn_b,
        (_COMPUTE, _ATTN, _W): lambda l: b1[l].run_weight(states1[l].w_attn),
    }


def overlapped_forward_backward(module0: MoEStage, inputs0: Sequence[torch.Tensor], criterion0: Optional[Callable],
                                labels0: Sequence[torch.Tensor], module1: MoEStage, loss1: Optional[torch.Tensor],
                                outputs1: Sequence[torch.Tensor], output_grads1: Sequence[torch.Tensor]
                                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Forward ``module0`` on ``inputs0`` while backpropagating ``module1`` (from ``loss1``, or
    from ``outputs1`` with ``output_grads1``). Returns ``(outputs0, loss0)``; ``loss0`` is
    ``criterion0(outputs0, *labels0)`` when a criterion is given, else None. Gradients of
    ``module1``'s parameters and of its stage input land in ``.grad``.
    """
    if len(inputs0) != 1:
        raise ValueError(f"MoE stages take one input tensor, got {len(inputs0)}")
    if len(module0.blocks) != len(module1.blocks):  # no plan pairs different depths: run them one after the other
        out0 = module0(*inputs0)
        if loss1 is not None:
            loss1.backward()
        else:
            run_backward(list(outputs1), list(output_grads1))
        return out0, (criterion0(out0, *labels0) if criterion0 is not None else None)

    with span("capture output grad"):
        stage1, states1, grad_out = _capture_output_grad(loss1, outputs1, output_grads1)
    if stage1 is not module1:
        raise RuntimeError("overlapped_forward_backward: the backward chunk's outputs do not come from module1")
    states0 = module0.begin(inputs0[0])
    run = _steps(module0, states0, module1, states1, grad_out)
    for step in component_plan(len(module0.blocks)):
        with span(str(step)):
            run[(step.kind, step.component, step.pass_)](step.layer)

    x1 = states1[-1].input
    grad_x1 = states1[0].ins[0].grad
    states1[0].ins = None
    if x1.requires_grad and grad_x1 is not None:
        run_backward([x1], [grad_x1])
    out0 = module0.finish(states0)
    loss0 = criterion0(out0, *labels0) if criterion0 is not None else None
    return out0, loss0


class OverlappedMoEStage(MoEStage):
    """:class:`MoEStage` whose forward+backward pairs the runtime runs through the overlap engine."""

    @classmethod
    def overlapped_forward_backward(cls, module0, inputs0, criterion0, labels0, module1, loss1, outputs1,
                                    output_grads1):
        return overlapped_forward_backward(module0, inputs0, criterion0, labels0, module1, loss1, outputs1,
                                           output_grads1)
