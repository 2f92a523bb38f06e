"""The component plan of overlapped runs, from the C++ core.

    >>> print(format_plan(component_plan(1)))     # a forward and a backward run of one layer
    issue combine.B0 under attn.F0
    attn.F0
    ...

A plan interleaves runs (``_C.RunSpec``: a forward or backward chunk of a stage, its layers,
prologue, epilogue and shared experts). Steps are ``_C.OverlapStep`` objects: ``kind``
(COMPUTE, ISSUE, WAIT), ``component`` (ATTN, SHARED, MLP, DISPATCH, COMBINE, PROLOGUE,
EPILOGUE), ``pass_`` (F, B, W), ``run``, ``layer`` and, for issues, ``under``: the indices of
the compute steps that run while the exchange is in flight.
"""
from __future__ import annotations

from functools import lru_cache
from typing import List, Sequence, Tuple, Union

from dualpipe_ext import _C

__all__ = ["component_plan", "sequential_plan", "deepseek_plan", "validate_plan", "format_plan", "exposed_comm",
           "pair_runs"]

Runs = Union[int, Sequence["_C.RunSpec"]]


def pair_runs(num_layers: int) -> List["_C.RunSpec"]:
    """A forward run and a backward run of ``num_layers`` layers: a DualPipe pair of plain stages."""
    if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
    return [_C.RunSpec(False, num_layers), _C.RunSpec(True, num_layers)]


def _specs(runs: Runs) -> List["_C.RunSpec"]:
    return pair_runs(runs) if isinstance(runs, int) else list(runs)


def _key(specs: Sequence["_C.RunSpec"]) -> Tuple:
    return tuple((s.backward, s.num_layers, s.prologue, s.epilogue, s.shared) for s in specs)


def _core_costs(costs) -> "_C.PlanCosts":
    if costs is None:
        return _C.PlanCosts()
    return costs if isinstance(costs, _C.PlanCosts) else costs.to_core()


@lru_cache(maxsize=256)
def _plan(key: Tuple, costs: Tuple, max_in_flight: int) -> Tuple["_C.OverlapStep", ...]:
    specs = [_C.RunSpec(*k) for k in key]
    steps = _C.overlap_plan(specs, _C.PlanCosts(*costs), max_in_flight)
    errors = _C.validate_overlap_plan(steps, specs, max_in_flight)
    if errors:  # the generator and the checker disagree: a bug in the core
        raise RuntimeError("overlap plan for %s is unsound: %s" % (specs, "; ".join(errors)))
    return tuple(steps)


# An exchange's duration is the least certain cost: it grows with the load and the link. Plans
# are made for the configured duration and for longer ones; the plan kept exposes the least at
# the configured duration, then at each longer one in turn.
_COMM_SCALES = (1.0, 1.5, 2.0, 3.0, 4.0)
_JUDGED_AT = (1.0, 1.5, 2.0, 3.0)


@lru_cache(maxsize=256)
def _robust_plan(key: Tuple, costs: Tuple, max_in_flight: int) -> Tuple["_C.OverlapStep", ...]:
    specs = [_C.RunSpec(*k) for k in key]
    *compute, comm = costs

    def exposure(steps, scale: float) -> float:
        return _C.exposed_comm(list(steps), specs, _C.PlanCosts(*compute, comm * scale))

    candidates = [_plan(key, (*compute, comm * scale), max_in_flight) for scale in _COMM_SCALES]
    return min(candidates, key=lambda steps: tuple(round(exposure(steps, f), 9) for f in _JUDGED_AT))


def component_plan(runs: Runs, costs=None, max_in_flight: int = 2) -> List["_C.OverlapStep"]:
    """The checked, interleaved step list of ``runs`` (an int: a forward+backward pair of that many layers).

    ``costs``: an ``overlap.ComponentCosts`` (or ``_C.PlanCosts``); ``max_in_flight``: exchanges
    of each shape in flight at once. Of the core's plans for ``costs`` and for exchanges 1.5 to
    4 times as long, the one that exposes the least communication under ``costs`` (then under
    ever longer exchanges): never worse at the configured costs, and robust to slower links.
    """
    c = _core_costs(costs)
    key = (c.attn, c.mlp, c.shared, c.prologue, c.epilogue, c.comm)
    return list(_robust_plan(_key(_specs(runs)), key, int(max_in_flight)))


def sequential_plan(runs: Runs) -> List["_C.OverlapStep"]:
    """Each run's components one after another, every exchange waited for as soon as it is issued."""
    out: List["_C.OverlapStep"] = []
    for i, spec in enumerate(_specs(runs)):
        steps = _plan(_key([spec]), (1.0, 1.0, 0.5, 1.0, 1.0, 1.0), 0)
        waits = {(s.component, s.pass_, s.layer): s for s in steps if s.kind == _C.StepKind.WAIT}
        for s in steps:
            if s.kind == _C.StepKind.WAIT:
                continue
            out.append(_C.OverlapStep(s.kind, s.component, s.pass_, s.layer, [], i))
            if s.kind == _C.StepKind.ISSUE:
                w = waits[(s.component, s.pass_, s.layer)]
                out.append(_C.OverlapStep(w.kind, w.component, w.pass_, w.layer, [], i))
    return out


def deepseek_plan(num_layers: int) -> List["_C.OverlapStep"]:
    """DeepSeek-V3's published per-layer order for a forward+backward pair of ``num_layers`` layers."""
    return list(_C.deepseek_plan(num_layers))


def validate_plan(steps: Sequence["_C.OverlapStep"], runs: Runs, max_in_flight: int = 0) -> List[str]:
    """Every dependency or pairing rule ``steps`` breaks, in words (empty: sound)."""
    return list(_C.validate_overlap_plan(list(steps), _specs(runs), max_in_flight))


def exposed_comm(steps: Sequence["_C.OverlapStep"], runs: Runs, costs=None) -> float:
    """Time the computation waits for exchanges under the plan's cost model."""
    return _C.exposed_comm(list(steps), _specs(runs), _core_costs(costs))


def format_plan(steps: Sequence["_C.OverlapStep"]) -> str:
    """One line per step; issues name the computation they run under."""
    steps = list(steps)
    return "\n".join(_C.describe_overlap_step(steps, i) for i in range(len(steps)))
