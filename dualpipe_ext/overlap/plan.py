"""The component plan of an overlapped forward+backward pair, from the C++ core.

    >>> print(format_plan(component_plan(1)))
    issue combine.B0 under attn.F0
    attn.F0
    ...

Steps are ``_C.OverlapStep`` objects: ``kind`` (COMPUTE, ISSUE, WAIT), ``component``
(ATTN, MLP, DISPATCH, COMBINE), ``pass_`` (F, B, W), ``layer`` and, for issues, ``under``:
the indices of the compute steps that run while the communication is in flight.
"""
from __future__ import annotations

from functools import lru_cache
from typing import List, Sequence, Tuple

from dualpipe_ext import _C

__all__ = ["component_plan", "validate_plan", "format_plan"]


@lru_cache(maxsize=64)
def _plan(num_layers: int) -> Tuple["_C.OverlapStep", ...]:
    steps = _C.overlap_plan(num_layers)
    errors = _C.validate_overlap_plan(steps, num_layers)
    if errors:  # the generator and the checker disagree: a bug in the core
        raise RuntimeError("overlap plan for %d layers is unsound: %s" % (num_layers, "; ".join(errors)))
    return tuple(steps)


def component_plan(num_layers: int) -> List["_C.OverlapStep"]:
    """The checked step list for a pair of stages of ``num_layers`` MoE layers each."""
    if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
    return list(_plan(num_layers))


def validate_plan(steps: Sequence["_C.OverlapStep"], num_layers: int) -> List[str]:
    """Every dependency or pairing rule ``steps`` breaks, in words (empty: sound)."""
    return list(_C.validate_overlap_plan(list(steps), num_layers))


def format_plan(steps: Sequence["_C.OverlapStep"]) -> str:
    """One line per step; issues name the computation they run under."""
    steps = list(steps)
    return "\n".join(_C.describe_overlap_step(steps, i) for i in range(len(steps)))
