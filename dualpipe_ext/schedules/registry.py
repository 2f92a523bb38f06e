"""The schedules there are, as the C++ registry lists them, and their plans.

Everything that needs to know which schedules exist, how many stage modules a rank of one
holds or how many stages its pipeline has asks here; the registry itself lives beside the
generators (``csrc/schedules/registry.cpp``).
"""
from __future__ import annotations

from functools import lru_cache
from typing import List

from dualpipe_ext import _C
Plan = _C.Plan
ScheduleInfo = _C.ScheduleInfo

__all__ = ["get_plan", "schedule_info", "schedule_names", "trace"]


def schedule_names() -> List[str]:
    """Names accepted by :func:`get_plan`, in display order."""
    return list(_C.schedule_names())


def schedule_info(name: str) -> ScheduleInfo:
    """The registry entry of ``name``: ``summary``, ``modules_per_rank``, ``stages_per_rank`` and
    ``module1`` (what local module 1 is). Raises ``ValueError`` listing the valid names."""
    return _C.schedule_info(name)


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
