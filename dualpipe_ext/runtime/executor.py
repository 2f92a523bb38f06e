"""One executor for every plan: walks a rank's action list and runs it.

The plan (from the C++ core) says, per rank, which forward, backward, weight and paired
forward+backward chunks to run and when to queue sends and receives; ``wait`` posts the
queued batch with ``batch_isend_irecv`` and waits for all of it. The executor keeps, per
local module and micro-batch, the stage inputs, outputs, output gradients and input
gradients, and moves them between local modules directly when the stage table says
that two consecutive stages live on this rank (the bottom of DualPipeV's V).

Failures inside a step do not leave peers waiting: the failing rank records the error
and keeps walking its plan in "drain" mode, skipping compute and sending zeros of the
declared shapes, so every send and receive still matches; the pipeline then reports the
error on every rank (see :mod:`dualpipe_ext.runtime.agreement`). Only a peer that stops
communicating altogether makes a wait time out, and that error names this rank, the
action and the operations still missing.
"""
from __future__ import annotations

from datetime import timedelta
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from dualpipe_ext import _C
from dualpipe_ext import comm
from dualpipe_ext.runtime.agreement import PipelineError
from dualpipe_ext.runtime import timeline
from dualpipe_ext.runtime.timeline import Recorder, _now
from dualpipe_ext.utils import WeightGradStore, run_backward

__all__ = ["CompiledPlan", "Executor", "StepFailure"]

# Compact action codes.
F, B, BZ, W, FB, RECV_F, RECV_B, SEND_F, SEND_B, WAIT = range(10)
_CODES = {
    _C.ActionType.FORWARD: F,
    _C.ActionType.BACKWARD: B,
    _C.ActionType.BACKWARD_INPUT: BZ,
    _C.ActionType.WEIGHT: W,
    _C.ActionType.FORWARD_BACKWARD: FB,
    _C.ActionType.RECV_FORWARD: RECV_F,
    _C.ActionType.RECV_BACKWARD: RECV_B,
    _C.ActionType.SEND_FORWARD: SEND_F,
    _C.ActionType.SEND_BACKWARD: SEND_B,
    _C.ActionType.WAIT: WAIT,
}
_COMPUTE = (F, B, BZ, W, FB)


class StepFailure(Exception):
    """An error inside a step on this rank, with where it happened."""

    def __init__(self, message: str) -> None:
        super().__init__(message)


class CompiledPlan:
    """One rank's actions in compact form, plus what the stage table says about its modules."""

    def __init__(self, plan: "_C.Plan", rank: int, to_global: Sequence[int], to_group: Sequence[int]) -> None:
        self.schedule = plan.schedule
        self.ranks = plan.ranks
        self.chunks = plan.chunks
        self.num_modules = plan.num_modules
        self.mbs_per_module = plan.mbs_per_module
        stages = plan.stages[rank]
        self.is_first = [s.prev_rank < 0 for s in stages]
        self.is_last = [s.next_rank < 0 for s in stages]
        self.local_next = [s.next_module if s.next_rank == rank else -1 for s in stages]
        self.local_prev = [s.prev_module if s.prev_rank == rank else -1 for s in stages]
        self.remote_prev = [s.prev_rank >= 0 and s.prev_rank != rank for s in stages]
        self.remote_next = [s.next_rank >= 0 and s.next_rank != rank for s in stages]
        # (code, module, mb, module2, mb2, global peer, token, group peer)
        self.actions: List[Tuple[int, int, int, int, int, int, str, int]] = []
        for a in plan.actions[rank]:
            peer = to_global[a.peer] if a.peer >= 0 else -1
            gpeer = to_group[a.peer] if a.peer >= 0 else -1
            self.actions.append((_CODES[a.type], a.module, a.mb, a.module2, a.mb2, peer, str(a), gpeer))
        # Receives in plan order, each with the ordinal of the wait that completes it: lets
        # the executor post receives ahead of their wait where the backend allows it.
        self.receives: List[Tuple[int, int]] = []  # (action index, wait ordinal)
        self.wait_ordinal: List[int] = []  # per action: ordinal of the next wait at or after it
        ordinal = 0
        for i, a in enumerate(self.actions):
            self.wait_ordinal.append(ordinal)
            if a[0] == RECV_F or a[0] == RECV_B:
                self.receives.append((i, ordinal))
            if a[0] == WAIT:
                ordinal += 1
        self.num_waits = ordinal


