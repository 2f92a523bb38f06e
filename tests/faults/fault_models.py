"""Stages that fail on purpose, where and when a fault test asks (run in spawned processes).

A ``Fault`` says what goes wrong (``site``: forward, backward, weight, send, recv, exit), on which
rank and at which occurrence of the site within the step, so that the failure lands mid-step.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from dualpipe_ext import WeightGradStore
from dualpipe_ext.runtime import transport

from rt_models import Stage

SITES = ("forward", "backward", "weight", "send", "recv")


@dataclass
class Fault:
    """Raise (or, with ``exit_code``, end the process) at the ``nth`` occurrence of ``site`` on ``rank``."""

    site: str
    rank: int
    nth: int = 2
    exit_code: Optional[int] = None
    seen: int = 0

    def hit(self, site: str, rank: int) -> None:
        """Count one occurrence of ``site``; fail if it is the chosen one."""
        if site != self.site or rank != self.rank:
            return
        self.seen += 1
        if self.seen != self.nth:
            return
        if self.exit_code is not None:
            os._exit(self.exit_code)  # as an OOM kill or a lost node would: no cleanup, no message
        raise RuntimeError(f"{site} exploded on purpose")


ACTIVE: Optional[Fault] = None  # the fault of the current case (None: none)
RANK = -1  # the pipeline rank of this process, set by the worker


def _hit(site: str) -> None:
    if ACTIVE is not None:
        ACTIVE.hit(site, RANK)


class OnBackward(torch.autograd.Function):
    """Identity whose backward calls ``fn()`` first: ``OnBackward.apply(x, fn)``."""

    @staticmethod
    def forward(ctx, x, fn):
        ctx.fn = fn
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.fn()
        return grad, None


def _backward_hit() -> None:
    """Count a backward (and queue a weight step when weights are deferred)."""
    _hit("backward")
    if WeightGradStore.enabled:
        WeightGradStore.put(lambda: _hit("weight"))
    else:
        _hit("weight")


class FaultyStage(Stage):
    """A runtime test stage that consults ``ACTIVE`` at its forward, backward and weight work."""

    def forward(self, *xs):
        _hit("forward")
        return OnBackward.apply(super().forward(*xs), _backward_hit)


_send, _receive = transport.StepComm.send, transport.StepComm.receive


def _faulty_send(self, index, op, tensors, free=()):
    _hit("send")
    return _send(self, index, op, tensors, free)


def _faulty_receive(self, index, op):
    _hit("recv")
    return _receive(self, index, op)


def patch_communication() -> None:
    """Route the step's sends and receives through ``ACTIVE`` (the communication callbacks)."""
    transport.StepComm.send = _faulty_send
    transport.StepComm.receive = _faulty_receive
