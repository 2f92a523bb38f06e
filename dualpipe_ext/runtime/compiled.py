"""One rank's plan in the form the executor walks: a list of :class:`Op`, and its stage links.

Compiled once per (plan, rank, rank mapping) and cached by the pipeline, so that the walk
itself touches only tuples and ints. Compiling validates the plan first (the C++ validator):
the executor runs no plan that the validator rejects. An op's ``kind`` indexes the executor's dispatch
table, its peers are already translated to the ranks the process group uses, and its
``token`` (the action's text form, for errors, records and the profiler) is printed once.
"""
from __future__ import annotations

from enum import IntEnum
from typing import Dict, List, NamedTuple, Sequence, Tuple

from dualpipe_ext import _C
from dualpipe_ext.schedules.analysis import validate

__all__ = ["CompiledPlan", "Kind", "Op", "Receive", "RecvBundle"]


class Kind(IntEnum):
    """What an op does: the action types of the plan (``_C.ActionType``), by the same names and
    numbers; compute kinds come first, then receives, sends and the wait."""

    FORWARD = 0  # forward of (module, mb)
    BACKWARD = 1  # backward of (module, mb): input and weight gradients
    BACKWARD_INPUT = 2  # backward input of (module, mb); the weight work is queued for a WEIGHT
    WEIGHT = 3  # run the oldest queued weight-gradient batch
    FORWARD_BACKWARD = 4  # forward of (module, mb) and backward of (module2, mb2), overlapped
    RECV_FORWARD = 5  # receive the inputs of (module, mb)
    RECV_BACKWARD = 6  # receive the output gradients of (module, mb)
    SEND_FORWARD = 7  # send the outputs of (module, mb)
    SEND_BACKWARD = 8  # send the input gradients of (module, mb)
    WAIT = 9  # post the queued sends and receives and wait for them


_KINDS = {t: Kind[name] for name, t in _C.ActionType.__members__.items()}


class Op(NamedTuple):
    """One action of a rank's plan."""

    kind: Kind
    module: int  # local module; the forward half of a pair; -1 for WEIGHT and WAIT
    mb: int  # micro-batch as counted by `module`
    module2: int  # backward half of a pair; -1 otherwise
    mb2: int
    peer: int  # global rank on the other side of a send or receive; -1 otherwise
    group_peer: int  # the same peer as a rank of the pipeline's process group
    token: str  # the action's text form: "F0.3", "sendF0.3>1", "wait"


class Receive(NamedTuple):
    """A receive of the plan, with the wait that completes it (receives can be posted ahead)."""

    index: int  # position of the receive in CompiledPlan.ops
    wait: int  # ordinal of the wait that completes it


class RecvBundle(NamedTuple):
    """Receives from one peer that arrive as one message: the same wait completes them on this
    rank, and the peer sends them at one wait of its own (one buffer, one send)."""

    indices: Tuple[int, ...]  # positions of the receives in CompiledPlan.ops, in plan order
    wait: int  # ordinal of the wait that completes them


_SENDS = (_C.ActionType.SEND_FORWARD, _C.ActionType.SEND_BACKWARD)
_RECVS = (_C.ActionType.RECV_FORWARD, _C.ActionType.RECV_BACKWARD)


def _ordinals(actions, types, peer: int) -> List[int]:
    """Wait ordinal of each action of ``types`` with ``peer``, in plan order."""
    out, ordinal = [], 0
    for a in actions:
        if a.type == _C.ActionType.WAIT:
            ordinal += 1
        elif a.type in types and a.peer == peer:
            out.append(ordinal)
    return out


def _bundle_starts(plan: "_C.Plan", sender: int, receiver: int) -> List[bool]:
    """Per message from ``sender`` to ``receiver`` (in order): whether it starts a new bundle.

    Messages of one pair are matched in order; consecutive ones go as one when the sender sends
    them at one wait and the receiver completes them at one wait. Both ranks compute the same."""
    sent = _ordinals(plan.actions[sender], _SENDS, receiver)
    got = _ordinals(plan.actions[receiver], _RECVS, sender)
    if len(sent) != len(got):  # the validator refuses such a plan; keep every message on its own
        return [True] * len(sent)
    return [k == 0 or sent[k] != sent[k - 1] or got[k] != got[k - 1] for k in range(len(sent))]


