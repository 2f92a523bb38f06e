"""Argument checks shared by the public API: each raises an error that says what was expected.

Only types and metadata (shapes, dtypes, devices, group membership) are read here, never a
tensor value, so the checks cost nothing on a GPU's hot path.
"""
from __future__ import annotations

import operator
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ["check_bool", "check_group", "check_int", "check_module", "check_number", "check_path", "check_tensor",
           "type_name"]


def type_name(value: Any) -> str:
    return type(value).__name__


def check_int(what: str, value: Any, minimum: Optional[int] = None) -> int:
    """``value`` as an int (an int, or anything with ``__index__``; not a bool or a float)."""
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an int, got {value!r}")
    try:
        n = operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an int, got {type_name(value)} {value!r}") from None
    if minimum is not None and n < minimum:
        raise ValueError(f"{what} must be at least {minimum}, got {n}")
    return n


def check_number(what: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number, got {type_name(value)} {value!r}")
    return float(value)


def check_bool(what: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{what} must be True or False, got {type_name(value)} {value!r}")
    return value


def check_module(what: str, value: Any) -> torch.nn.Module:
    if not isinstance(value, torch.nn.Module):
        raise TypeError(f"{what} must be a torch.nn.Module (a pipeline stage), got {type_name(value)}")
    return value


def check_path(what: str, value: Any) -> str:
    import os

    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{what} must be a file path (str or os.PathLike), got {type_name(value)} {value!r}")
    return os.fspath(value)


def check_tensor(what: str, value: Any, *, ndim: Optional[int] = None,
                 dtypes: Optional[Sequence[torch.dtype]] = None) -> torch.Tensor:
    """``value`` as a tensor: ``TypeError`` unless it is a ``torch.Tensor``, ``ValueError`` unless it
    has ``ndim`` dimensions and one of ``dtypes`` (each when given). The one check of a tensor
    argument, the kernels' included; it reads metadata only."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type_name(value)}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{what} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        names = ", ".join(str(d) for d in dtypes)
        raise ValueError(f"{what} must have dtype in ({names}), got {value.dtype}")
    return value


def check_group(what: str, group: Any, required: bool = False):
    """``group``: None (the default group) or a ``ProcessGroup`` this process belongs to; with
    ``required``, torch.distributed must be initialised. Returns the group (None stays None)."""
    if group is not None and not isinstance(group, dist.ProcessGroup):
        if group is dist.GroupMember.NON_GROUP_MEMBER:
            raise ValueError(f"{what}: this process (global rank {dist.get_rank()}) is not a member of the process "
                             f"group (dist.new_group returns a placeholder on the ranks it leaves out)")
        raise TypeError(f"{what} must be a torch.distributed ProcessGroup (from dist.new_group) or None for the "
                        f"default group, got {type_name(group)} {group!r}")
    if (group is not None or required) and not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"{what}: torch.distributed is not initialised: call dist.init_process_group(...) first")
    if group is not None and dist.get_rank(group) < 0:
        raise ValueError(f"{what}: this process (global rank {dist.get_rank()}) is not a member of the process group "
                         f"(ranks {dist.get_process_group_ranks(group)})")
    return group
