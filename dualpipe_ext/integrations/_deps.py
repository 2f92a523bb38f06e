"""The optional libraries of the integrations, imported with a one-line error when absent."""
from __future__ import annotations

from types import ModuleType

__all__ = ["require_transformers"]

MIN_TRANSFORMERS = 5  # the MoE blocks of 5.x keep their experts as fused 3-D parameters

_INSTALL = 'pip install -e ".[hf]"'


def require_transformers() -> ModuleType:
    """``import transformers``, or an ImportError that names the package and how to install it."""
    try:
        import transformers
    except ImportError:
        raise ImportError(f"dualpipe_ext.integrations.hf needs the 'transformers' package (>= {MIN_TRANSFORMERS}.0), "
                          f"which is not installed: {_INSTALL}") from None
    version = getattr(transformers, "__version__", "0")
    major = version.split(".")[0]
    if not major.isdigit() or int(major) < MIN_TRANSFORMERS:
        raise ImportError(f"dualpipe_ext.integrations.hf needs transformers >= {MIN_TRANSFORMERS}.0, found {version}: "
                          f"{_INSTALL}")
    return transformers