class Executor:
    """Runs compiled plans over a list of local modules on one rank.

    Communication follows the plan's batches. With ``eager_comm`` (gloo, where every
    send and receive is an independent operation) two things happen earlier than the
    plan says, without changing what is sent or computed: receives are posted up to
    ``recv_lookahead`` waits ahead (so a sender finds its receiver ready), and a ``wait``
    blocks only on its receives, while sends complete in the background and are checked
    at later waits and at the end of the step. On NCCL the batches are posted with
    ``batch_isend_irecv`` exactly as planned.
    """

    def __init__(self, modules: Sequence[torch.nn.Module], group: dist.ProcessGroup, rank: int,
                 device: torch.device, comm_timeout_s: float, recorder: Recorder, eager_comm: bool,
                 recv_lookahead: int) -> None:
        self.modules = list(modules)
        self.group = group
        self.rank = rank
        self.device = device
        self.timeout = timedelta(seconds=comm_timeout_s)
        self.timeout_s = comm_timeout_s
        self.wait_with_timeout = device.type == "cpu"
        self.eager_comm = eager_comm
        self.recv_lookahead = recv_lookahead
        self.recorder = recorder
        t = type(self.modules[0])
        self.overlapped = (len(self.modules) == 2 and type(self.modules[1]) is t
                           and hasattr(t, "overlapped_forward_backward"))
        self.num_overlapped_calls = 0

    # The step ---------------------------------------------------------------------------

    def run(self, cp: CompiledPlan, feeds: Dict[int, List[Sequence[torch.Tensor]]],
            labels: Dict[int, List[Sequence[torch.Tensor]]], criterion: Optional[Callable],
            return_outputs: bool, forward_only: bool) -> Tuple[Optional[str], List[List[Any]], List[List[Any]]]:
        """Run one step. Returns (error message or None, losses[module][mb], outputs[module][mb]).

        ``feeds[m]`` holds the micro-batch inputs of local module ``m`` when it is a first
        stage; ``labels[m]`` the labels of module ``m`` when it is a last stage.
        """
        n, mbs = cp.num_modules, cp.mbs_per_module
        self.cp = cp
        self.inputs = [list(feeds[m]) if m in feeds else [None] * mbs for m in range(n)]
        self.outputs = [[None] * mbs for _ in range(n)]
        self.out_grads = [[None] * mbs for _ in range(n)]
        self.in_grads = [[None] * mbs for _ in range(n)]
        self.losses = [[None] * mbs for _ in range(n)]
        self.labels = labels
        self.criterion = criterion
        self.return_outputs = return_outputs
        self.forward_only = forward_only
        self.pending: List[Tuple[bool, List[torch.Tensor], int, str]] = []  # queued until the next wait
        self.to_free: List[torch.Tensor] = []
        self.posted: Dict[int, Tuple[List[torch.Tensor], List[Any]]] = {}  # receive index -> (buffers, works)
        self.next_receive = 0  # position in cp.receives of the next receive to post
        self.batch_works: List[Tuple[Any, str]] = []  # receives the next wait completes
        self.sends: List[Tuple[List[Any], str, List[torch.Tensor]]] = []  # posted sends in flight
        WeightGradStore.clear()

        rec = self.recorder if self.recorder.enabled else None
        profiling = torch._C._autograd._profiler_enabled()
        error: Optional[str] = None
        compute = (self._forward, self._backward, self._backward_input, self._weight, self._forward_backward)
        comm_ops = (self._recv_forward, self._recv_backward, self._send_forward, self._send_backward)
        if rec is not None:
            rec.begin_step(cp.schedule, cp.ranks, cp.chunks)
            timeline._current = rec
        try:
            if self.eager_comm:
                self._post_receives(self.recv_lookahead)  # the receives of the first waits
            for index, a in enumerate(cp.actions):
                code = a[0]
                if code == WAIT:
                    if rec is not None:
                        start = _now()
                    self._wait(index, a[6])
                    if rec is not None:
                        rec.add("wait", "comm", start, _now(), index)
                elif code >= RECV_F:
                    if error is None:
                        try:
                            comm_ops[code - RECV_F](index, a)
                        except StepFailure as e:
                            error = f"action {index} '{a[6]}': {e}"
                    if error is not None:
                        self._drain_comm(index, code, a)
                elif error is None:
                    try:
                        if rec is not None:
                            start = _now()
                        if profiling:
                            with torch.profiler.record_function(a[6]):
                                compute[code](a)
                        else:
                            compute[code](a)
                        if rec is not None:
                            rec.add(a[6], "compute", start, _now(), index)
                    except Exception as e:  # noqa: BLE001 - any failure is reported on every rank
                        error = f"action {index} '{a[6]}': {type(e).__name__}: {e}"
                        WeightGradStore.enabled = False
            self._wait(len(cp.actions), "end of step")
            self._finish_sends(len(cp.actions), "end of step")
        finally:
            WeightGradStore.enabled = False
            if rec is not None:
                rec.end_step()
                timeline._current = None
        losses, outputs = self.losses, self.outputs
        self._release()
        return error, losses, outputs

    def _release(self) -> None:
        self.inputs = self.outputs = self.out_grads = self.in_grads = self.losses = None
        self.labels = self.criterion = None
        self.pending, self.to_free, self.posted, self.batch_works, self.sends = [], [], {}, [], []
        WeightGradStore.clear()

    # Compute ----------------------------------------------------------------------------

    def _forward(self, a) -> None:
        self._forward_compute(a[1], a[2])

    def _forward_compute(self, m: int, mb: int) -> None:
        cp = self.cp
        inputs = self.inputs[m][mb]
        if self.forward_only:
            self.inputs[m][mb] = None
        outputs = self.modules[m](*inputs)
        outputs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
        self._post_forward(m, mb, outputs, None)

    def _post_forward(self, m: int, mb: int, outputs: List[torch.Tensor], loss: Optional[torch.Tensor]) -> None:
        cp = self.cp
        last = cp.is_last[m]
        if last and self.criterion is not None:
            if loss is None:
                loss = self.criterion(*outputs, *self.labels[m][mb])
            self.losses[m][mb] = loss
        nxt = cp.local_next[m]
        if nxt >= 0:
            self.inputs[nxt][mb] = [o.detach().requires_grad_() for o in outputs]
        if not last or self.return_outputs:
            self.outputs[m][mb] = outputs

    def _backward(self, a) -> None:
        self._backward_compute(a[1], a[2], False)

    def _backward_input(self, a) -> None:
        self._backward_compute(a[1], a[2], True)

    def _backward_compute(self, m: int, mb: int, input_only: bool) -> None:
        WeightGradStore.enabled = input_only
        try:
            if self.cp.is_last[m]:
                loss = self.losses[m][mb]
                loss.backward()
                loss.detach_()
            else:
                outputs, grads = self._take_output_grads(m, mb)
                if outputs:
                    run_backward(outputs, grads)
        finally:
            WeightGradStore.enabled = False
        if input_only:
            WeightGradStore.flush()
        self._post_backward(m, mb)

    def _take_output_grads(self, m: int, mb: int) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        outputs = self.outputs[m][mb]
        if not self.return_outputs:
            self.outputs[m][mb] = None
        grads = self.out_grads[m][mb]
        self.out_grads[m][mb] = None
        pairs = [(t, g) for t, g in zip(outputs, grads) if g is not None]
        return [t for t, _ in pairs], [g for _, g in pairs]

    def _post_backward(self, m: int, mb: int) -> None:
        cp = self.cp
        inputs = self.inputs[m][mb]
        self.inputs[m][mb] = None
        prev = cp.local_prev[m]
        if prev >= 0:
            self.out_grads[prev][mb] = [t.grad for t in inputs]
        elif cp.remote_prev[m]:
            self.in_grads[m][mb] = [t.grad for t in inputs]

    def _weight(self, a) -> None:
        WeightGradStore.pop()

    def _forward_backward(self, a) -> None:
        m0, mb0, m1, mb1 = a[1], a[2], a[3], a[4]
        if not self.overlapped:
            self._forward_compute(m0, mb0)
            self._backward_compute(m1, mb1, False)
            return
        cp = self.cp
        module0, module1 = self.modules[m0], self.modules[m1]
        inputs0 = self.inputs[m0][mb0]
        if cp.is_last[m0] and self.criterion is not None:
            criterion0, labels0 = self.criterion, self.labels[m0][mb0]
        else:
            criterion0, labels0 = None, []
        if cp.is_last[m1]:
            loss1, outputs1, grads1 = self.losses[m1][mb1], [], []
        else:
            loss1 = None
            outputs1, grads1 = self._take_output_grads(m1, mb1)
        self.num_overlapped_calls += 1
        outputs0, loss0 = type(module0).overlapped_forward_backward(
            module0, inputs0, criterion0, labels0, module1, loss1, outputs1, grads1)
        outputs0 = [outputs0] if isinstance(outputs0, torch.Tensor) else list(outputs0)
        if cp.is_last[m0] and self.criterion is not None and loss0 is None:
            raise RuntimeError(f"{type(module0).__name__}.overlapped_forward_backward returned no loss for a last "
                               f"stage given a criterion")
        self._post_forward(m0, mb0, outputs0, loss0)
        self._post_backward(m1, mb1)

    # Communication ----------------------------------------------------------------------

    def _receive_buffers(self, index: int, a) -> List[torch.Tensor]:
        """Buffers of the receive at action ``index``: already posted, or queued now."""
        if self.eager_comm:
            if index not in self.posted:  # beyond the look-ahead: post it now
                self._post_receives_through(index)
            bufs, works = self.posted.pop(index)
            self.batch_works.extend((w, a[6]) for w in works)
            return bufs
        bufs = comm.empty_buffers(self.device, a[0] == RECV_F and not self.forward_only)
        self.pending.append((False, bufs, a[5], a[6]))
        return bufs

    def _post_receives(self, limit: int) -> None:
        """Post the receives that the waits up to ordinal ``limit`` complete."""
        receives = self.cp.receives
        i = self.next_receive
        while i < len(receives) and receives[i][1] <= limit:
            self._post_receive(receives[i][0])
            i += 1
        self.next_receive = i

    def _post_receives_through(self, index: int) -> None:
        receives = self.cp.receives
        while self.next_receive < len(receives) and receives[self.next_receive][0] <= index:
            self._post_receive(receives[self.next_receive][0])
            self.next_receive += 1

    def _post_receive(self, index: int) -> None:
        a = self.cp.actions[index]
        bufs = comm.empty_buffers(self.device, a[0] == RECV_F and not self.forward_only)
        recv, peer = self.group.recv, a[7]
        self.posted[index] = (bufs, [recv([b], peer, 0) for b in bufs])

    def _recv_forward(self, index: int, a) -> None:
        self.inputs[a[1]][a[2]] = self._receive_buffers(index, a)

    def _recv_backward(self, index: int, a) -> None:
        self.out_grads[a[1]][a[2]] = self._receive_buffers(index, a)

    def _send_forward(self, index: int, a) -> None:
        outputs = self.outputs[a[1]][a[2]]
        why = comm.mismatch(outputs, f"outputs of stage module {a[1]} (micro-batch {a[2]})")
        if why is not None:
            raise StepFailure(why)
        send, free = [], []
        for t in outputs:
            if t.is_contiguous():
                send.append(t)
                if not self.return_outputs and t._base is None:
                    free.append(t)
            else:
                send.append(t.contiguous())
        self.pending.append((True, send, a[5], a[6], a[7], free))

    def _send_backward(self, index: int, a) -> None:
        grads = self.in_grads[a[1]][a[2]]
        self.in_grads[a[1]][a[2]] = None
        shapes = comm.TENSOR_SHAPES
        send = [g.contiguous() if g is not None else torch.zeros(s, dtype=comm.TENSOR_DTYPE, device=self.device)
                for g, s in zip(grads, shapes)]
        why = comm.mismatch(send, f"input gradients of stage module {a[1]} (micro-batch {a[2]})")
        if why is not None:
            raise StepFailure(why)
        self.pending.append((True, send, a[5], a[6], a[7], ()))

    def _drain_comm(self, index: int, code: int, a) -> None:
        """After an error: keep every send and receive matched, with placeholder data."""
        if code == RECV_F or code == RECV_B:
            self._receive_buffers(index, a)
        else:
            self.pending.append((True, comm.zero_buffers(self.device), a[5], a[6], a[7], ()))

    def _wait(self, index: int, token: str) -> None:
        if self.eager_comm:
            self._wait_eager(index, token)
            return
        pending = self.pending
        if not pending:
            return
        self.pending = []
        ops, descs, free = [], [], []
        group = self.group
        for entry in pending:
            is_send, tensors, peer, desc = entry[:4]
            op = dist.isend if is_send else dist.irecv
            for t in tensors:
                ops.append(dist.P2POp(op, t, peer, group))
                descs.append(desc)
            if is_send:
                free.extend(entry[5])
        works = dist.batch_isend_irecv(ops)
        self._wait_all(works, descs, index, token)
        for t in free:
            t.data = torch.empty(0, dtype=t.dtype, device=t.device)

    def _wait_eager(self, index: int, token: str) -> None:
        send = self.group.send
        for _, tensors, _, desc, gpeer, free in self.pending:
            self.sends.append(([send([t], gpeer, 0) for t in tensors], desc, free))
        self.pending = []
        if self.recv_lookahead > 0 and index < len(self.cp.actions):
            self._post_receives(self.cp.wait_ordinal[index] + self.recv_lookahead)
        works = self.batch_works
        if works:
            self.batch_works = []
            self._wait_all([w for w, _ in works], [d for _, d in works], index, token)
        # Free what completed sends no longer need; keep the rest in flight.
        sends = self.sends
        while sends and all(w.is_completed() for w in sends[0][0]):
            self._sent(sends.pop(0), index, token)

    def _sent(self, entry, index: int, token: str) -> None:
        works, desc, free = entry
        self._wait_all(works, [desc] * len(works), index, token)  # completed: surfaces backend errors
        for t in free:
            t.data = torch.empty(0, dtype=t.dtype, device=t.device)

    def _finish_sends(self, index: int, token: str) -> None:
        sends, self.sends = self.sends, []
        for entry in sends:
            self._sent(entry, index, token)

    def _wait_all(self, works, descs, index: int, token: str) -> None:
        if not self.wait_with_timeout:
            for w in works:
                w.wait()
            return
        timeout = self.timeout
        for i, w in enumerate(works):
            try:
                ok = w.wait(timeout)
            except RuntimeError as e:
                self._timed_out(index, token, works[i:], descs[i:], e)
            if ok is False:
                self._timed_out(index, token, works[i:], descs[i:], None)

    def _timed_out(self, index: int, token: str, works, descs, cause) -> None:
        # works[0] is the one that timed out; later ones may or may not have completed.
        missing = [descs[0]] + sorted({d for w, d in zip(works[1:], descs[1:]) if not w.is_completed()} - {descs[0]})
        where = f"action {index} '{token}'" if index < len(self.cp.actions) else "the end of the step"
        raise PipelineError(
            f"pipeline rank {self.rank}: {where} waited {self.timeout_s:g} s for its sends and receives; "
            f"still missing: {', '.join(missing)} (the peer did not post the matching operation: "
            f"it failed, stopped, or runs a different plan)" + (f"; backend: {cause}" if cause else ""))
