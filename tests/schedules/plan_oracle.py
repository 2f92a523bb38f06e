"""An independent Python reading of the validator's rules (csrc/analysis/validate.h), for property tests.

``first_issue(plan)`` returns None for a sound plan, else ``(rule, rank, step)`` of the first
offending action in the documented order (``-1, -1`` for rules about no action). It runs the
plan the slow, obvious way: per-rank state in dicts, and the rendezvous semantics of the
runtime's ``wait`` by repeated sweeps over the ranks.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from dualpipe_ext import _C

T = _C.ActionType
Issue = Optional[Tuple[str, int, int]]
SENDS = (T.SEND_FORWARD, T.SEND_BACKWARD)
RECVS = (T.RECV_FORWARD, T.RECV_BACKWARD)
COMM = SENDS + RECVS
BACKWARD = (T.BACKWARD, T.BACKWARD_INPUT, T.WEIGHT, T.FORWARD_BACKWARD)


class _Fail(Exception):
    def __init__(self, rule: str, rank: int = -1, step: int = -1) -> None:
        self.issue = (rule, rank, step) if step >= 0 else (rule, -1, -1)


class _Snapshot:
    """The plan's fields read once (each read of a bound C++ field copies it)."""

    def __init__(self, plan) -> None:
        self.ranks, self.num_modules, self.mbs_per_module = plan.ranks, plan.num_modules, plan.mbs_per_module
        self.actions = [list(row) for row in plan.actions]
        self.stages = [list(row) for row in plan.stages]


def first_issue(plan) -> Issue:
    plan = _Snapshot(plan)
    try:
        _structure(plan)
        forward_only = not any(a.type in BACKWARD for row in plan.actions for a in row)
        _dataflow(plan, forward_only)
        links = _matching(plan)
        _deadlock(plan, links)
    except _Fail as f:
        return f.issue
    return None


def _structure(plan) -> None:
    R, M, N = plan.ranks, plan.num_modules, plan.mbs_per_module
    if R < 1 or not 1 <= M <= 2 or N < 1 or len(plan.actions) != R or len(plan.stages) != R:
        raise _Fail("structure")
    for r in range(R):
        if len(plan.stages[r]) != M:
            raise _Fail("structure")
        for m, s in enumerate(plan.stages[r]):
            if s.next_rank >= 0:
                if not (0 <= s.next_rank < R and 0 <= s.next_module < M):
                    raise _Fail("structure")
                back = plan.stages[s.next_rank][s.next_module]
                if (back.prev_rank, back.prev_module) != (r, m):
                    raise _Fail("structure")
            if s.prev_rank >= 0 and not (0 <= s.prev_rank < R and 0 <= s.prev_module < M):
                raise _Fail("structure")
    for r, row in enumerate(plan.actions):
        for i, a in enumerate(row):
            if a.type in (T.WEIGHT, T.WAIT):
                continue
            if not (0 <= a.module < M and 0 <= a.mb < N):
                raise _Fail("structure", r, i)
            if a.type == T.FORWARD_BACKWARD and not (0 <= a.module2 < M and 0 <= a.mb2 < N):
                raise _Fail("structure", r, i)
            if a.type in COMM and not (0 <= a.peer < R and a.peer != r):
                raise _Fail("structure", r, i)


def _dataflow(plan, forward_only: bool) -> None:
    R, M, N = plan.ranks, plan.num_modules, plan.mbs_per_module
    # (rank, module, what, mb) -> step; what in F, B, recvF, recvB, sendF, sendB
    done: Dict[Tuple[int, int, str, int], int] = {}
    ready = set()  # (rank, module, "F"/"B", mb): a wait has completed its receive
    for r, row in enumerate(plan.actions):
        pending: List[int] = []
        bz: List[int] = []
        queued = 0

        def need_input(fwd: bool, m: int, c: int, i: int) -> None:
            kind = "F" if fwd else "B"
            if (r, m, kind, c) in done:
                raise _Fail("exactly once", r, i)
            if not fwd and (r, m, "F", c) not in done:
                raise _Fail("dependency", r, i)
            s = plan.stages[r][m]
            peer, peer_module = (s.prev_rank, s.prev_module) if fwd else (s.next_rank, s.next_module)
            if peer < 0:
                return
            if peer == r:
                if (r, peer_module, kind, c) not in done:
                    raise _Fail("dependency", r, i)
                return
            if (r, m, "recv" + kind, c) not in done or (r, m, kind, c) not in ready:
                raise _Fail("dependency", r, i)

        for i, a in enumerate(row):
            t = a.type
            if forward_only and t not in (T.FORWARD, T.WAIT, T.RECV_FORWARD, T.SEND_FORWARD):
                raise _Fail("forward only", r, i)
            if t == T.FORWARD:
                need_input(True, a.module, a.mb, i)
                done[(r, a.module, "F", a.mb)] = i
            elif t in (T.BACKWARD, T.BACKWARD_INPUT):
                need_input(False, a.module, a.mb, i)
                done[(r, a.module, "B", a.mb)] = i
                if t == T.BACKWARD_INPUT:
                    queued += 1
                    bz.append(i)
            elif t == T.FORWARD_BACKWARD:
                need_input(False, a.module2, a.mb2, i)
                need_input(True, a.module, a.mb, i)
                done[(r, a.module, "F", a.mb)] = i
                done[(r, a.module2, "B", a.mb2)] = i
            elif t == T.WEIGHT:
                if queued == 0:
                    raise _Fail("weight FIFO", r, i)
                queued -= 1
            elif t in COMM:
                send = t in SENDS
                fwd = t in (T.RECV_FORWARD, T.SEND_FORWARD)
                s = plan.stages[r][a.module]
                expect = s.prev_rank if fwd != send else s.next_rank
                if expect != a.peer or expect == r:
                    raise _Fail("peer", r, i)
                kind = "F" if fwd else "B"
                if send and (r, a.module, kind, a.mb) not in done:
                    raise _Fail("dependency", r, i)
                key = (r, a.module, ("send" if send else "recv") + kind, a.mb)
                if key in done:
                    raise _Fail("exactly once", r, i)
                done[key] = i
                pending.append(i)
            else:  # wait
                for p in pending:
                    q = row[p]
                    if q.type in RECVS:
                        ready.add((r, q.module, "F" if q.type == T.RECV_FORWARD else "B", q.mb))
                pending = []
        if pending:
            raise _Fail("unposted", r, pending[0])
        if queued:
            raise _Fail("weight FIFO", r, bz[len(bz) - queued])
    for r in range(R):
        for m in range(M):
            for c in range(N):
                if (r, m, "F", c) not in done:
                    raise _Fail("exactly once", r, done.get((r, m, "recvF", c), -1))
                if not forward_only and (r, m, "B", c) not in done:
                    raise _Fail("exactly once", r, done[(r, m, "F", c)])


