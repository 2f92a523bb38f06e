"""Real text that needs no download: the Python standard library's own sources, as bytes.

Byte-level tokens (vocabulary 256) of the ``.py`` files under the directory of the
running interpreter's standard library, in a fixed order. The last ``held_out`` fraction
of every file is kept for evaluation, so training and held-out text never overlap.
"""
from __future__ import annotations

import os
import sysconfig
from dataclasses import dataclass
from typing import List

import torch

__all__ = ["Corpus", "load_corpus", "VOCAB"]

VOCAB = 256


@dataclass(frozen=True)
class Corpus:
    """Training and held-out tokens: [n] uint8 each, byte values."""

    train: torch.Tensor
    held_out: torch.Tensor
    files: int

    def windows(self, split: str, count: int, length: int, generator: torch.Generator) -> torch.Tensor:
        """``count`` random windows of ``length`` tokens from ``split``: [count, length] int64."""
        data = self.train if split == "train" else self.held_out
        if data.numel() <= length:
            raise ValueError(f"the {split} text has {data.numel()} tokens, fewer than a window of {length}")
        starts = torch.randint(0, data.numel() - length, (count,), generator=generator)
        offsets = torch.arange(length)
        return data[starts[:, None] + offsets[None, :]].to(torch.int64)


def _sources(limit_bytes: int) -> List[str]:
    root = sysconfig.get_paths()["stdlib"]
    paths: List[str] = []
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("test", "tests", "site-packages", "idlelib", "__pycache__"))
        for name in sorted(filenames):
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                paths.append(path)
                total += os.path.getsize(path)
                if total >= limit_bytes:
                    return paths
    return paths


def load_corpus(limit_bytes: int = 4_000_000, held_out: float = 0.1) -> Corpus:
    """Up to ``limit_bytes`` of standard-library sources; the tail ``held_out`` of each file held out."""
    train, test = bytearray(), bytearray()
    paths = _sources(limit_bytes)
    for path in paths:
        with open(path, "rb") as f:
            text = f.read()
        cut = int(len(text) * (1 - held_out))
        train += text[:cut]
        test += text[cut:]
    if not train or not test:
        raise RuntimeError(f"no Python sources found under {sysconfig.get_paths()['stdlib']}")
    as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8).clone()  # noqa: E731
    return Corpus(as_tensor(train), as_tensor(test), len(paths))