class CompiledPlan:
    """One rank's ops, plus what the stage table says about its local modules."""

    def __init__(self, plan: "_C.Plan", rank: int, to_global: Sequence[int], to_group: Sequence[int]) -> None:
        validate(plan)  # PlanError naming the first offending action
        if not 0 <= rank < plan.ranks:
            raise ValueError(f"rank {rank} is not a rank of the plan ({plan.ranks} ranks)")
        if len(to_global) != plan.ranks or len(to_group) != plan.ranks:
            raise ValueError(f"the rank tables have {len(to_global)} and {len(to_group)} entries, the plan "
                             f"{plan.ranks} ranks")
        self.schedule = plan.schedule
        self.ranks = plan.ranks
        self.chunks = plan.chunks
        self.num_modules = plan.num_modules
        self.mbs_per_module = plan.mbs_per_module
        stages = plan.stages[rank]
        self.is_first = [s.prev_rank < 0 for s in stages]
        self.is_last = [s.next_rank < 0 for s in stages]
        # Consecutive stages on this rank hand their tensors over directly (DualPipeV's V).
        self.local_next = [s.next_module if s.next_rank == rank else -1 for s in stages]
        self.local_prev = [s.prev_module if s.prev_rank == rank else -1 for s in stages]
        self.remote_prev = [s.prev_rank >= 0 and s.prev_rank != rank for s in stages]
        self.ops: List[Op] = [
            Op(_KINDS[a.type], a.module, a.mb, a.module2, a.mb2, to_global[a.peer] if a.peer >= 0 else -1,
               to_group[a.peer] if a.peer >= 0 else -1, str(a))
            for a in plan.actions[rank]
        ]
        self.receives: List[Receive] = []  # in plan order
        self.wait_ordinal: List[int] = []  # per op: ordinal of the next wait at or after it
        ordinal = 0
        for i, op in enumerate(self.ops):
            self.wait_ordinal.append(ordinal)
            if op.kind == Kind.RECV_FORWARD or op.kind == Kind.RECV_BACKWARD:
                self.receives.append(Receive(i, ordinal))
            if op.kind == Kind.WAIT:
                ordinal += 1
        self.num_waits = ordinal
        # Bundles: receives (and sends) of one pair that travel as one message (see _bundle_starts).
        self.send_bundle: List[int] = [-1] * len(self.ops)  # per send op: a key shared by its bundle
        self.send_bundle_token: List[str] = []  # per bundle key: its sends' tokens, "+"-joined (for messages)
        self.recv_bundles: List[RecvBundle] = []  # in plan order
        self.recv_bundle_of: Dict[int, int] = {}  # receive op index -> position in recv_bundles
        peers = {a.peer for a in plan.actions[rank] if a.peer >= 0}
        starts_out = {p: _bundle_starts(plan, rank, p) for p in peers}
        starts_in = {p: _bundle_starts(plan, p, rank) for p in peers}
        count_out = {p: 0 for p in peers}
        count_in = {p: 0 for p in peers}
        key = -1
        open_send: Dict[int, int] = {}  # peer -> key of the open send bundle
        open_recv: Dict[int, int] = {}  # peer -> position of the open receive bundle
        members: List[List[int]] = []  # per receive bundle: its op indices
        for i, a in enumerate(plan.actions[rank]):
            if a.type in _SENDS:
                k = count_out[a.peer]
                count_out[a.peer] += 1
                if starts_out[a.peer][k]:
                    key += 1
                    open_send[a.peer] = key
                    self.send_bundle_token.append(self.ops[i].token)
                else:
                    self.send_bundle_token[open_send[a.peer]] += "+" + self.ops[i].token
                self.send_bundle[i] = open_send[a.peer]
            elif a.type in _RECVS:
                k = count_in[a.peer]
                count_in[a.peer] += 1
                if starts_in[a.peer][k]:
                    open_recv[a.peer] = len(members)
                    members.append([])
                    self.recv_bundles.append(RecvBundle((), self.wait_ordinal[i]))
                members[open_recv[a.peer]].append(i)
                self.recv_bundle_of[i] = open_recv[a.peer]
        self.recv_bundles = [RecvBundle(tuple(m), b.wait) for m, b in zip(members, self.recv_bundles)]
