"""Pipeline schedules as data: plans generated, validated and simulated by the C++ core.

A plan lists, for every pipeline rank, its compute actions (``F0.3``, ``B1.2z``, ``W``,
``F0.3+B1.1``) and its communication (``sendF0.3>1``, ``recvB1.2<0``, ``wait``). The
runtime executes whatever plan it is given; see ``docs/schedule-trace.md`` for the
trace notation. What is here:

- :mod:`~dualpipe_ext.schedules.registry`: the schedules there are and their plans;
- :mod:`~dualpipe_ext.schedules.analysis`: ``Costs``, ``validate``, ``simulate``, ``closed_form_bubble``;
- :mod:`~dualpipe_ext.schedules.tokens`: reading action tokens (the C++ parser);
- :mod:`~dualpipe_ext.schedules.compare`: every schedule at one size, as a table;
- :mod:`~dualpipe_ext.schedules.predict`: a recorded step's time, predicted by the simulator.
"""
from __future__ import annotations

from dualpipe_ext import _C  # one line saying how to build it, when it is not built
Action = _C.Action
ActionType = _C.ActionType
Plan = _C.Plan
ScheduleInfo = _C.ScheduleInfo
StageInfo = _C.StageInfo
from dualpipe_ext.schedules.analysis import (Costs, PlanError, Simulation, TimedAction, closed_form_bubble, simulate,
                                             validate)
from dualpipe_ext.schedules.registry import get_plan, schedule_info, schedule_names, trace

__all__ = [
    "Action",
    "ActionType",
    "Costs",
    "Plan",
    "PlanError",
    "ScheduleInfo",
    "Simulation",
    "StageInfo",
    "TimedAction",
    "closed_form_bubble",
    "get_plan",
    "schedule_info",
    "schedule_names",
    "simulate",
    "trace",
    "validate",
]
