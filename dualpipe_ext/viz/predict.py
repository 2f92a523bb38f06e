"""Predict a recorded step's time with the simulator, from costs estimated on the record itself.

Costs come from the recorded compute actions of the step:

* ``F``, ``W``, ``FB``: mean duration of lone forwards, weight-gradient actions, overlapped pairs;
* ``B``: the full-backward cost that keeps the recorded backward time, since the simulator
  charges ``B`` for a full backward and ``B - W`` for an input-only one;
* ``P2P``: median delay from the end of the action that produces a tensor on one rank to the
  start of the action that consumes it on another, over consumers that sat idle waiting for it;
* per-action overhead: the runtime spends time between actions (posting sends and receives,
  Python) that the simulator does not model; the median gap after an action whose successor
  did not wait for data is added to every action cost and taken off ``P2P``.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Dict, List, Tuple

from dualpipe_ext.viz.records import RunStep
from dualpipe_ext.viz.tokens import parse_token

__all__ = ["Prediction", "estimate_costs", "predict"]


@dataclass(frozen=True)
class Prediction:
    """Measured and simulated time of one step, in nanoseconds."""

    measured_ns: float  # wall time of the step over all ranks
    compute_span_ns: float  # first compute start to last compute end, over all ranks
    predicted_ns: float  # simulated makespan with the estimated costs
    costs: Dict[str, float]  # the estimated F, B, W, FB, P2P (ns), overhead included
    overhead_ns: float  # per-action overhead folded into the costs

    @property
    def relative_error(self) -> float:
        """(predicted - measured) / measured."""
        return (self.predicted_ns - self.measured_ns) / self.measured_ns


def _mean(xs: List[float], default: float) -> float:
    return sum(xs) / len(xs) if xs else default


def _producers(plan, run: RunStep) -> List[List[List[Tuple[int, int]]]]:
    """For each rank and compute action: the (rank, action index) that produce its inputs elsewhere."""
    where: Dict[Tuple[int, str, int, int], int] = {}  # (rank, "F"/"B", module, mb) -> action index
    for r, row in enumerate(run.compute):
        for i, (token, _, _) in enumerate(row):
            for p in parse_token(token):
                if p is not None and p.kind != "W":
                    where[(r, p.kind[0], p.module, p.mb)] = i
    out = []
    for r, row in enumerate(run.compute):
        per_action = []
        for token, _, _ in row:
            deps = []
            for p in parse_token(token):
                if p is None or p.kind == "W":
                    continue
                info = plan.stages[r][p.module]
                peer = info.prev if p.kind == "F" else info.next
                if peer[0] >= 0 and peer[0] != r:
                    i = where.get((peer[0], p.kind[0], peer[1], p.mb))
                    if i is not None:
                        deps.append((peer[0], i))
            per_action.append(deps)
        out.append(per_action)
    return out


def estimate_costs(run: RunStep, plan) -> Tuple[Dict[str, float], float]:
    """Estimated simulator costs (ns) and the per-action overhead folded into them."""
    durs: Dict[str, List[float]] = {"F": [], "B": [], "Bz": [], "W": [], "FB": []}
    for row in run.compute:
        for token, s, e in row:
            first, second = parse_token(token)
            durs["FB" if second is not None else first.kind].append(e - s)
    producers = _producers(plan, run)
    waits: List[float] = []  # producer end -> consumer start, consumer idle
    gaps: List[float] = []  # end of an action -> start of the next, next not waiting for data
    for r, row in enumerate(run.compute):
        for i, (_, s, _) in enumerate(row):
            prev_end = row[i - 1][2] if i > 0 else None
            ready = max((run.compute[a][j][2] for a, j in producers[r][i]), default=None)
            if ready is not None and (prev_end is None or prev_end <= ready):
                waits.append(s - ready)
            elif prev_end is not None and (ready is None or ready < prev_end):
                gaps.append(s - prev_end)
    overhead = max(0.0, statistics.median(gaps)) if gaps else 0.0
    f = _mean(durs["F"], 0.0)
    w = _mean(durs["W"], 0.0)
    n_b, n_bz = len(durs["B"]), len(durs["Bz"])
    if n_b + n_bz:
        b = (sum(durs["B"]) + sum(durs["Bz"]) + n_bz * w) / (n_b + n_bz)
    else:
        b = 2 * f
    fb = _mean(durs["FB"], f + b)
    p2p = max(0.0, statistics.median(waits) - overhead) if waits else 0.0
    costs = {"F": f + overhead, "B": b + overhead, "W": w + overhead, "FB": fb + overhead, "P2P": p2p}
    if costs["W"] > costs["B"]:
        costs["W"] = costs["B"]
    return costs, overhead


def predict(run: RunStep, plan=None) -> Prediction:
    """Simulate the plan of ``run`` with costs estimated from it and compare with the measured step time."""
    from dualpipe_ext.schedules import Costs, get_plan, simulate

    if plan is None:
        plan = get_plan(run.schedule, run.ranks, run.chunks)
    costs, overhead = estimate_costs(run, plan)
    sim = simulate(plan, costs=Costs(**costs))
    span = max(e for row in run.compute for _, _, e in row) - min(s for row in run.compute for _, s, _ in row)
    return Prediction(
        measured_ns=float(run.step_time_ns),
        compute_span_ns=float(span),
        predicted_ns=float(sim.makespan),
        costs=costs,
        overhead_ns=overhead,
    )


def format_prediction(p: Prediction) -> str:
    """Human-readable lines for the CLI."""
    ms = 1e6
    c = p.costs
    lines = [
        "estimated costs (ms): " + ", ".join(f"{k}={v / ms:.3f}" for k, v in c.items())
        + f" (per-action overhead {p.overhead_ns / ms:.3f} included)",
        f"measured step time : {p.measured_ns / ms:.3f} ms (compute span {p.compute_span_ns / ms:.3f} ms)",
        f"predicted step time: {p.predicted_ns / ms:.3f} ms",
        f"relative error     : {100 * p.relative_error:+.1f} %",
    ]
    return "\n".join(lines)
