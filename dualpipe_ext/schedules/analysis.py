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
from typing import List, Optional, Sequence, Tuple

from dualpipe_ext import _C

__all__ = ["Costs", "Simulation", "closed_form_bubble", "simulate", "validate"]


@dataclass(frozen=True)
class Costs:
    """Durations of the actions of a plan, in any one time unit.

    The defaults model a backward that costs twice a forward, half of it weight gradients,
    and an overlapped pair that saves nothing (``FB = F + B``).
    """

    F: float = 1.0  # forward chunk
    B: float = 2.0  # full backward chunk (input and weight gradients); B..z costs B - W
    W: float = 1.0  # weight-gradient part of a backward
    FB: float = 3.0  # overlapped forward+backward pair
    P2P: float = 0.0  # from a send posted (rendezvous: and its receive) to the data being usable
    overhead: float = 0.0  # added before each compute action of a rank but its first (runtime bookkeeping)

    def __post_init__(self) -> None:
        for name in ("F", "B", "W", "FB", "P2P", "overhead"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
                raise ValueError(f"Costs.{name} must be a finite non-negative number, got {value!r}")
        if self.W > self.B:
            raise ValueError(f"Costs.W ({self.W:g}) is part of the full backward and cannot exceed Costs.B ({self.B:g})")

    def _c(self) -> "_C.Costs":
        return _C.Costs(F=float(self.F), B=float(self.B), W=float(self.W), FB=float(self.FB), P2P=float(self.P2P),
                        overhead=float(self.overhead))


@dataclass(frozen=True)
class Simulation:
    """What :func:`simulate` measured; lists are indexed by pipeline rank."""

    makespan: float  # max over ranks of (end of its last action + tail)
    timeline: List[List[Tuple[str, float, float]]]  # per rank: (trace token, start, end) of each compute action
    busy: List[float]  # compute time per rank
    bubble: List[float]  # makespan - busy, per rank
    peak_activations: List[int]  # most live micro-batch activations per rank (units of one stage)


def validate(plan: "_C.Plan") -> None:
    """Raise ``ValueError`` naming the broken rule, with a rank-by-step grid marking the failing cells."""
    _C.validate(plan)


def _edges(name: str, values: Optional[Sequence[float]], ranks: int) -> List[float]:
    if values is None:
        return []
    values = list(values)
    if len(values) != ranks:
        raise ValueError(f"{name} needs one value per rank ({ranks}), got {len(values)}")
    for r, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or v == float("inf"):
            raise ValueError(f"{name}[{r}] must be a finite non-negative number, got {v!r}")
    return [float(v) for v in values]


def simulate(plan: "_C.Plan", costs: Costs = Costs(), *, eager_comm: bool = False,
             start: Optional[Sequence[float]] = None, tail: Optional[Sequence[float]] = None) -> Simulation:
    """Validate ``plan`` and simulate it under ``costs`` (see the module docstring for what is reported).

    ``eager_comm``: run communication as the gloo runtime does instead of as rendezvous
    waits. ``start``/``tail``: per rank, when its program begins and how long it spends after
    its last action (default zeros).
    """
    if not isinstance(costs, Costs):
        raise TypeError(f"costs must be dualpipe_ext.schedules.Costs, got {type(costs).__name__}")
    res = _C.simulate(plan, costs._c(), eager_comm=bool(eager_comm), start=_edges("start", start, plan.ranks),
                      tail=_edges("tail", tail, plan.ranks))
    tokens = plan.trace()  # compute actions in program order, as the timeline lists them
    timeline = [
        [(tok, start, end) for tok, (_, start, end) in zip(tokens[r], row)] for r, row in enumerate(res.timeline)
    ]
    return Simulation(
        makespan=res.makespan,
        timeline=timeline,
        busy=list(res.busy),
        bubble=list(res.bubble),
        peak_activations=list(res.peak_activations),
    )


def closed_form_bubble(name: str, ranks: int, costs: Costs = Costs()) -> float:
    """The DualPipe README's bubble formula for schedule ``name`` on ``ranks`` pipeline ranks.

    ``PP`` is the number of pipeline stages: ``ranks`` for GPipe, 1F1B, ZB1P and DualPipe,
    ``2 * ranks`` for DualPipeV. GPipe: (PP-1)(F+B); 1F1B: (PP-1)(F+B); ZB1P:
    (PP-1)(F+B-2W); DualPipe and DualPipeV: (PP/2-1)(F&B+B-3W). The simulator reproduces
    these with ``P2P = 0`` (see tests/schedules/test_bubbles.py for the exact conditions).
    """
    if ranks < 1:
        raise ValueError(f"ranks must be at least 1, got {ranks}")
    c = costs
    if name in ("gpipe", "1f1b"):
        return (ranks - 1) * (c.F + c.B)
    if name == "zb1p":
        return (ranks - 1) * (c.F + c.B - 2 * c.W)
    if name == "dualpipe":
        if ranks % 2:
            raise ValueError(f"dualpipe needs an even number of ranks, got {ranks}")
        return (ranks / 2 - 1) * (c.FB + c.B - 3 * c.W)
    if name == "dualpipev":
        return (ranks - 1) * (c.FB + c.B - 3 * c.W)
    raise ValueError(f"no closed-form bubble for schedule {name!r}: expected gpipe, 1f1b, zb1p, dualpipe or dualpipev")