def _matching(plan) -> Dict[Tuple[int, int], Tuple[int, int]]:
    """Partner of every send and receive: (rank, step) -> (rank, step)."""
    sends: Dict[Tuple[int, int], List[int]] = {}
    recvs: Dict[Tuple[int, int], List[int]] = {}
    for r, row in enumerate(plan.actions):
        for i, a in enumerate(row):
            if a.type in SENDS:
                sends.setdefault((r, a.peer), []).append(i)
            elif a.type in RECVS:
                recvs.setdefault((a.peer, r), []).append(i)
    links = {}
    for pair in sorted(set(sends) | set(recvs)):
        frm, to = pair
        s, q = sends.get(pair, []), recvs.get(pair, [])
        for k in range(min(len(s), len(q))):
            sa, ra = plan.actions[frm][s[k]], plan.actions[to][q[k]]
            fwd = sa.type == T.SEND_FORWARD
            info = plan.stages[frm][sa.module]
            want = info.next_module if fwd else info.prev_module
            if (ra.type == T.RECV_FORWARD) != fwd or ra.module != want or ra.mb != sa.mb:
                raise _Fail("matching", frm, s[k])
            links[(frm, s[k])] = (to, q[k])
            links[(to, q[k])] = (frm, s[k])
        if len(s) > len(q):
            raise _Fail("matching", frm, s[len(q)])
        if len(q) > len(s):
            raise _Fail("matching", to, q[len(s)])
    return links


def _deadlock(plan, links) -> None:
    R = plan.ranks
    wait_of: Dict[Tuple[int, int], int] = {}
    batch: Dict[Tuple[int, int], List[int]] = {}
    for r, row in enumerate(plan.actions):
        ops: List[int] = []
        for i, a in enumerate(row):
            if a.type in COMM:
                ops.append(i)
            elif a.type == T.WAIT:
                for p in ops:
                    wait_of[(r, p)] = i
                batch[(r, i)] = ops
                ops = []
    pc = [0] * R
    reached = set()  # (rank, wait step) a rank has arrived at: its batch is posted
    progress = True
    while progress:
        progress = False
        for r, row in enumerate(plan.actions):
            while pc[r] < len(row):
                if row[pc[r]].type == T.WAIT:
                    if (r, pc[r]) not in reached:
                        reached.add((r, pc[r]))
                        progress = True
                    partners = [links[(r, op)] for op in batch[(r, pc[r])]]
                    if not all((q, wait_of[(q, j)]) in reached for q, j in partners):
                        break
                pc[r] += 1
                progress = True
    if all(pc[r] == len(plan.actions[r]) for r in range(R)):
        return
    waits_on = [-1] * R
    for r in range(R):
        if pc[r] >= len(plan.actions[r]):
            continue
        for op in reversed(batch[(r, pc[r])]):  # the earliest unposted partner wins
            q, j = links[(r, op)]
            if pc[q] < wait_of[(q, j)]:
                waits_on[r] = q
    start = next(r for r in range(R) if waits_on[r] >= 0)
    chain, r = [], start
    while r >= 0 and r not in chain:
        chain.append(r)
        r = waits_on[r]
    cycle = chain[chain.index(r):] if r >= 0 else chain
    raise _Fail("deadlock", cycle[0], pc[cycle[0]])
