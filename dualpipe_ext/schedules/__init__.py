"""Pipeline schedules as data: plans generated, validated and simulated by the C++ core.

A plan lists, for every pipeline rank, its compute actions (``F0.3``, ``B1.2z``, ``W``,
``F0.3+B1.1``) and its communication (``sendF0.3>1``, ``recvB1.2<0``, ``wait``). The
runtime executes whatever plan it is given; see ``shared/spec/schedule-trace.md`` for the
trace notation.
"""
from __future__ import annotations

from functools import lru_cache
from typing import List

from dualpipe_ext import _C
from dualpipe_ext._C import Action, ActionType, Plan, StageInfo
from dualpipe_ext.schedules.analysis import Costs, Simulation, closed_form_bubble, simulate, validate

__all__ = [
    "Action",
    "ActionType",
    "Costs",
    "Plan",
    "Simulation",
    "StageInfo",
    "closed_form_bubble",
    "get_plan",
    "schedule_names",
    "simulate",
    "trace",
    "validate",
]


def schedule_names() -> List[str]:
    """Names accepted by :func:`get_plan`."""
    return list(_C.schedule_names())


@lru_cache(maxsize=64)
def get_plan(name: str, ranks: int, chunks: int) -> Plan:
    """The full plan of schedule ``name`` for ``ranks`` pipeline ranks and ``chunks`` micro-batches.

    Raises ``ValueError`` with a message naming the valid choices when the request is impossible.
    Plans are cached; treat the returned object as read-only.
    """
    return _C.make_plan(name, int(ranks), int(chunks))


def trace(name: str, ranks: int, chunks: int) -> List[List[str]]:
    """Per-rank compute tokens of a schedule."""
    return get_plan(name, ranks, chunks).trace()
