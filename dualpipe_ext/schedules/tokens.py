"""Reading action tokens: the one parser is the C++ core's (``Action.parse``, csrc/plan/action.cpp).

Compute tokens (``F0.3``, ``B1.2``, ``B1.2z``, ``W``, ``F0.3+B1.1``) are split here into the
computations they hold, for the code that reads timelines (pictures, predictions); the
language they accept is exactly what ``Action.parse`` accepts and ``str(action)`` prints.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Tuple

from dualpipe_ext import _C  # one line saying how to build it, when it is not built
Action = _C.Action
ActionType = _C.ActionType

__all__ = ["BACKWARD", "BACKWARD_INPUT", "FORWARD", "KINDS", "WEIGHT", "Part", "compute_parts", "parse_action"]

_COMPUTE_FORMS = "F<m>.<c>, B<m>.<c>, B<m>.<c>z, W or F<m>.<c>+B<n>.<d>"
# A part's kind is its action type's name in lower case: one name per kind of computation.
FORWARD, BACKWARD, BACKWARD_INPUT, WEIGHT = "forward", "backward", "backward_input", "weight"
KINDS = (FORWARD, BACKWARD, BACKWARD_INPUT, WEIGHT)
_KIND = {ActionType.FORWARD: FORWARD, ActionType.BACKWARD: BACKWARD, ActionType.BACKWARD_INPUT: BACKWARD_INPUT,
         ActionType.WEIGHT: WEIGHT}


@dataclass(frozen=True)
class Part:
    """One computation inside a compute action."""

    # one of KINDS: "forward", "backward" (input and weight gradients), "backward_input" (input
    # gradients; the weight work is queued for a later W), "weight" (a queued weight-gradient batch)
    kind: str
    # local module index; -1 for a W, whose origin the token does not say
    module: int
    # micro-batch index within that module; -1 for a W
    mb: int


def parse_action(text: str) -> Action:
    """The action a token names (compute or communication); ``ValueError`` when it names none."""
    if not isinstance(text, str):
        raise ValueError(f"an action token must be a string, got {type(text).__name__}")
    return Action.parse(text)


@lru_cache(maxsize=4096)
def compute_parts(token: str) -> Tuple[Part, Optional[Part]]:
    """Split a compute token: ``(part, None)``, or ``(forward, backward)`` for an overlapped pair."""
    try:
        a = parse_action(token)
    except ValueError:
        if isinstance(token, str) and "+" in token:
            raise ValueError(f"malformed overlapped pair {token!r}: expected F<m>.<c>+B<n>.<d>") from None
        raise ValueError(f"malformed compute token {token!r}: expected {_COMPUTE_FORMS}") from None
    if a.type == ActionType.FORWARD_BACKWARD:
        return Part(FORWARD, a.module, a.mb), Part(BACKWARD, a.module2, a.mb2)
    kind = _KIND.get(a.type)
    if kind is None:
        raise ValueError(f"malformed compute token {token!r}: a communication action; expected {_COMPUTE_FORMS}")
    return Part(kind, a.module, a.mb), None
