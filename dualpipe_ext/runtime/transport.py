"""The sends and receives of one pipeline step on one rank.

The plan queues sends and receives and posts each batch at its next ``wait``. On NCCL (and
on gloo with ``eager_comm`` off) a batch goes to ``batch_isend_irecv`` exactly as planned.
With ``eager_comm`` on gloo, where every send and receive is an independent operation, two
things happen earlier without changing what is sent or computed: receives are posted up to
``lookahead`` waits ahead (from the first wait on, after its sends), so that a sender finds
its receiver ready, and a ``wait`` blocks only on its receives, while sends complete in the
background and are checked at later waits and at the end of the step. Messages of one pair that the sender posts at one wait and
the receiver completes at one wait (a forward output and an input gradient, in DualPipe's
steady state) travel as one: one flat buffer, one send, one receive, each tensor a view
(``CompiledPlan.send_bundle`` and ``recv_bundles``, the same on both ranks).

Failures raise :class:`CommFailure` with the true cause and time: a wait that does not
complete within the timeout names this rank, the action, the operations still missing and
their peers; a connection that breaks (the peer's process exited, or the peer stopped after
losing another rank) names the peer and, from the fault board (:mod:`dualpipe_ext.faults`),
the rank that is really gone. Either is reported to the board before it is raised, so that
ranks further away can name the right one too.
"""
from __future__ import annotations

import time
from datetime import timedelta
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist

from dualpipe_ext import faults
from dualpipe_ext.comm import P2PSpec
from dualpipe_ext.runtime.agreement import PipelineError
from dualpipe_ext.runtime.compiled import CompiledPlan, Kind, Op

__all__ = ["CommFailure", "LinkConfig", "StepComm"]


class CommFailure(PipelineError):
    """A send, receive or wait of the step failed (a peer is gone or silent); the step cannot go on.

    Internal: the pipeline raises it to the caller as a plain :class:`PipelineError`."""


class LinkConfig(NamedTuple):
    """How a pipeline's ranks talk: fixed for the pipeline's life."""

    group: dist.ProcessGroup
    rank: int  # pipeline rank, for messages
    device: torch.device
    timeout_s: float  # per wait
    eager: bool  # post receives ahead, complete sends in the background (gloo only)
    lookahead: int  # with eager: waits ahead that receives are posted
    name: Callable[[int], str] = lambda g: f"rank {g}"  # words a global rank: "pipeline rank 1"


class Transfer(NamedTuple):
    """A send or receive queued by the plan until its next wait."""

    op: Op
    tensors: List[torch.Tensor]
    free: Sequence[torch.Tensor] = ()  # sent outputs whose storage can go once the send completed
    index: int = -1  # position of the op in the plan


class InFlight(NamedTuple):
    """Posted operations and the action they belong to."""

    works: List[Any]
    desc: str  # the action's token, for timeout messages
    free: Sequence[torch.Tensor] = ()
    peer: int = -1  # global rank on the other side


class PostedReceive(NamedTuple):
    buffers: List[torch.Tensor]
    works: List[Any]


