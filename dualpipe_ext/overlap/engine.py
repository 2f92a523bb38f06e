"""The overlap engine: runs of chunks executed step by step in the order of a component plan.

``execute`` walks a plan from the C++ core (:mod:`dualpipe_ext.overlap.plan`) over a list
of runs (:mod:`dualpipe_ext.overlap.runs`): each exchange is issued asynchronously, the
computation the plan puts after it runs while it is in flight, and it is waited for just
before its consumer. ``overlapped_forward_backward`` is what the runtime calls for a
forward+backward pair (``F{m}.{c}+B{n}.{d}``): the forward run of one chunk and the
backward run(s) of another, interleaved. Each step is recorded as a span (``attn.F0``,
``issue dispatch.F0``, ``wait dispatch.F0``, ...) in the running step's timeline.

Results equal those of running the same runs one after another (``interleave=False``):
the same operations on the same data, only in another order.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch

from dualpipe_ext import _C
from dualpipe_ext.runtime.timeline import span
from dualpipe_ext.utils import run_backward

from .plan import component_plan, sequential_plan
from .runs import BackwardRun, ForwardRun, split_halves

__all__ = ["execute", "overlapped_forward_backward"]

_W = _C.Pass.WEIGHT
_COMPUTE, _ISSUE, _WAIT = _C.StepKind.COMPUTE, _C.StepKind.ISSUE, _C.StepKind.WAIT
_C_ = _C.Component
Run = Union[ForwardRun, BackwardRun]

_ENDS = (_C_.PROLOGUE, _C_.EPILOGUE)
_SUFFIX = {_COMPUTE: "", _ISSUE: "_issue", _WAIT: "_wait"}


def _do(run: Run, step):
    """Run one step: the run's method named after the component (``attn``, ``dispatch_issue``,
    ``combine_wait``, ...); a weight pass is ``run.weight(layer, "w_<component>")``."""
    name = step.component.name.lower()
    if step.pass_ == _W:
        return run.weight(step.layer, "w_" + name)
    method = getattr(run, name + _SUFFIX[step.kind])
    return method() if step.component in _ENDS else method(step.layer)


def execute(runs: Sequence[Run], interleave: bool, config) -> None:
    """Run ``runs`` (ForwardRun/BackwardRun objects) in a planned order.

    ``interleave``: the component plan of all runs together (exchanges of one under the
    computation of another); otherwise each run after the other. ``config``: the
    ``OverlapConfig`` giving the plan's costs and in-flight bound.
    """
    specs = [r.stage.run_spec(isinstance(r, BackwardRun)) for r in runs]
    if interleave and len(runs) > 1:
        steps = component_plan(specs, config.plan_costs, config.max_in_flight)
    else:
        steps = sequential_plan(specs)
    record = span  # local name: one lookup per step
    staged: List = []  # exchanges issued since the last computation
    for step in steps:
        run = runs[step.run]
        with record(str(step)):
            result = _do(run, step)
        if step.kind == _ISSUE:
            staged.append(result)
        elif step.kind == _COMPUTE and staged:
            for pending in staged:  # a payload that waited for its counts goes out now, on every rank alike
                pending.progress()
            staged.clear()
    for run in runs:
        if isinstance(run, ForwardRun) and run.stage.epilogue is None:
            run.finish_layers()


def _output_chunks(module1, roots: Sequence[Any]) -> List[Any]:
    """The chunks of module1 whose outputs the autograd graph from ``roots`` reaches (a walk of the
    graph above module1's outputs only: it stops at them)."""
    found, seen, stack = [], set(), [r for r in roots if r is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        chunk = module1.chunk_of(node)
        if chunk is not None:
            found.append(chunk)
        else:
            stack.extend(n for n, _ in node.next_functions if n is not None)
    return found


def _capture_output_grad(module1, loss1: Optional[torch.Tensor], outputs1: Sequence[torch.Tensor],
                         grads1: Sequence[torch.Tensor]):
    """Backpropagate the loss (or the output gradients) down to module1's output only:
    ``(chunk, output gradient)``; the chunk's ``handover`` takes the gradient."""
    roots = [loss1.grad_fn] if loss1 is not None else [o.grad_fn for o in outputs1]
    chunks = _output_chunks(module1, roots)
    if len(chunks) != 1:
        raise RuntimeError(f"overlapped_forward_backward: expected the backward chunk to reach one output of module1 "
                           f"({type(module1).__name__}), reached {len(chunks)}")
    chunk = chunks[0]
    chunk.handover = []
    try:
        if loss1 is not None:
            loss1.backward()
        elif outputs1:
            run_backward(list(outputs1), list(grads1))
        captured = chunk.handover
    finally:
        chunk.handover = None
    if len(captured) != 1:
        raise RuntimeError(f"overlapped_forward_backward: expected the backward chunk to reach one output of module1 "
                           f"({type(module1).__name__}), reached {len(captured)}")
    return chunk, captured[0]


def overlapped_forward_backward(module0, inputs0: Sequence[torch.Tensor], criterion0: Optional[Callable],
                                labels0: Sequence[torch.Tensor], module1, loss1: Optional[torch.Tensor],
                                outputs1: Sequence[torch.Tensor], output_grads1: Sequence[torch.Tensor]
                                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Forward ``module0`` on ``inputs0`` while backpropagating ``module1`` (from ``loss1``, or
    from ``outputs1`` with ``output_grads1``). Returns ``(outputs0, loss0)``; ``loss0`` is
    ``criterion0(outputs0, *labels0)`` when a criterion is given, else None. Gradients of
    ``module1``'s parameters and of its stage input land in ``.grad``.
    """
    if len(inputs0) != 1:
        raise ValueError(f"component stages take one input tensor, got {len(inputs0)}")
    with span("capture output grad"):
        chunk1, grad1 = _capture_output_grad(module1, loss1, outputs1, output_grads1)
    x0 = inputs0[0]
    module0.check_input(x0)
    split = module0.splits(x0)
    fwds = [ForwardRun(module0, h, h.shape[0] / x0.shape[0]) for h in (split_halves(x0) if split else (x0,))]
    bwds = module1.backward_runs(chunk1, grad1)
    with module0.sm_partition():
        execute(fwds + bwds, interleave=True, config=module0.overlap)
    module1.finish_backward(chunk1, bwds)
    out0 = module0.finish_forward(fwds, x0, split)
    loss0 = criterion0(out0, *labels0) if criterion0 is not None else None
    return out0, loss0
