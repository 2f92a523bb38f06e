"""Pipeline stages run component by component: a stack of layers, optionally with a prologue
(e.g. the token embedding) before and an epilogue (e.g. norm and LM head) after.

``ComponentStage`` runs every chunk's components one after another; ``OverlappedStage``
interleaves them by the component plan: the forward and backward chunks of a DualPipe pair
through ``overlapped_forward_backward``, and, with ``OverlapConfig(two_batch=True)``, the two
halves every chunk is then split into, so that a chunk that runs alone (warm-up, cool-down,
baseline schedules) overlaps with itself. A chunk's
forward returns an output whose backward (through autograd, as the runtime runs it) runs
the components' backward. ``MoEStage`` and ``OverlappedMoEStage`` are those stages built of
the project's :class:`~dualpipe_ext.overlap.block.MoEBlock`.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, List, Optional, Sequence

import torch
from torch import nn

from dualpipe_ext import _C
from dualpipe_ext.sm_budget import sm_partition
from dualpipe_ext.utils import WeightGradStore, run_backward

from .block import MoEBlock
from .config import BlockConfig, OverlapConfig
from .engine import execute, overlapped_forward_backward
from .runs import BackwardRun, ForwardRun, split_halves

__all__ = ["ComponentStage", "OverlappedStage", "MoEStage", "OverlappedMoEStage"]


class _Chunk:
    """One chunk's forward runs (the whole micro-batch, or its two halves) and its input.
    ``handover``: while the engine takes the chunk's output gradient over (a list), the
    output's backward appends the gradient to it instead of running the components."""

    __slots__ = ("runs", "input", "split", "value", "handover")

    def __init__(self, runs: List[ForwardRun], x: torch.Tensor, split: bool, value: torch.Tensor) -> None:
        self.runs, self.input, self.split, self.value = runs, x, split, value
        self.handover: Optional[list] = None


class _Chain(torch.autograd.Function):
    """Connects a chunk's output to its input and the stage's parameters; its backward runs the
    components' backward, or, while the engine captures the pair's backward chunk, hands the
    output gradient over to the engine (the chunk's ``handover`` list)."""

    @staticmethod
    def forward(ctx, stage, chunk, x, anchor):
        ctx.stage, ctx.chunk = stage, chunk
        value, chunk.value = chunk.value, None
        return value

    @staticmethod
    def backward(ctx, grad):
        stage, chunk = ctx.stage, ctx.chunk
        ctx.chunk = None
        if chunk.handover is not None:
            chunk.handover.append(grad)
            return None, None, None, None
        return None, None, stage.backward_chunk(chunk, grad), None


