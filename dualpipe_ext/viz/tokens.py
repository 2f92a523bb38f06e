"""Parse compute tokens of the schedule trace (``F0.3``, ``B1.2``, ``B1.2z``, ``W``, ``F0.3+B1.1``).

Pure Python so that recorded traces can be read without the C++ core.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Tuple

__all__ = ["Part", "parse_token"]

_SINGLE = re.compile(r"^(F|B)([01])\.(\d+)(z?)$")


@dataclass(frozen=True)
class Part:
    """One computation inside a compute action."""

    # "F" forward, "B" full backward, "Bz" backward for inputs only, "W" backward for weights
    kind: str
    # local module index (0 or 1); -1 for a W whose origin is not known
    module: int
    # micro-batch index within that module; -1 for a W whose origin is not known
    mb: int


def _single(text: str, token: str) -> Part:
    m = _SINGLE.match(text)
    if m is None:
        raise ValueError(
            f"malformed compute token {token!r}: expected F<m>.<c>, B<m>.<c>, B<m>.<c>z, W or F<m>.<c>+B<n>.<d>"
        )
    kind = m.group(1) + m.group(4)
    return Part(kind=kind, module=int(m.group(2)), mb=int(m.group(3)))


def parse_token(token: str) -> Tuple[Part, Optional[Part]]:
    """Split a compute token into its part(s): ``(part, None)`` or, for an overlapped pair, ``(forward, backward)``."""
    if not isinstance(token, str):
        raise ValueError(f"compute token must be a string, got {type(token).__name__}")
    if token == "W":
        return Part("W", -1, -1), None
    if "+" in token:
        left, _, right = token.partition("+")
        f, b = _single(left, token), _single(right, token)
        if f.kind != "F" or b.kind not in ("B", "Bz"):
            raise ValueError(f"malformed overlapped pair {token!r}: expected F<m>.<c>+B<n>.<d>")
        return f, b
    return _single(token, token), None
