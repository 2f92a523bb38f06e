"""Validation and simulation of schedule plans (thin wrappers over the C++ core).

``validate(plan)`` proves a plan sound before it runs: sends and receives match in order
and identity, nothing deadlocks under the runtime's blocking ``wait`` (post the queued
batch, block until the peer has posted every matching operation), every computation has
its inputs, and every micro-batch is forwarded and backwarded exactly once.

``simulate(plan, costs)`` runs the plan event by event. By default a ``wait`` is a
rendezvous: it completes once every operation of its batch is matched by a posted peer
operation, and received data arrive ``P2P`` after both sides posted. ``eager_comm=True``
runs communication as the gloo runtime does (receives posted ahead, sends completing in
the background): a send never blocks, and a receive completes ``P2P`` after the sender
posted the ``wait`` carrying the matching send. ``Costs.overhead`` is a per-action
bookkeeping time added before every compute action of a rank but its first, after any
waiting in between (it counts as idle time, not as ``busy``).
``start[r]`` is when rank ``r`` begins its program and ``tail[r]`` the time it spends after
its last action. What it reports:

- ``makespan``: max over ranks of (end of the rank's last action + ``tail``).
- ``busy[r]``: total compute time of rank ``r``; ``bubble[r] = makespan - busy[r]``, the
  idle time of rank ``r``. Every rank of GPipe, 1F1B, ZB-H1, DualPipe and DualPipeV does
  the same amount of work, so their bubbles are equal across ranks and match the DualPipe
  README's "Bubble" column (see ``closed_form_bubble`` for when exactly).
- ``peak_activations[r]``: the most micro-batch activations alive at once on rank ``r``,
  counted in units of one micro-batch through one stage. A forward's activations live from
  its start until the end of its backward (the input-gradient part for ``B..z``); an
  overlapped ``F+B`` pair holds both at once. This reproduces the README's "Activation per
  device": ``PP`` for 1F1B and ZB1P, ``PP + 1`` for DualPipe and DualPipeV.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Sequence

from dualpipe_ext import _C

__all__ = ["Costs", "PlanError", "Simulation", "TimedAction", "closed_form_bubble", "simulate", "validate"]


_COST_FIELDS = ("F", "B", "W", "FB", "P2P", "overhead")
_CORE_DEFAULTS = _C.Costs()  # the defaults are the C++ cost model's (csrc/plan/costs.h), written once there


@dataclass(frozen=True)
class Costs:
    """Durations of the actions of a plan, in any one time unit.

    The defaults are the C++ core's (``_C.Costs()``): a backward that costs twice a forward,
    half of it weight gradients, and an overlapped pair that saves nothing (``FB = F + B``).
    The values are checked by the C++ core's own check (finite, non-negative, ``W <= B``),
    the one the simulator runs.
    """

    F: float = _CORE_DEFAULTS.F  # forward chunk
    B: float = _CORE_DEFAULTS.B  # backward chunk (input and weight gradients); a backward input (B..z) costs B - W
    W: float = _CORE_DEFAULTS.W  # weight part of a backward
    FB: float = _CORE_DEFAULTS.FB  # overlapped forward+backward pair
    P2P: float = _CORE_DEFAULTS.P2P  # from a send posted (rendezvous: and its receive) to the data being usable
    overhead: float = _CORE_DEFAULTS.overhead  # added before each compute action of a rank but its first

    def __post_init__(self) -> None:
        for name in _COST_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"Costs.{name} must be a number, got {value!r}")
        self._c()  # raises ValueError naming the cost that is out of range

    @classmethod
    def parse(cls, text: str) -> "Costs":
        """``"F,B,W,FB,P2P"`` (five numbers, as the command line takes them) -> ``Costs``.

        Raises ``ValueError`` saying what is expected, or which cost is out of range.
        """
        fields = _COST_FIELDS[:5]
        expected = f"--costs {text!r}: expected five comma-separated numbers F,B,W,FB,P2P, e.g. 1,2,1,3,0"
        parts = text.split(",")
        if len(parts) != len(fields):
            raise ValueError(expected)
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise ValueError(expected) from None
        try:
            return cls(**dict(zip(fields, values)))
        except ValueError as e:
            raise ValueError(f"--costs {text!r}: {e}") from None

    def _c(self) -> "_C.Costs":
        return _C.Costs(**{name: float(getattr(self, name)) for name in _COST_FIELDS})


class TimedAction(NamedTuple):
    """When one compute action ran: the entries of every timeline (simulated, recorded, drawn)."""

    token: str  # the action's trace token: "F0.3", "B1.2z", "W", "F0.3+B1.1"
    start: float
    end: float


@dataclass(frozen=True)
class Simulation:
    """What :func:`simulate` measured; lists are indexed by pipeline rank."""

    makespan: float  # max over ranks of (end of its last action + tail)
    timeline: List[List[TimedAction]]  # per rank: each compute action, in program order
    busy: List[float]  # compute time per rank
    bubble: List[float]  # makespan - busy, per rank
    peak_activations: List[int]  # most live micro-batch activations per rank (units of one stage)


class PlanError(ValueError):
    """An unsound plan: the broken ``rule`` and the first offending action (``rank``, ``step``, ``token``;
    -1, -1, "" when the rule names no action). The message has the rank-by-step grid."""

    def __init__(self, message: str, rule: str, rank: int, step: int, token: str) -> None:
        super().__init__(message)
        self.rule, self.rank, self.step, self.token = rule, rank, step, token


def validate(plan: "_C.Plan") -> None:
    """Raise :class:`PlanError` (a ``ValueError``) naming the broken rule and the first offending action,
    with a rank-by-step grid marking the failing cells. The order of the checks, which decides which
    action is first, is in ``csrc/analysis/validate.h``."""
    if not isinstance(plan, _C.Plan):
        raise TypeError(f"validate expects a dualpipe_ext.schedules.Plan, got {type(plan).__name__}")
    issue = _C.check_plan(plan)
    if issue is not None:
        raise PlanError(issue.message, issue.rule, issue.rank, issue.step, issue.token)


def _floats(values: Optional[Sequence[float]]) -> List[float]:
    """Per-rank edges for the C++ simulator, which checks their number and range."""
    return [] if values is None else [float(v) for v in values]


def simulate(plan: "_C.Plan", costs: Costs = Costs(), *, eager_comm: bool = False,
             start: Optional[Sequence[float]] = None, tail: Optional[Sequence[float]] = None) -> Simulation:
    """Validate ``plan`` and simulate it under ``costs`` (see the module docstring for what is reported).

    ``eager_comm``: run communication as the gloo runtime does instead of as rendezvous
    waits. ``start``/``tail``: per rank, when its program begins and how long it spends after
    its last action (default zeros).
    """
    if not isinstance(plan, _C.Plan):
        raise TypeError(f"simulate expects a dualpipe_ext.schedules.Plan, got {type(plan).__name__}")
    if not isinstance(costs, Costs):
        raise TypeError(f"costs must be dualpipe_ext.schedules.Costs, got {type(costs).__name__}")
    res = _C.simulate(plan, costs._c(), eager_comm=bool(eager_comm), start=_floats(start), tail=_floats(tail))
    tokens = plan.trace()  # compute actions in program order, as the timeline lists them
    timeline = [[TimedAction(tokens[r][i], t.start, t.end) for i, t in enumerate(row)]
                for r, row in enumerate(res.timeline)]
    return Simulation(
        makespan=res.makespan,
        timeline=timeline,
        busy=list(res.busy),
        bubble=list(res.bubble),
        peak_activations=list(res.peak_activations),
    )


def closed_form_bubble(name: str, ranks: int, costs: Costs = Costs()) -> float:
    """The DualPipe README's bubble formula for schedule ``name`` on ``ranks`` pipeline ranks.

    ``PP`` is the number of stages of one pipeline: ``ranks`` for GPipe, 1F1B, ZB1P and
    DualPipe, ``2 * ranks`` for DualPipeV. GPipe: (PP-1)(F+B); 1F1B: (PP-1)(F+B); ZB1P:
    (PP-1)(F+B-2W); DualPipe and DualPipeV: (PP/2-1)(FB+B-3W). The formulas live in the C++
    schedule registry beside the generators; the simulator reproduces them with ``P2P = 0``
    (see tests/schedules/test_bubbles.py for the exact conditions).
    """
    from dualpipe_ext.schedules.registry import check_count, check_name

    if not isinstance(costs, Costs):
        raise TypeError(f"costs must be dualpipe_ext.schedules.Costs, got {type(costs).__name__}")
    return _C.closed_form_bubble(check_name(name), check_count("ranks", ranks), costs._c())
