"""Predict a recorded step's time with the simulator, from costs estimated on the record itself.

Costs come from the recorded compute actions of the step:

* ``F``, ``W``, ``FB``: mean duration of lone forwards, weight-gradient actions, overlapped pairs;
* ``B``: the full-backward cost that keeps the recorded backward time, since the simulator
  charges ``B`` for a full backward and ``B - W`` for an input-only one;
* ``P2P``: mean delay from the end of the action that produces a tensor on one rank to the
  start of the action that consumes it on another, over consumers that sat idle waiting for it;
* per-action overhead: the runtime spends time between actions (posting sends and receives,
  Python) that the simulator does not model; the mean gap after an action whose successor
  did not wait for data is added to every action cost and taken off ``P2P``.

Means rather than medians: on a shared CPU the delays are heavy-tailed, and the tail is
part of what the step costs. Several steps pool their samples; the measured figure is then
the mean step time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

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
    steps: int = 1  # recorded steps pooled

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
                peer = (info.prev_rank, info.prev_module) if p.kind == "F" else (info.next_rank, info.next_module)
                if peer[0] >= 0 and peer[0] != r:
                    i = where.get((peer[0], p.kind[0], peer[1], p.mb))
                    if i is not None:
                        deps.append((peer[0], i))
            per_action.append(deps)
        out.append(per_action)
    return out


def estimate_costs(runs: Sequence[RunStep], plan) -> Tuple[Dict[str, float], float]:
    """Estimated simulator costs (ns) from one or more steps, and the per-action overhead folded into them."""
    durs: Dict[str, List[float]] = {"F": [], "B": [], "Bz": [], "W": [], "FB": []}
    waits: List[float] = []  # producer end -> consumer start, consumer idle
    gaps: List[float] = []  # end of an action -> start of the next, next not waiting for data
    for run in runs:
        for row in run.compute:
            for token, s, e in row:
                first, second = parse_token(token)
                durs["FB" if second is not None else first.kind].append(e - s)
        producers = _producers(plan, run)
        for r, row in enumerate(run.compute):
            for i, (_, s, _) in enumerate(row):
                prev_end = row[i - 1][2] if i > 0 else None
                ready = max((run.compute[a][j][2] for a, j in producers[r][i]), default=None)
                if ready is not None and (prev_end is None or prev_end <= ready):
                    waits.append(s - ready)
                elif prev_end is not None:
                    gaps.append(s - prev_end)
    overhead = max(0.0, _mean(gaps, 0.0))
    f = _mean(durs["F"], 0.0)
    w = _mean(durs["W"], 0.0)
    n_b, n_bz = len(durs["B"]), len(durs["Bz"])
    if n_b + n_bz:
        b = (sum(durs["B"]) + sum(durs["Bz"]) + n_bz * w) / (n_b + n_bz)
    else:
        b = 2 * f
    fb = _mean(durs["FB"], f + b)
    p2p = max(0.0, _mean(waits, 0.0) - overhead)
    costs = {"F": f + overhead, "B": b + overhead, "W": w + overhead, "FB": fb + overhead, "P2P": p2p}
    costs["W"] = min(costs["W"], costs["B"])
    return costs, overhead


def predict(runs: Sequence[RunStep], plan=None) -> Prediction:
    """Simulate the plan of ``runs`` (steps of one run) with costs estimated from them; compare with their mean step time."""
    from dualpipe_ext.schedules import Costs, get_plan, simulate

    if isinstance(runs, RunStep):
        runs = [runs]
    if not runs:
        raise ValueError("predict needs at least one recorded step")
    first = runs[0]
    if plan is None:
        plan = get_plan(first.schedule, first.ranks, first.chunks)
    costs, overhead = estimate_costs(runs, plan)
    sim = simulate(plan, costs=Costs(**costs))
    spans = [max(e for row in r.compute for _, _, e in row) - min(s for row in r.compute for _, s, _ in row)
             for r in runs]
    return Prediction(
        measured_ns=_mean([float(r.step_time_ns) for r in runs], 0.0),
        compute_span_ns=_mean([float(x) for x in spans], 0.0),
        predicted_ns=float(sim.makespan),
        costs=costs,
        overhead_ns=overhead,
        steps=len(runs),
    )


def format_prediction(p: Prediction) -> str:
    """Human-readable lines for the CLI."""
    ms = 1e6
    c = p.costs
    lines = [
        "estimated costs (ms): " + ", ".join(f"{k}={v / ms:.3f}" for k, v in c.items())
        + f" (per-action overhead {p.overhead_ns / ms:.3f} included)",
        f"measured step time : {p.measured_ns / ms:.3f} ms (compute span {p.compute_span_ns / ms:.3f} ms; "
        f"mean of {p.steps} step{'s' if p.steps != 1 else ''})",
        f"predicted step time: {p.predicted_ns / ms:.3f} ms",
        f"relative error     : {100 * p.relative_error:+.1f} %",
    ]
    return "\n".join(lines)
