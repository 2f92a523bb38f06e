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
_SUBMODULES = ("moe", "overlap", "integrations", "schedules", "runtime", "viz", "checkpoint", "graphs")

__all__ = sorted(_EXPORTS) + list(_SUBMODULES) + ["__version__"]


_CORE_MISSING = ("dualpipe_ext._C, the C++ core that plans and checks schedules, is not built: pip install -e . "
                 "(needs a C++17 compiler; torch is not needed to build it)")


def __getattr__(name: str) -> Any:
    if name == "_C":  # reached only while the extension is not imported yet (or not built)
        try:
            return importlib.import_module("dualpipe_ext._C")
        except ModuleNotFoundError as e:
            if e.name != "dualpipe_ext._C":
                raise
            raise ImportError(_CORE_MISSING) from None
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
