"""Capture a whole step (a layer's forward and backward, an overlapped pair) in one CUDA graph.

    graph = StepGraph(step, device)   # warm-up runs on a side stream, then one capture
    outputs = graph.replay()          # the tensors the captured step returned, refilled

``step`` takes no arguments, reads its inputs from tensors that stay where they are (copy new
values into them between replays) and returns the tensors to read after a replay. Everything it
launches must be capturable: no host read of a tensor value, no synchronisation, exchanges that
are waited for inside the step. Gradients: let ``step`` set the parameters' ``.grad`` to None
first, so that the captured backward writes them afresh on every replay (their tensors then stay
the same, in the graph's memory pool).

On CPU there is nothing to capture: ``replay()`` runs ``step`` again, so code written against
``StepGraph`` runs on both.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

__all__ = ["StepGraph"]


class StepGraph:
    """One step captured in a ``torch.cuda.CUDAGraph`` after ``warmup`` eager runs (CUDA), or run
    eagerly on every ``replay()`` (CPU).

    Args:
        step: the step, a function of no arguments returning the tensors to read.
        device: where the step runs.
        warmup: eager runs before the capture (compiles kernels, settles the allocator).
    """

    def __init__(self, step: Callable[[], Any], device: torch.device, warmup: int = 2) -> None:
        if not callable(step):
            raise TypeError(f"StepGraph takes a function of no arguments, got {type(step).__name__}")
        if not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"StepGraph: warmup must be a positive int, got {warmup!r}")
        self.step, self.device = step, torch.device(device)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.outputs: Any = None
        if self.device.type != "cuda":
            return
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(warmup):
                step()
        current.wait_stream(side)
        torch.cuda.synchronize(self.device)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = step()

    @property
    def captured(self) -> bool:
        """True when the step lives in a CUDA graph (False on CPU)."""
        return self.graph is not None

    def replay(self) -> Any:
        """Run the step again (the graph on CUDA, ``step()`` on CPU); returns its outputs."""
        if self.graph is None:
            self.outputs = self.step()
        else:
            self.graph.replay()
        return self.outputs