class ComponentStage(nn.Module):
    """A pipeline stage of ``layers`` (each with ``moe`` and ``attention(x, context)``), run component
    by component. Input: [batch, seq, hidden] (or what ``prologue`` takes); output: [batch, seq,
    hidden] (or what ``epilogue`` gives). ``context_fn(hidden) -> context``: what every layer's
    attention needs beside its input (rotary embeddings, masks), computed once per chunk."""

    interleave = False

    def __init__(self, layers: Sequence[nn.Module], prologue: Optional[nn.Module] = None,
                 epilogue: Optional[nn.Module] = None, overlap: Optional[OverlapConfig] = None,
                 context_fn: Optional[Callable[[torch.Tensor], Any]] = None) -> None:
        super().__init__()
        if len(layers) < 1:
            raise ValueError("a component stage needs at least one layer")
        for i, layer in enumerate(layers):
            if not hasattr(layer, "moe") or not callable(getattr(layer, "attention", None)):
                raise ValueError(f"layer {i} ({type(layer).__name__}) is not a component layer: it needs an `moe` "
                                 f"(dualpipe_ext.moe.MoE) and `attention(x, context) -> (h, u)`")
        overlap = overlap or OverlapConfig()
        for i, layer in enumerate(layers):
            sms = getattr(layer.moe, "num_comm_sms", None)
            if overlap.num_comm_sms is not None and sms != overlap.num_comm_sms:
                raise ValueError(f"layer {i}'s MoE has num_comm_sms={sms}, the stage's OverlapConfig "
                                 f"{overlap.num_comm_sms}: build the layers' MoE with the same budget (e.g. "
                                 f"replace_moe(model, num_comm_sms={overlap.num_comm_sms}))")
        self.layers = nn.ModuleList(layers)
        self.prologue, self.epilogue = prologue, epilogue
        self.overlap = overlap
        self._context_fn = context_fn

    # what the engine asks of a stage -------------------------------------------------------

    def context_of(self, hidden: torch.Tensor) -> Any:
        return self._context_fn(hidden) if self._context_fn is not None else None

    def run_spec(self, backward: bool) -> "_C.RunSpec":
        shared = any(layer.moe.shared is not None for layer in self.layers)
        return _C.RunSpec(backward, len(self.layers), self.prologue is not None, self.epilogue is not None, shared)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ValueError if ``x`` cannot be this stage's input."""

    def chunk_of(self, node: Any) -> Optional[_Chunk]:
        """The chunk whose output's autograd ``node`` (a ``grad_fn``) this is, when its forward ran
        through this stage (None: any other node)."""
        if isinstance(node, _Chain._backward_cls) and getattr(node, "stage", None) is self:
            return node.chunk
        return None

    def sm_partition(self) -> contextlib.AbstractContextManager:
        """cuBLAS's side of the SM partition of an overlapped step (the layers' own kernels take
        ``num_comm_sms`` as an argument): communication keeps ``num_comm_sms``."""
        device = next(self.parameters()).device
        return sm_partition(device, self.overlap.num_comm_sms)

    def splits(self, x: torch.Tensor) -> bool:
        """Whether a chunk of input ``x`` runs as two halves of its batch (``two_batch``, batch >= 2)."""
        return self.overlap.two_batch and x.shape[0] >= 2

    # forward and backward of a chunk that runs alone ----------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        split = self.splits(x)
        runs = [ForwardRun(self, h, h.shape[0] / x.shape[0]) for h in (split_halves(x) if split else (x,))]
        with self.sm_partition() if split and self.interleave else contextlib.nullcontext():
            execute(runs, interleave=self.interleave, config=self.overlap)
        return self.finish_forward(runs, x, split)

    def finish_forward(self, runs: List[ForwardRun], x: torch.Tensor, split: bool) -> torch.Tensor:
        """The chunk's output, connected to the components' backward."""
        value = torch.cat([r.output.detach() for r in runs]) if split else runs[0].output.detach()
        if not torch.is_grad_enabled():
            return value
        anchor = next(p for p in self.parameters() if p.requires_grad)
        return _Chain.apply(self, _Chunk(runs, x, split, value), x, anchor)

    def backward_runs(self, chunk: _Chunk, grad: torch.Tensor) -> List[BackwardRun]:
        collect = not WeightGradStore.enabled
        grads = split_halves(grad) if chunk.split else (grad,)
        return [BackwardRun(r, g, collect) for r, g in zip(chunk.runs, grads)]

    def finish_backward(self, chunk: _Chunk, runs: List[BackwardRun]) -> None:
        """Deliver the chunk input's gradient (when it has one) into ``.grad``, as autograd would."""
        grad_x = self._input_grad(chunk, runs)
        if grad_x is not None and chunk.input.requires_grad:
            run_backward([chunk.input], [grad_x])

    def _input_grad(self, chunk: _Chunk, runs: List[BackwardRun]) -> Optional[torch.Tensor]:
        grads = [r.finish() for r in runs]
        if any(g is None for g in grads):
            return None
        return torch.cat(grads) if chunk.split else grads[0]

    def backward_chunk(self, chunk: _Chunk, grad: torch.Tensor) -> Optional[torch.Tensor]:
        """Every component's backward (the chunk's halves interleaved when the stage interleaves);
        returns the gradient of the stage input. Weight gradients: queued in WeightGradStore
        while it is enabled (a zero-bubble ``B..z``), else computed at the plan's ``W`` steps."""
        runs = self.backward_runs(chunk, grad)
        with self.sm_partition() if chunk.split and self.interleave else contextlib.nullcontext():
            execute(runs, interleave=self.interleave, config=self.overlap)
        return self._input_grad(chunk, runs)


class _Interleaved:
    """What makes a component stage run through the engine: its chunks' runs interleave, and the
    runtime hands it every forward+backward pair (``overlapped_forward_backward``)."""

    interleave = True

    @classmethod
    def overlapped_forward_backward(cls, module0, inputs0, criterion0, labels0, module1, loss1, outputs1,
                                    output_grads1):
        return overlapped_forward_backward(module0, inputs0, criterion0, labels0, module1, loss1, outputs1,
                                           output_grads1)


class OverlappedStage(_Interleaved, ComponentStage):
    """:class:`ComponentStage` whose forward+backward pairs (and, with ``two_batch``, lone chunks)
    run interleaved by the overlap engine."""


class MoEStage(ComponentStage):
    """A pipeline stage of ``num_layers`` :class:`MoEBlock`\\ s, run component by component.

    Input and output: one [batch, seq, hidden] tensor. Expert parallelism over ``group``,
    through ``ep`` (an ``EPBuffer``) when given, else the collective path.
    """

    def __init__(self, config: BlockConfig, num_layers: int, group=None, overlap: Optional[OverlapConfig] = None,
                 device=None, dtype=None, ep=None) -> None:
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
        overlap = overlap or OverlapConfig()
        blocks = [MoEBlock(config, group, overlap, device, dtype, ep) for _ in range(num_layers)]
        super().__init__(blocks, overlap=overlap)
        self.config = config

    @property
    def blocks(self) -> nn.ModuleList:
        return self.layers

    def check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 3 or x.shape[-1] != self.config.moe.hidden:
            raise ValueError(f"MoEStage input must be [batch, seq, {self.config.moe.hidden}], got {tuple(x.shape)}")


class OverlappedMoEStage(_Interleaved, MoEStage):
    """:class:`MoEStage` whose forward+backward pairs the runtime runs through the overlap engine."""
