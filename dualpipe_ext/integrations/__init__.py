"""Bridges to other libraries; each loads its library on first use.

    from dualpipe_ext.integrations import replace_moe, pipeline_stages, causal_lm_loss  # transformers

Importing this package imports nothing heavy: ``hf`` (and with it transformers) loads when
one of its names is first used.
"""
from __future__ import annotations

import importlib
from typing import Any

# public name -> module that defines it
_EXPORTS = {
    "replace_moe": "dualpipe_ext.integrations.hf",
    "pipeline_stages": "dualpipe_ext.integrations.hf",
    "causal_lm_loss": "dualpipe_ext.integrations.hf",
    "CausalLMStage": "dualpipe_ext.integrations.hf",
    "overlap_stages": "dualpipe_ext.integrations.hf",
    "HFLayer": "dualpipe_ext.integrations.hf",
}

__all__ = sorted(_EXPORTS) + ["hf"]


def __getattr__(name: str) -> Any:
    if name == "hf":
        return importlib.import_module("dualpipe_ext.integrations.hf")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dualpipe_ext.integrations' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__():
    return __all__
