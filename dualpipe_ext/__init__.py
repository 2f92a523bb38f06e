"""dualpipe-ext: DualPipe and DualPipeV pipeline schedules, MoE dispatch/combine, overlap.

Heavy or optional parts (Triton kernels, the CUDA extension) load on first use.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "get_plan": "dualpipe_ext.schedules",
    "schedule_names": "dualpipe_ext.schedules",
    "DualPipe": "dualpipe_ext.runtime",
    "DualPipeV": "dualpipe_ext.runtime",
    "PipelineSchedule": "dualpipe_ext.runtime",
    "PipelineError": "dualpipe_ext.runtime",
    "RuntimeConfig": "dualpipe_ext.runtime",
    "Recorder": "dualpipe_ext.runtime",
    "set_p2p_tensor_shapes": "dualpipe_ext.comm",
    "set_p2p_tensor_dtype": "dualpipe_ext.comm",
    "WeightGradStore": "dualpipe_ext.utils",
}

# subpackages loaded on first attribute access
_SUBMODULES = ("moe", "overlap", "integrations")

__all__ = sorted(_EXPORTS) + list(_SUBMODULES) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"dualpipe_ext.{name}")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dualpipe_ext' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
