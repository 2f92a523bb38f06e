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

:func:`predict_shared` replays the recorded action order as this runtime runs it on gloo
(receives posted early, sends completing in the background, so only a consumer waits for
a transfer; the simulator also holds a sender at the plan's ``wait`` for one ``P2P``), and
can let the ranks share fewer CPU cores than there are ranks: action costs are then
core-time, estimated from the wall time with the share of a core each rank had while the
ranks outside a recorded communication wait competed for the cores.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from dualpipe_ext.viz.records import RunStep
from dualpipe_ext.viz.tokens import parse_token

__all__ = ["Prediction", "SharedPrediction", "estimate_costs", "predict", "predict_shared", "replay"]


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


def _busy_intervals(run: RunStep) -> List[List[Tuple[int, int]]]:
    """Per rank: the parts of its step not spent inside a recorded communication wait."""
    out = []
    for r, (s0, e0) in enumerate(run.bounds):
        waits = sorted((s, e) for _, cat, s, e in run.other[r] if cat == "comm")
        busy, t = [], s0
        for s, e in waits:
            if s > t:
                busy.append((t, min(s, e0)))
            t = max(t, e)
        if t < e0:
            busy.append((t, e0))
        out.append(busy)
    return out


def _cpu_share(run: RunStep, cores: int):
    """A function giving, for rank r's interval [s, e), the core-time it got: the integral of
    min(1, cores / k(t)) where k(t) is the number of ranks not blocked in a wait at t."""
    busy = _busy_intervals(run)
    edges = sorted({t for row in busy for iv in row for t in iv})
    # Number of busy ranks on each elementary segment [edges[i], edges[i+1]).
    counts = []
    for a, b in zip(edges, edges[1:]):
        counts.append(sum(1 for row in busy if any(s <= a and b <= e for s, e in row)))

    import bisect

    def share(r: int, s: int, e: int) -> float:
        total = 0.0
        i = max(0, bisect.bisect_right(edges, s) - 1)
        while i < len(counts) and edges[i] < e:
            a, b = max(s, edges[i]), min(e, edges[i + 1])
            if b > a:
                total += (b - a) * min(1.0, cores / max(1, counts[i]))
            i += 1
        return total

    return share


@dataclass(frozen=True)
class SharedPrediction:
    """The step replayed on ``cores`` shared cores; times and work in nanoseconds."""

    measured_ns: float
    predicted_ns: float
    work: Dict[str, float]  # core-time per action kind (F, B, Bz, W, FB)
    overhead_ns: float  # core-time between two actions that did not wait for data
    delay_ns: float  # producer end -> idle consumer start (transfer and wake-up), wall time
    setup_ns: float  # step start -> first action of a rank that needs no input
    tail_ns: float  # last action -> step end, mean over ranks
    cores: Optional[int]  # None: a core (device) per rank
    steps: int = 1

    @property
    def relative_error(self) -> float:
        """(predicted - measured) / measured."""
        return (self.predicted_ns - self.measured_ns) / self.measured_ns


def _kind(token: str) -> str:
    first, second = parse_token(token)
    return "FB" if second is not None else first.kind


def replay(tokens: Sequence[Sequence[str]], producers, work: Dict[str, float], overhead: float, delay: float,
           cores: Optional[int], lead: Optional[Sequence[float]] = None,
           tail: Optional[Sequence[float]] = None) -> float:
    """Makespan of the ranks' compute actions run in order on ``cores`` shared cores (None: a core each).

    ``lead[r]``: earliest start of rank r's first action; ``tail[r]``: time rank r spends
    after its last action (both 0 by default), so the result is a step time.
    Each rank runs its actions in order; an action starts once the rank has spent ``overhead``
    core-time after its previous action and every input from another rank has arrived,
    ``delay`` after its producer ended (as the runtime does with receives posted early and
    sends completing in the background). Ranks that are not blocked share the cores
    equally (processor sharing), at most one core each.
    """
    ranks = len(tokens)
    lead = [0.0] * ranks if lead is None else list(lead)
    tail = [0.0] * ranks if tail is None else list(tail)
    nxt = [0] * ranks
    end: List[List[Optional[float]]] = [[None] * len(row) for row in tokens]
    running: Dict[int, float] = {}  # rank -> core-time left of its action (overhead included)
    t = 0.0
    while True:
        waiting = {}
        for r in range(ranks):
            if r in running or nxt[r] >= len(tokens[r]):
                continue
            i = nxt[r]
            deps = [end[a][j] for a, j in producers[r][i]]
            if any(d is None for d in deps):
                continue
            waiting[r] = max([d + delay for d in deps] + ([lead[r]] if i == 0 else []), default=t)
        for r, ready in list(waiting.items()):
            if ready <= t:
                i = nxt[r]
                running[r] = work[_kind(tokens[r][i])] + (overhead if i > 0 else 0.0)
                del waiting[r]
        if not running and not waiting:
            if any(nxt[r] < len(tokens[r]) for r in range(ranks)):
                raise ValueError("replay is stuck: an action waits for an input that is never produced")
            break
        rate = 1.0 if cores is None else min(1.0, cores / max(1, len(running)))
        t_next = min([t + left / rate for left in running.values()] + list(waiting.values()))
        for r in running:
            running[r] -= (t_next - t) * rate
        t = t_next
        for r in [r for r, left in running.items() if left <= 1e-9 * max(1.0, t)]:
            end[r][nxt[r]] = t
            nxt[r] += 1
            del running[r]
    return max((row[-1] + tail[r] for r, row in enumerate(end) if row), default=0.0)


def predict_shared(runs: Sequence[RunStep], cores: Optional[int] = None, plan=None) -> SharedPrediction:
    """Replay the plan on ``cores`` shared cores with per-kind core-time estimated from the records.

    An action's core-time is its wall time weighted by the share of a core its rank had:
    ``min(1, cores / k)`` while ``k`` ranks were not blocked in a recorded communication
    wait. The gap after an action whose successor did not wait for data is weighted the
    same way (per-action overhead); ``delay`` is the mean wall time from a producer's end to
    the start of a consumer that sat idle for it. The step's edges are measured per rank:
    the lead from the step's start to the earliest a rank can begin its first action (its
    own start plus the set-up time of the ranks whose first action needs no input, as the
    runtime posts its receives first) and the tail after its last action (the final wait
    for sends and receives). Nothing is fitted to the step time.
    """
    from dualpipe_ext.schedules import get_plan

    if isinstance(runs, RunStep):
        runs = [runs]
    if not runs:
        raise ValueError("predict needs at least one recorded step")
    if cores is not None and cores < 1:
        raise ValueError(f"cores must be at least 1, got {cores}")
    first = runs[0]
    if plan is None:
        plan = get_plan(first.schedule, first.ranks, first.chunks)
    durs: Dict[str, List[float]] = {"F": [], "B": [], "Bz": [], "W": [], "FB": []}
    gaps: List[float] = []
    delays: List[float] = []
    predicted: List[float] = []
    for run in runs:
        share = _cpu_share(run, cores) if cores is not None else (lambda r, s, e: float(e - s))
        producers = _producers(plan, run)
        for r, row in enumerate(run.compute):
            for i, (token, s, e) in enumerate(row):
                durs[_kind(token)].append(share(r, s, e))
                prev_end = row[i - 1][2] if i > 0 else None
                ready = max((run.compute[a][j][2] for a, j in producers[r][i]), default=None)
                if ready is not None and (prev_end is None or prev_end <= ready):
                    delays.append(s - ready)
                elif prev_end is not None:
                    gaps.append(share(r, prev_end, s))
    # Step edges, per rank, averaged over the steps.
    setups, leads, tails = [], [[] for _ in range(first.ranks)], [[] for _ in range(first.ranks)]
    for run in runs:
        producers = _producers(plan, run)
        for r, row in enumerate(run.compute):
            if not row:
                continue
            leads[r].append(run.bounds[r][0])
            tails[r].append(max(0, run.bounds[r][1] - row[-1][2]))
            if not producers[r][0]:
                setups.append(row[0][1] - run.bounds[r][0])
    setup = max(0.0, _mean(setups, 0.0))
    lead = [_mean(x, 0.0) + setup for x in leads]
    tail = [_mean(x, 0.0) for x in tails]
    work = {k: _mean(v, 0.0) for k, v in durs.items()}
    if not durs["Bz"]:
        work["Bz"] = work["B"]
    if not durs["B"]:
        work["B"] = work["Bz"]
    overhead = max(0.0, _mean(gaps, 0.0))
    delay = max(0.0, _mean(delays, 0.0))
    for run in runs:
        tokens = [[t for t, _, _ in row] for row in run.compute]
        predicted.append(replay(tokens, _producers(plan, run), work, overhead, delay, cores, lead, tail))
    return SharedPrediction(
        measured_ns=_mean([float(r.step_time_ns) for r in runs], 0.0),
        predicted_ns=_mean(predicted, 0.0),
        work=work,
        overhead_ns=overhead,
        delay_ns=delay,
        setup_ns=setup,
        tail_ns=_mean(tail, 0.0),
        cores=cores,
        steps=len(runs),
    )


def format_shared(p: SharedPrediction) -> str:
    """Human-readable lines for the CLI."""
    ms = 1e6
    return "\n".join([
        f"runtime replay ({'a core per rank' if p.cores is None else f'{p.cores} shared cores'}): "
        + ("core-time" if p.cores else "time") + " (ms) "
        + ", ".join(f"{k}={v / ms:.3f}" for k, v in p.work.items())
        + f", overhead={p.overhead_ns / ms:.3f}, delay={p.delay_ns / ms:.3f}, set-up={p.setup_ns / ms:.3f}, "
        f"tail={p.tail_ns / ms:.3f}",
        f"  predicted step time: {p.predicted_ns / ms:.3f} ms, relative error {100 * p.relative_error:+.1f} %",
    ])


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
