"""The schedules there are, as the C++ registry lists them, and their plans.

Everything that needs to know which schedules exist, how many stage modules a rank of one
holds or how many stages its pipeline has asks here; the registry itself lives beside the
generators (``csrc/schedules/registry.cpp``).
"""
from __future__ import annotations

import operator
from functools import lru_cache
from typing import Any, List

from dualpipe_ext import _C
Plan = _C.Plan
ScheduleInfo = _C.ScheduleInfo

__all__ = ["get_plan", "schedule_info", "schedule_names", "trace"]


def schedule_names() -> List[str]:
    """Names accepted by :func:`get_plan`, in display order."""
    return list(_C.schedule_names())


def check_name(name: Any) -> str:
    """``name`` if it is a str (TypeError naming the registered schedules otherwise)."""
    if not isinstance(name, str):
        raise TypeError(f"a schedule name must be a str, one of {', '.join(schedule_names())}; got "
                        f"{type(name).__name__} {name!r}")
    return name


def check_count(what: str, value: Any) -> int:
    """``value`` as an int (int or ``__index__``; not a bool or a float: 4.5 ranks is a mistake)."""
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an int, got {type(value).__name__} {value!r}") from None


def schedule_info(name: str) -> ScheduleInfo:
    """The registry entry of ``name``: ``summary``, ``modules_per_rank``, ``stages_per_rank`` and
    ``module1`` (what local module 1 is). Raises ``ValueError`` listing the valid names."""
    return _C.schedule_info(check_name(name))


def get_plan(name: str, ranks: int, chunks: int) -> Plan:
    """The full plan of schedule ``name`` for ``ranks`` pipeline ranks and ``chunks`` micro-batches.

    Raises ``ValueError`` with a message naming the valid choices when the request is impossible,
    ``TypeError`` for a name that is not a str or counts that are not ints. Plans are cached;
    treat the returned object as read-only (``get_plan.__wrapped__`` makes a fresh one).
    """
    return _cached_plan(check_name(name), check_count("ranks", ranks), check_count("chunks", chunks))


def _fresh_plan(name: str, ranks: int, chunks: int) -> Plan:
    return _C.make_plan(check_name(name), check_count("ranks", ranks), check_count("chunks", chunks))


_cached_plan = lru_cache(maxsize=64)(_fresh_plan)
get_plan.__wrapped__ = _fresh_plan  # type: ignore[attr-defined]


def trace(name: str, ranks: int, chunks: int) -> List[List[str]]:
    """Per-rank compute tokens of a schedule."""
    return get_plan(name, ranks, chunks).trace()