class StepComm:
    """Queues, posts and completes one step's communication on one rank."""

    def __init__(self, link: LinkConfig, plan: CompiledPlan, p2p: P2PSpec, forward_only: bool) -> None:
        self.link = link
        self.plan = plan
        self.p2p = p2p
        self.forward_only = forward_only
        self.timeout = timedelta(seconds=link.timeout_s)
        self.wait_with_timeout = link.device.type == "cpu"
        self.pending: List[Transfer] = []  # queued until the next wait
        self.posted: Dict[int, PostedReceive] = {}  # eager: op index -> receive posted ahead
        self.next_receive = 0  # eager: position in plan.recv_bundles of the next bundle to post
        self.receiving: List[InFlight] = []  # eager: receives the next wait completes
        self.sending: List[InFlight] = []  # eager: posted sends in flight
        self.started = faults.window()  # the step's start (the pipeline began it): older reports are from earlier steps

    def start(self) -> None:
        """Post the receives that the first wait completes (eager only). The look-ahead's receives are
        posted at that wait, after its sends: posting receives costs a gloo message each, and a rank
        that posted them all first would hold back the message that starts its peer."""
        if self.link.eager:
            self._post_receives(0)

    # Queueing -----------------------------------------------------------------------------

    def receive(self, index: int, op: Op) -> List[torch.Tensor]:
        """Buffers that the receive ``op`` (at ``index``) fills by the next wait."""
        if self.link.eager:
            if index not in self.posted:  # beyond the look-ahead: post it now
                self._post_receives_through(index)
            posted = self.posted.pop(index)
            self.receiving.append(InFlight(posted.works, op.token, (), op.peer))
            return posted.buffers
        bufs = self.p2p.empty(self.link.device, op.kind == Kind.RECV_FORWARD and not self.forward_only)
        self.pending.append(Transfer(op, bufs, (), index))
        return bufs

    def send(self, index: int, op: Op, tensors: List[torch.Tensor], free: Sequence[torch.Tensor] = ()) -> None:
        """Queue the send ``op`` (at ``index``) of ``tensors`` until the next wait."""
        self.pending.append(Transfer(op, tensors, free, index))

    def drain(self, index: int, op: Op) -> None:
        """After an error: keep this send or receive matched, with placeholder data."""
        if op.kind == Kind.RECV_FORWARD or op.kind == Kind.RECV_BACKWARD:
            self.receive(index, op)
        else:
            self.send(index, op, self.p2p.zeros(self.link.device))

    def _post_receives(self, limit: int) -> None:
        """Post the receives that the waits up to ordinal ``limit`` complete."""
        bundles = self.plan.recv_bundles
        i = self.next_receive
        while i < len(bundles) and bundles[i].wait <= limit:
            self._post_bundle(bundles[i].indices)
            i += 1
        self.next_receive = i

    def _post_receives_through(self, index: int) -> None:
        bundles = self.plan.recv_bundles
        while self.next_receive < len(bundles) and bundles[self.next_receive].indices[0] <= index:
            self._post_bundle(bundles[self.next_receive].indices)
            self.next_receive += 1

    def _post_bundle(self, indices: Sequence[int]) -> None:
        """Post the receives of one bundle: one message, one buffer (each tensor a view of it)."""
        ops = self.plan.ops
        first = ops[indices[0]]
        grads = not self.forward_only
        p2p = self.p2p
        recv, peer = self.link.group.recv, first.group_peer
        try:
            if len(indices) == 1 and len(p2p.shapes) == 1:
                bufs = p2p.empty(self.link.device, grads and first.kind == Kind.RECV_FORWARD)
                self.posted[indices[0]] = PostedReceive(bufs, [recv(bufs, peer, 0)])
                return
            flat = torch.empty(p2p.numel * len(indices), dtype=p2p.dtype, device=self.link.device)
            work = [recv([flat], peer, 0)]
            for j, i in enumerate(indices):
                views = p2p.views(flat, j * p2p.numel, grads and ops[i].kind == Kind.RECV_FORWARD)
                self.posted[i] = PostedReceive(views, work if j == 0 else [])
        except RuntimeError as e:
            self._failed(indices[0], first.token, [InFlight([], first.token, (), first.peer)], e, time.monotonic(),
                         "posting")

    # Waiting ------------------------------------------------------------------------------

    def wait(self, index: int, token: str) -> None:
        """The plan's ``wait`` at ``index``: post what is queued, wait for what must be complete."""
        if self.link.eager:
            self._wait_eager(index, token)
            return
        pending = self.pending
        if not pending:
            return
        self.pending = []
        ops, descs, free = [], [], []
        group = self.link.group
        for tr in pending:
            is_send = tr.op.kind == Kind.SEND_FORWARD or tr.op.kind == Kind.SEND_BACKWARD
            fn = dist.isend if is_send else dist.irecv
            for t in tr.tensors:
                ops.append(dist.P2POp(fn, t, tr.op.peer, group))
                descs.append(tr.op.token)
            free.extend(tr.free)
        try:
            works = dist.batch_isend_irecv(ops)
        except RuntimeError as e:
            self._failed(index, token, [InFlight([], tr.op.token, (), tr.op.peer) for tr in pending], e,
                         time.monotonic(), "posting")
        self._wait_all([InFlight([w], d, (), p.peer) for w, d, p in zip(works, descs, ops)], index, token)
        _release(free)

    def finish(self) -> None:
        """End of the step: the last batch, and every send still in flight."""
        end = len(self.plan.ops)
        self.wait(end, "end of step")
        sending, self.sending = self.sending, []
        for entry in sending:
            self._sent(entry, end, "end of step")

    def _wait_eager(self, index: int, token: str) -> None:
        if self.pending:
            self._send_bundles(index, token)
        if self.link.lookahead > 0 and index < len(self.plan.ops):
            self._post_receives(self.plan.wait_ordinal[index] + self.link.lookahead)
        if self.receiving:
            receiving, self.receiving = self.receiving, []
            self._wait_all(receiving, index, token)
        # Free what completed sends no longer need; keep the rest in flight.
        sending = self.sending
        while sending and all(w.is_completed() for w in sending[0].works):
            self._sent(sending.pop(0), index, token)

    def _send_bundles(self, index: int, token: str) -> None:
        """Post the queued sends, one message per bundle (see CompiledPlan.send_bundle)."""
        send, bundle_of = self.link.group.send, self.plan.send_bundle
        pending, self.pending = self.pending, []
        groups: Dict[int, List[Transfer]] = {}
        for tr in pending:
            groups.setdefault(bundle_of[tr.index], []).append(tr)
        for group in groups.values():
            first = group[0]
            try:
                if len(group) == 1 and len(first.tensors) == 1:
                    works = [send(first.tensors, first.op.group_peer, 0)]
                    self.sending.append(InFlight(works, first.op.token, first.free, first.op.peer))
                    continue
                flat = torch.cat([t.reshape(-1) for tr in group for t in tr.tensors])
                for tr in group:  # copied: the outputs' storage can go now
                    _release(tr.free)
                works = [send([flat], first.op.group_peer, 0)]
                self.sending.append(InFlight(works, self.plan.send_bundle_token[bundle_of[first.index]], (),
                                             first.op.peer))
            except RuntimeError as e:
                self._failed(index, token, [InFlight([], first.op.token, (), first.op.peer)], e, time.monotonic(),
                             "posting")

    def _sent(self, entry: InFlight, index: int, token: str) -> None:
        self._wait_all([entry], index, token)  # completed or not: surfaces backend errors
        _release(entry.free)

    def _wait_all(self, entries: Sequence[InFlight], index: int, token: str) -> None:
        """Wait for every work of ``entries``; within one timeout for all of them together on CPU."""
        begin = time.monotonic()
        if not self.wait_with_timeout:  # CUDA: NCCL's own timeout and watchdog bound the wait
            for i, entry in enumerate(entries):
                for w in entry.works:
                    try:
                        w.wait()
                    except RuntimeError as e:
                        self._failed(index, token, entries[i:], e, begin)
            return
        deadline = begin + self.link.timeout_s
        for i, entry in enumerate(entries):
            for w in entry.works:
                remaining = max(deadline - time.monotonic(), 0.001)
                try:
                    ok = w.wait(timedelta(seconds=remaining))
                except RuntimeError as e:
                    self._failed(index, token, entries[i:], e, begin)
                if ok is False:
                    self._failed(index, token, entries[i:], None, begin)

    def _failed(self, index: int, token: str, entries: Sequence[InFlight], error: Optional[BaseException],
                begin: float, doing: str = "waiting") -> None:
        """Raise the CommFailure of ``entries[0]`` (whose work failed or timed out), after reporting it."""
        elapsed = time.monotonic() - begin
        cause = faults.cause_of(error) if error is not None else faults.TIMEOUT
        first = entries[0]
        later = {e.desc for e in entries[1:] if not all(w.is_completed() for w in e.works)} - {first.desc}
        missing = ", ".join([first.desc] + sorted(later))
        where = f"action {index} '{token}'" if index < len(self.plan.ops) else "the end of the step"
        me, name = self.link.rank, self.link.name
        faults.report(first.peer, cause or "error", where, str(error or "")[:200])
        if cause == faults.TIMEOUT:
            waited = self.link.timeout_s if error is None or elapsed >= self.link.timeout_s * 0.99 else elapsed
            msg = (f"pipeline rank {me}: {where} waited {faults.duration(waited)} for its sends and receives; still "
                   f"missing: {missing} (the peer, {name(first.peer)}, did not post the matching operation: it "
                   f"failed, stopped, or runs a different plan)")
            verdict = faults.diagnose([first.peer], self.started, name)
            if verdict.gone and verdict.gone != [first.peer]:
                msg += f"; {verdict.text}"
            raise CommFailure(msg) from None
        when = f"when posting {missing}" if doing == "posting" else \
            f"after {faults.duration(elapsed)} of waiting, with {missing} incomplete"
        if cause in faults.LOST_CAUSES:
            verdict = faults.diagnose([first.peer], self.started, name)
            raise CommFailure(f"pipeline rank {me}: {where}: {cause} by {name(first.peer)} {when}; "
                              f"{verdict.text}") from None
        raise CommFailure(f"pipeline rank {me}: {where}: {type(error).__name__} from the backend {when} (peer "
                          f"{name(first.peer)}): {_first_line(error)}") from None


def _first_line(error: Optional[BaseException]) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:300] if lines else ""


def _release(tensors: Sequence[torch.Tensor]) -> None:
    """Drop the storage of sent outputs that nothing reads again (autograd keeps their metadata)."""
    for t in tensors:
        t.data = torch.empty(0, dtype=t.dtype, device=t.device)
