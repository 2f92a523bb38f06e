"""Triton kernels, one file per kernel family, each with its plain PyTorch reference.

The sources live in the repository's top-level ``kernels/`` folder, which has no
``__init__.py`` on purpose: run from the repository root, ``import kernels`` must find the
``kernels`` distribution that transformers needs, never these files. A source checkout (and
an editable install) reaches them through ``__path__`` below; a wheel carries them here.
"""
import os as _os

_SOURCES = _os.path.normpath(_os.path.join(_os.path.dirname(__file__), _os.pardir, _os.pardir, "kernels"))
if _os.path.isfile(_os.path.join(_SOURCES, "_triton.py")) and _SOURCES not in __path__:
    __path__.append(_SOURCES)
