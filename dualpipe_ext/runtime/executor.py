"""One executor for every plan: walks a rank's compiled ops and runs them.

The plan (from the C++ core, compiled by :mod:`~dualpipe_ext.runtime.compiled`) says, per
rank, which forward, backward, weight and paired forward+backward chunks to run and when to
queue sends and receives; :mod:`~dualpipe_ext.runtime.transport` posts and completes them.
A step's state lives in one :class:`StepState`: per local module and micro-batch, the stage
inputs, outputs, output gradients, input gradients and losses. Consecutive stages on one
rank (the bottom of DualPipeV's V) hand their tensors over directly, as the stage table says.

Failures inside a step do not leave peers waiting: the failing rank records the error and
keeps walking its plan in "drain" mode, skipping compute and sending zeros of the declared
shapes, so every send and receive still matches; the pipeline then reports the error on
every rank (see :mod:`dualpipe_ext.runtime.agreement`); the error also goes to the fault
board (:mod:`dualpipe_ext.faults`), so that ranks outside this pipeline (expert-parallel
peers) can name it. Only a peer that stops communicating altogether makes a wait fail
(:class:`~dualpipe_ext.runtime.transport.CommFailure`): a timeout naming this rank, the action
and the operations still missing, or a broken connection naming the rank that is gone.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from dualpipe_ext import faults
from dualpipe_ext.comm import P2PSpec
from dualpipe_ext.runtime.compiled import CompiledPlan, Kind, Op
from dualpipe_ext.runtime.timeline import Recorder, _now
from dualpipe_ext.runtime.transport import CommFailure, LinkConfig, StepComm
from dualpipe_ext.utils import WeightGradStore, run_backward

__all__ = ["Executor", "StepFailure", "StepResult", "StepState"]

_WAIT, _RECV_F = Kind.WAIT, Kind.RECV_FORWARD
_F, _FB = Kind.FORWARD, Kind.FORWARD_BACKWARD
Micro = List[List[Any]]  # [local module][micro-batch]


class StepFailure(Exception):
    """An error inside a step on this rank, with where it happened."""


class StepResult(NamedTuple):
    error: Optional[str]  # what failed on this rank, or None
    losses: Micro  # [module][mb]: the loss of each micro-batch of a last stage
    outputs: Micro  # [module][mb]: stage outputs (a last stage's only with return_outputs)


class StepState:
    """Everything one step keeps on one rank, and what the step was asked for."""

    __slots__ = ("plan", "comm", "inputs", "outputs", "out_grads", "in_grads", "losses", "labels", "criterion",
                 "return_outputs", "forward_only", "held")

    def __init__(self, plan: CompiledPlan, comm: StepComm, feeds: Dict[int, Sequence[Sequence[torch.Tensor]]],
                 labels: Dict[int, Sequence[Sequence[torch.Tensor]]], criterion: Optional[Callable],
                 return_outputs: bool, forward_only: bool) -> None:
        n, mbs = plan.num_modules, plan.mbs_per_module
        self.plan = plan
        self.comm = comm
        self.inputs: Micro = [list(feeds[m]) if m in feeds else [None] * mbs for m in range(n)]
        self.outputs: Micro = [[None] * mbs for _ in range(n)]
        self.out_grads: Micro = [[None] * mbs for _ in range(n)]
        self.in_grads: Micro = [[None] * mbs for _ in range(n)]
        self.losses: Micro = [[None] * mbs for _ in range(n)]
        self.labels = labels  # local module -> labels per micro-batch (last stages only)
        self.criterion = criterion
        self.return_outputs = return_outputs
        self.forward_only = forward_only
        self.held = 0  # micro-batch graphs held: stored by a forward, released by its backward


class Executor:
    """Runs compiled plans over the local modules of one rank."""

    def __init__(self, modules: Sequence[nn.Module], link: LinkConfig, recorder: Recorder) -> None:
        self.modules = list(modules)
        self.link = link
        self.recorder = recorder
        t = type(self.modules[0])
        # Stages of one class that define overlapped_forward_backward run overlapped pairs (FB) themselves.
        self.overlapped = (len(self.modules) == 2 and type(self.modules[1]) is t
                           and hasattr(t, "overlapped_forward_backward"))
        self.num_overlapped_calls = 0
        # The most micro-batch activations (graphs of one micro-batch through one stage) the last
        # training step held at once, counted from what it holds: the simulator's peak_activations.
        self.peak_activations = 0

    def run(self, plan: CompiledPlan, p2p: P2PSpec, feeds: Dict[int, Sequence[Sequence[torch.Tensor]]],
            labels: Dict[int, Sequence[Sequence[torch.Tensor]]], criterion: Optional[Callable],
            return_outputs: bool, forward_only: bool) -> StepResult:
        """Run one step. ``feeds[m]``: the micro-batch inputs of local module ``m`` when it is a
        first stage; ``labels[m]``: the labels of module ``m`` when it is a last stage."""
        st = StepState(plan, StepComm(self.link, plan, p2p, forward_only), feeds, labels, criterion,
                       return_outputs, forward_only)
        rec = self.recorder if self.recorder.enabled else None
        WeightGradStore.clear()
        try:
            with rec.step(plan.schedule, plan.ranks, plan.chunks) if rec is not None else nullcontext():
                error = self._walk(st, rec)
        finally:
            WeightGradStore.clear()
        return StepResult(error, st.losses, st.outputs)

    def _walk(self, st: StepState, rec: Optional[Recorder]) -> Optional[str]:
        comm, compute, comm_ops = st.comm, _COMPUTE, _COMM
        profiling = torch._C._autograd._profiler_enabled()
        error: Optional[str] = None
        peak = 0
        try:
            comm.start()
            for index, op in enumerate(st.plan.ops):
                kind = op.kind
                if kind == _WAIT:
                    if rec is not None:
                        start = _now()
                    comm.wait(index, op.token)
                    if rec is not None:
                        rec.add("wait", "comm", start, _now(), index)
                elif kind >= _RECV_F:
                    if error is None:
                        try:
                            comm_ops[kind - _RECV_F](self, st, index, op)
                        except CommFailure:
                            raise
                        except StepFailure as e:
                            error = self._failure(st, index, op, f"{e}")
                        except Exception as e:  # noqa: BLE001 - reported on every rank
                            error = self._failure(st, index, op, f"{type(e).__name__}: {e}", e)
                    if error is not None:
                        comm.drain(index, op)
                elif error is None:
                    if kind <= _FB and not st.forward_only:  # a forward adds the graph it builds
                        peak = max(peak, st.held + (kind == _F or kind == _FB))
                    try:
                        if rec is not None:
                            start = _now()
                        if profiling:
                            with torch.profiler.record_function(op.token):
                                compute[kind](self, st, op)
                        else:
                            compute[kind](self, st, op)
                        if rec is not None:
                            rec.add(op.token, "compute", start, _now(), index)
                    except Exception as e:  # noqa: BLE001 - any failure is reported on every rank
                        error = self._failure(st, index, op, f"{type(e).__name__}: {e}", e)
            comm.finish()
            if not st.forward_only:
                self.peak_activations = peak
        except CommFailure as e:
            if error is not None:  # this rank had failed first; say both
                raise CommFailure(f"pipeline rank {self.link.rank}: {error}; then {e}") from None
            raise
        return error

    def _failure(self, st: StepState, index: int, op: Op, text: str, exc: Optional[BaseException] = None) -> str:
        """The error of this rank's action ``index``: put on the fault board, with who failed first
        when the exception is about a lost peer (an expert-parallel exchange inside the stage)."""
        where = f"action {index} '{op.token}'"
        if exc is not None and faults.looks_lost(exc) and not isinstance(exc, faults.PeerLostError):
            note = faults.describe_failure(exc, st.comm.started, self.link.name)
            if note:
                text += f" [{note}]"
        faults.report(-1, faults.RAISED, where, text)
        return f"{where}: {text}"

    # Compute ----------------------------------------------------------------------------

    def _forward(self, st: StepState, op: Op) -> None:
        self._forward_compute(st, op.module, op.mb)

    def _forward_compute(self, st: StepState, m: int, mb: int) -> None:
        inputs = st.inputs[m][mb]
        if st.forward_only:
            st.inputs[m][mb] = None
        outputs = self.modules[m](*inputs)
        outputs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
        self._post_forward(st, m, mb, outputs, None)

    def _post_forward(self, st: StepState, m: int, mb: int, outputs: List[torch.Tensor],
                      loss: Optional[torch.Tensor]) -> None:
        plan = st.plan
        last = plan.is_last[m]
        if last and st.criterion is not None:
            if loss is None:
                loss = st.criterion(*outputs, *st.labels[m][mb])
            st.losses[m][mb] = loss
        nxt = plan.local_next[m]
        if nxt >= 0:
            st.inputs[nxt][mb] = [o.detach().requires_grad_() for o in outputs]
        if not last or st.return_outputs:
            st.outputs[m][mb] = outputs
        st.held += not st.forward_only

    def _backward(self, st: StepState, op: Op) -> None:
        self._backward_compute(st, op.module, op.mb)
        self._post_backward(st, op.module, op.mb)

    def _backward_input(self, st: StepState, op: Op) -> None:
        with WeightGradStore.collect() as weight_work:
            self._backward_compute(st, op.module, op.mb)
        WeightGradStore.funcs_queue.append(weight_work)  # one batch per input-only backward, for a W
        self._post_backward(st, op.module, op.mb)

    def _backward_compute(self, st: StepState, m: int, mb: int) -> None:
        if st.plan.is_last[m]:
            loss = st.losses[m][mb]
            loss.backward()
            loss.detach_()
        else:
            outputs, grads = self._take_output_grads(st, m, mb)
            if outputs:
                run_backward(outputs, grads)

    def _take_output_grads(self, st: StepState, m: int, mb: int) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        outputs = st.outputs[m][mb]
        if not st.return_outputs:
            st.outputs[m][mb] = None
        grads = st.out_grads[m][mb]
        st.out_grads[m][mb] = None
        pairs = [(t, g) for t, g in zip(outputs, grads) if g is not None]
        return [t for t, _ in pairs], [g for _, g in pairs]

    def _post_backward(self, st: StepState, m: int, mb: int) -> None:
        plan = st.plan
        inputs = st.inputs[m][mb]
        st.inputs[m][mb] = None
        st.held -= 1
        prev = plan.local_prev[m]
        if prev >= 0:
            st.out_grads[prev][mb] = [t.grad for t in inputs]
        elif plan.remote_prev[m]:
            st.in_grads[m][mb] = [t.grad for t in inputs]

    def _weight(self, st: StepState, op: Op) -> None:
        WeightGradStore.pop()

    def _forward_backward(self, st: StepState, op: Op) -> None:
        m0, mb0, m1, mb1 = op.module, op.mb, op.module2, op.mb2
        if not self.overlapped:
            self._forward_compute(st, m0, mb0)
            self._backward_compute(st, m1, mb1)
            self._post_backward(st, m1, mb1)
            return
        plan = st.plan
        module0, module1 = self.modules[m0], self.modules[m1]
        if plan.is_last[m0] and st.criterion is not None:
            criterion0, labels0 = st.criterion, st.labels[m0][mb0]
        else:
            criterion0, labels0 = None, []
        if plan.is_last[m1]:
            loss1, outputs1, grads1 = st.losses[m1][mb1], [], []
        else:
            loss1 = None
            outputs1, grads1 = self._take_output_grads(st, m1, mb1)
        self.num_overlapped_calls += 1
        outputs0, loss0 = type(module0).overlapped_forward_backward(
            module0, st.inputs[m0][mb0], criterion0, labels0, module1, loss1, outputs1, grads1)
        outputs0 = [outputs0] if isinstance(outputs0, torch.Tensor) else list(outputs0)
        if plan.is_last[m0] and st.criterion is not None and loss0 is None:
            raise RuntimeError(f"{type(module0).__name__}.overlapped_forward_backward returned no loss for a last "
                               f"stage given a criterion")
        self._post_forward(st, m0, mb0, outputs0, loss0)
        self._post_backward(st, m1, mb1)

    # Communication ----------------------------------------------------------------------

    def _recv_forward(self, st: StepState, index: int, op: Op) -> None:
        st.inputs[op.module][op.mb] = st.comm.receive(index, op)

    def _recv_backward(self, st: StepState, index: int, op: Op) -> None:
        st.out_grads[op.module][op.mb] = st.comm.receive(index, op)

    def _send_forward(self, st: StepState, index: int, op: Op) -> None:
        outputs = st.outputs[op.module][op.mb]
        why = st.comm.p2p.mismatch(outputs, f"outputs of stage module {op.module} (micro-batch {op.mb})")
        if why is not None:
            raise StepFailure(why)
        send, free = [], []
        for t in outputs:
            if t.is_contiguous():
                send.append(t)
                if not st.return_outputs and t._base is None:
                    free.append(t)  # nothing reads its data again once sent
            else:
                send.append(t.contiguous())
        st.comm.send(index, op, send, free)

    def _send_backward(self, st: StepState, index: int, op: Op) -> None:
        grads = st.in_grads[op.module][op.mb]
        st.in_grads[op.module][op.mb] = None
        p2p = st.comm.p2p
        send = [g.contiguous() if g is not None else torch.zeros(s, dtype=p2p.dtype, device=self.link.device)
                for g, s in zip(grads, p2p.shapes)]
        why = p2p.mismatch(send, f"input gradients of stage module {op.module} (micro-batch {op.mb})")
        if why is not None:
            raise StepFailure(why)
        st.comm.send(index, op, send)


# Indexed by Kind: compute kinds, then receives and sends from Kind.RECV_FORWARD on. Plain functions
# (not bound methods kept on the executor, which would tie it into a reference cycle).
_COMPUTE = (Executor._forward, Executor._backward, Executor._backward_input, Executor._weight,
            Executor._forward_backward)
_COMM = (Executor._recv_forward, Executor._recv_backward, Executor._send_forward, Executor._send_backward)
