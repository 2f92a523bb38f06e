"""Predict a recorded step's time with the simulator, from costs estimated on the record itself.

Costs come from the recorded compute actions of the step:

* ``F``, ``W``, ``FB``: mean duration of lone forwards, weight-gradient actions, overlapped pairs;
* ``B``: the full-backward cost that keeps the recorded backward time, since the simulator
  charges ``B`` for a backward and ``B - W`` for a backward input (``B..z``);
* ``overhead``: mean gap from the end of an action to the start of the next on the same
  rank, over actions that receive nothing from another rank (the runtime's bookkeeping
  between actions: posting sends and receives, Python);
* ``P2P``: mean delay from the end of the action that produces a tensor on one rank to the
  start of the action that consumes it on another, over consumers that sat idle waiting for
  it, less ``overhead`` (that delay also holds the consumer's bookkeeping, which the
  simulator charges separately);
* step edges, per rank: ``start`` (when the rank started its step, plus the mean set-up time
  from a step's start to the first action of a rank whose first action needs no input) and
  ``tail`` (from its last action to the end of its step: the final wait).

The plan is then simulated with ``eager_comm=True``, as this runtime runs it on gloo
(receives posted at the step's start, sends completing in the background, so only a
consumer waits for a transfer), and also with rendezvous waits (a sender held at the plan's
``wait`` until its receiver posts), with the same costs and edges. Nothing is fitted to the
step time.

Means rather than medians: on a shared CPU the delays are heavy-tailed, and the tail is
part of what the step costs. Several steps pool their samples; the measured figure is then
the mean step time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, NamedTuple, Optional, Sequence, Tuple

from dualpipe_ext import _C  # one line saying how to build it, when it is not built
ActionType = _C.ActionType
Plan = _C.Plan
from dualpipe_ext.schedules.analysis import Costs, simulate
from dualpipe_ext.schedules.registry import get_plan
from dualpipe_ext.schedules.tokens import BACKWARD, BACKWARD_INPUT, FORWARD, WEIGHT, compute_parts

if TYPE_CHECKING:  # the merged records of a run (dualpipe_ext.viz.records), read here, not built
    from dualpipe_ext.viz.records import RunStep

__all__ = ["Prediction", "StepEdges", "estimate_costs", "format_prediction", "predict", "step_edges"]


@dataclass(frozen=True)
class Prediction:
    """Measured and simulated time of one step, in nanoseconds."""

    measured_ns: float  # wall time of the step over all ranks
    compute_span_ns: float  # first compute start to last compute end, over all ranks
    predicted_ns: float  # simulated step time, communication as the gloo runtime runs it
    rendezvous_ns: float  # simulated step time with rendezvous waits, same costs and edges
    costs: Dict[str, float]  # the estimated F, B, W, FB, P2P, overhead (ns)
    start_ns: Tuple[float, ...]  # per rank: when its program begins (step start + set-up)
    tail_ns: Tuple[float, ...]  # per rank: from its last action to its step's end
    setup_ns: float  # step start -> first action of a rank that needs no input
    steps: int = 1  # recorded steps pooled

    @property
    def relative_error(self) -> float:
        """(predicted - measured) / measured, communication as the runtime runs it."""
        return (self.predicted_ns - self.measured_ns) / self.measured_ns

    @property
    def rendezvous_error(self) -> float:
        """(rendezvous - measured) / measured."""
        return (self.rendezvous_ns - self.measured_ns) / self.measured_ns


def _mean(xs: List[float], default: float) -> float:
    return sum(xs) / len(xs) if xs else default


def _producers(plan: Plan, run: RunStep) -> List[List[List[Tuple[int, int]]]]:
    """For each rank and compute action: the (rank, action index) that produce its inputs elsewhere."""
    where: Dict[Tuple[int, bool, int, int], int] = {}  # (rank, is forward, module, mb) -> action index
    for r, row in enumerate(run.compute):
        for i, (token, _, _) in enumerate(row):
            for p in compute_parts(token):
                if p is not None and p.kind != WEIGHT:
                    where[(r, p.kind == FORWARD, p.module, p.mb)] = i
    out = []
    for r, row in enumerate(run.compute):
        per_action = []
        for token, _, _ in row:
            deps = []
            for p in compute_parts(token):
                if p is None or p.kind == WEIGHT:
                    continue
                info = plan.stages[r][p.module]
                forward = p.kind == FORWARD
                peer = (info.prev_rank, info.prev_module) if forward else (info.next_rank, info.next_module)
                if peer[0] >= 0 and peer[0] != r:
                    i = where.get((peer[0], forward, peer[1], p.mb))
                    if i is not None:
                        deps.append((peer[0], i))
            per_action.append(deps)
        out.append(per_action)
    return out


def _receives_before(plan: Plan, rank: int) -> List[bool]:
    """For each compute action of ``rank``: whether a wait on receives precedes it (since the last compute)."""
    recv_types = (ActionType.RECV_FORWARD, ActionType.RECV_BACKWARD)
    out, queued, waited = [], False, False
    for a in plan.actions[rank]:
        if a.type in recv_types:
            queued = True
        elif a.type == ActionType.WAIT:
            waited, queued = waited or queued, False
        elif a.is_compute:
            out.append(waited)
            waited = False
    return out


def estimate_costs(runs: Sequence[RunStep], plan: Plan) -> Dict[str, float]:
    """Estimated simulator costs (ns) from one or more steps: F, B, W, FB, P2P and overhead."""
    pair = "forward_backward"
    durs: Dict[str, List[float]] = {FORWARD: [], BACKWARD: [], BACKWARD_INPUT: [], WEIGHT: [], pair: []}
    waits: List[float] = []  # producer end -> consumer start, consumer idle
    gaps: List[float] = []  # end of an action -> start of the next, next receiving nothing
    for run in runs:
        for row in run.compute:
            for token, s, e in row:
                first, second = compute_parts(token)
                durs[pair if second is not None else first.kind].append(e - s)
        producers = _producers(plan, run)
        for r, row in enumerate(run.compute):
            received = _receives_before(plan, r)
            for i, (_, s, _) in enumerate(row):
                prev_end = row[i - 1][2] if i > 0 else None
                ready = max((run.compute[a][j][2] for a, j in producers[r][i]), default=None)
                if ready is not None and (prev_end is None or prev_end <= ready):
                    waits.append(s - ready)
                elif prev_end is not None and not received[i]:
                    gaps.append(s - prev_end)  # no receive waited on: the gap is bookkeeping alone
    f = _mean(durs[FORWARD], 0.0)
    w = _mean(durs[WEIGHT], 0.0)
    n_b, n_bi = len(durs[BACKWARD]), len(durs[BACKWARD_INPUT])
    if n_b + n_bi:
        b = (sum(durs[BACKWARD]) + sum(durs[BACKWARD_INPUT]) + n_bi * w) / (n_b + n_bi)
    else:
        b = 2 * f
    overhead = max(0.0, _mean(gaps, 0.0))
    # A waiting consumer's measured delay also holds the bookkeeping the simulator charges
    # as ``overhead`` before every action, so the transfer itself is the difference.
    p2p = max(0.0, _mean(waits, 0.0) - overhead)
    return {"F": f, "B": b, "W": min(w, b), "FB": _mean(durs[pair], f + b), "P2P": p2p, "overhead": overhead}


class StepEdges(NamedTuple):
    """What :func:`step_edges` measured, in nanoseconds."""

    start: List[float]  # per rank: when its program begins (mean step start + set-up)
    tail: List[float]  # per rank: from its last action to its step's end
    setup: float  # step start -> first action of a rank that needs no input


def step_edges(runs: Sequence[RunStep], plan: Plan) -> StepEdges:
    """Per-rank ``start`` and ``tail`` (ns) of the recorded steps, and the set-up time included in ``start``.

    ``start[r]``: mean time rank r started its step, plus the mean set-up time from a step's
    start to the first action of the ranks whose first action needs no input (the runtime
    posts its receives first). ``tail[r]``: mean time from its last action to its step's end.
    """
    ranks = runs[0].ranks
    setups: List[float] = []
    starts: List[List[float]] = [[] for _ in range(ranks)]
    tails: List[List[float]] = [[] for _ in range(ranks)]
    for run in runs:
        producers = _producers(plan, run)
        for r, row in enumerate(run.compute):
            if not row:
                continue
            starts[r].append(run.bounds[r][0])
            tails[r].append(max(0, run.bounds[r][1] - row[-1][2]))
            if not producers[r][0]:
                setups.append(row[0][1] - run.bounds[r][0])
    setup = max(0.0, _mean(setups, 0.0))
    return StepEdges([max(0.0, _mean(x, 0.0)) + setup for x in starts], [_mean(x, 0.0) for x in tails], setup)


def predict(runs: Sequence[RunStep], plan: Optional[Plan] = None) -> Prediction:
    """Simulate the plan of ``runs`` (steps of one run) with costs and edges estimated from them;
    compare with their mean step time."""
    if not runs:
        raise ValueError("predict needs at least one recorded step")
    first = runs[0]
    if plan is None:
        plan = get_plan(first.schedule, first.ranks, first.chunks)
    costs = estimate_costs(runs, plan)
    start, tail, setup = step_edges(runs, plan)
    c = Costs(**costs)
    eager = simulate(plan, costs=c, eager_comm=True, start=start, tail=tail)
    rendezvous = simulate(plan, costs=c, start=start, tail=tail)
    spans = [max(e for row in r.compute for _, _, e in row) - min(s for row in r.compute for _, s, _ in row)
             for r in runs]
    return Prediction(
        measured_ns=_mean([float(r.step_time_ns) for r in runs], 0.0),
        compute_span_ns=_mean([float(x) for x in spans], 0.0),
        predicted_ns=float(eager.makespan),
        rendezvous_ns=float(rendezvous.makespan),
        costs=costs,
        start_ns=tuple(start),
        tail_ns=tuple(tail),
        setup_ns=setup,
        steps=len(runs),
    )


def format_prediction(p: Prediction) -> str:
    """Human-readable lines for the CLI."""
    ms = 1e6
    c = p.costs
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    return "\n".join([
        "estimated costs (ms): " + ", ".join(f"{k}={v / ms:.3f}" for k, v in c.items()),
        f"step edges (ms)     : set-up {p.setup_ns / ms:.3f}, start mean {mean(p.start_ns) / ms:.3f} "
        f"(set-up included), tail mean {mean(p.tail_ns) / ms:.3f}",
        f"measured step time  : {p.measured_ns / ms:.3f} ms (compute span {p.compute_span_ns / ms:.3f} ms; "
        f"mean of {p.steps} step{'s' if p.steps != 1 else ''})",
        f"simulator (as the gloo runtime runs): {p.predicted_ns / ms:.3f} ms, "
        f"relative error {100 * p.relative_error:+.1f} %",
        f"simulator (rendezvous)              : {p.rendezvous_ns / ms:.3f} ms, "
        f"relative error {100 * p.rendezvous_error:+.1f} %",
    ])
