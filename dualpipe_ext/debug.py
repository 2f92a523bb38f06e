"""Debug mode and a counter of host reads of tensor values.

On a GPU every read of a tensor value on the host (``.item()``, ``.tolist()``, ``bool(t)``,
boolean-mask indexing, ...) waits for the device queue to drain, so communication can no
longer hide behind computation. The hot path of the package makes none; checks that must
read values run only in debug mode (``DUALPIPE_EXT_CHECKS=1``).

``HostReadCounter`` records such calls made from the package's own files, so a test (or a
user profiling their model) can assert that a region makes none::

    with HostReadCounter() as reads:
        loss = model(x).sum(); loss.backward()
    assert not reads.calls, reads.report()
"""
from __future__ import annotations

import os
import sys
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch.overrides import TorchFunctionMode

from dualpipe_ext.kernels._common import checks_enabled

__all__ = ["checks_enabled", "HostReadCounter"]

_PACKAGE_DIRS = tuple(os.path.dirname(os.path.abspath(p)) + os.sep for p in (
    os.path.join(os.path.dirname(__file__), "__init__.py"),
))


def _kernels_dir() -> Optional[str]:
    try:
        import dualpipe_ext.kernels as k
    except ImportError:
        return None
    return os.path.dirname(os.path.abspath(k.__file__)) + os.sep


# Calls whose result is a tensor value on the host, or whose output shape depends on
# tensor values (the device must finish before the host can allocate the result).
_READS = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero", "argwhere",
          "masked_select", "bincount", "unique", "unique_consecutive", "equal", "allclose", "__format__", "__repr__"}


def _is_bool_mask(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _name(func) -> str:
    return getattr(func, "__name__", str(func))


def _is_read(func, args, kwargs) -> bool:
    name = _name(func)
    if name in _READS:
        return True
    if name in ("__getitem__", "__setitem__", "index_put_", "index_put") and len(args) > 1:
        return _is_bool_mask(args[1]) if name != "index_put_" and name != "index_put" else _is_bool_mask(tuple(args[1]))
    if name == "repeat_interleave":
        return (kwargs or {}).get("output_size") is None and isinstance(args[1] if len(args) > 1 else None,
                                                                      torch.Tensor)
    if name == "where" and len(args) == 1 and not kwargs:
        return True
    if name == "to":  # a device tensor copied to the host
        dev = (kwargs or {}).get("device", args[1] if len(args) > 1 else None)
        if isinstance(dev, (str, torch.device)) and torch.device(dev).type == "cpu":
            return isinstance(args[0], torch.Tensor) and args[0].device.type != "cpu"
    return False


class HostReadCounter(TorchFunctionMode):
    """Records host reads of tensor values made from the files of ``dirs`` (default: the package).

    ``calls``: one ``(function name, "file:line")`` per read, in order.
    """

    def __init__(self, dirs: Optional[Sequence[str]] = None) -> None:
        super().__init__()
        if dirs is None:
            kernels = _kernels_dir()
            dirs = _PACKAGE_DIRS + ((kernels,) if kernels else ())
        self.dirs = tuple(dirs)
        self.calls: List[Tuple[str, str]] = []

    def _caller(self) -> Optional[str]:
        frame = sys._getframe(2)
        torch_dir = os.path.dirname(torch.__file__) + os.sep
        while frame is not None and frame.f_code.co_filename.startswith(torch_dir):
            frame = frame.f_back
        if frame is None:
            return None
        path = os.path.abspath(frame.f_code.co_filename)
        if path.startswith(self.dirs) and not path.endswith(os.sep + "debug.py"):
            return f"{path}:{frame.f_lineno}"
        return None

    def __torch_function__(self, func: Callable, types, args=(), kwargs=None):
        if _is_read(func, args, kwargs):
            where = self._caller()
            if where is not None:
                self.calls.append((_name(func), where))
        return func(*args, **(kwargs or {}))

    def report(self) -> str:
        """The recorded reads, one per line."""
        return "\n".join(f"{name} at {where}" for name, where in self.calls) or "no host reads"
