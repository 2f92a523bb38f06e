"""Drop-in helpers of deepseek-ai/DualPipe: ``WeightGradStore`` and ``run_backward``."""
from __future__ import annotations

from collections import deque
from contextlib import contextmanager
from typing import Callable, Deque, Iterator, List, Sequence

import torch

__all__ = ["WeightGradStore", "run_backward"]


class _FuncsQueue(deque):
    """A FIFO of weight-gradient batches; also answers the ``queue.Queue`` calls
    (``empty``, ``put``, ``get``, ``qsize``) that code written for deepseek-ai/DualPipe uses."""

    def empty(self) -> bool:
        return not self

    def put(self, item) -> None:
        self.append(item)

    def get(self):
        return self.popleft()

    def qsize(self) -> int:
        return len(self)


class WeightGradStore:
    """Defers weight-gradient work so a schedule can run it later (zero-bubble ``W``).

    While ``enabled`` is set, layers that support splitting their backward call
    :meth:`put` with a closure computing their weight gradients instead of running it.
    The runtime collects the closures of each input-only backward (:meth:`collect`), queues
    them as one batch, and runs the oldest batch for each ``W`` action (:meth:`pop`, first
    in, first out).

    The class-level API of deepseek-ai/DualPipe (``enabled``, ``cache``, ``funcs_queue``,
    ``put``, ``flush``, ``pop``, ``clear``) works as there; :meth:`collect` is the way to
    change ``enabled`` and ``cache`` for a while without losing what they held.
    """

    enabled: bool = False
    cache: List[Callable[[], None]] = []
    funcs_queue: Deque[List[Callable[[], None]]] = _FuncsQueue()

    @classmethod
    def put(cls, func: Callable[[], None]) -> None:
        if not callable(func):  # found now, not when a W runs it much later
            raise TypeError(f"WeightGradStore.put takes a function of no arguments (the weight-gradient work), got "
                            f"{type(func).__name__}")
        cls.cache.append(func)

    @classmethod
    @contextmanager
    def collect(cls) -> Iterator[List[Callable[[], None]]]:
        """Within the block, :meth:`put` is on and lands in a fresh list, the one yielded.

        ``enabled`` and ``cache`` are restored on exit, so blocks nest and an outer batch
        being collected is left as it was::

            with WeightGradStore.collect() as funcs:
                run_backward(outputs, grads)   # layers put their weight-gradient closures
            WeightGradStore.funcs_queue.append(funcs)
        """
        enabled, cache = cls.enabled, cls.cache
        funcs: List[Callable[[], None]] = []
        cls.enabled, cls.cache = True, funcs
        try:
            yield funcs
        finally:
            cls.enabled, cls.cache = enabled, cache

    @classmethod
    def flush(cls) -> None:
        cls.funcs_queue.append(cls.cache)
        cls.cache = []

    @classmethod
    def pop(cls) -> None:
        if not cls.funcs_queue:
            raise RuntimeError("WeightGradStore.pop: no queued weight-gradient batch (a W ran before its backward)")
        for func in cls.funcs_queue.popleft():
            func()

    @classmethod
    def clear(cls) -> None:
        cls.cache = []
        cls.funcs_queue = _FuncsQueue()

    @classmethod
    def empty(cls) -> bool:
        return not cls.funcs_queue and not cls.cache


def run_backward(tensors: Sequence[torch.Tensor], grad_tensors: Sequence[torch.Tensor]) -> None:
    """Backpropagate ``grad_tensors`` from ``tensors``, accumulating into ``.grad``.

    Unlike ``torch.autograd.backward`` it tolerates inputs unreachable from ``tensors``,
    which is what a pipeline stage needs when only some of its outputs carry gradients.
    """
    torch.autograd.Variable._execution_engine.run_backward(
        tuple(tensors), tuple(grad_tensors), keep_graph=False, create_graph=False,
        inputs=(), allow_unreachable=True, accumulate_grad=True,
    )
