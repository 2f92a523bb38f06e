"""Knobs of the pipeline runtime."""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RuntimeConfig"]


@dataclass(frozen=True)
class RuntimeConfig:
    # Seconds a rank waits for one posted batch of sends/receives (and for the agreement
    # collectives) before it raises an error naming the missing peers and operations.
    comm_timeout_s: float = 60.0
    # Agree on errors across ranks: a small all_reduce before the step checks the inputs
    # everywhere alike, and one after it reports a failure on any rank on every rank. With
    # this off, bad input on one rank may leave its peers waiting until comm_timeout_s.
    check_errors: bool = True
    # Ask for labels on the ranks that compute the loss of a training step. Turn off for
    # criteria of the outputs alone (called as criterion(*outputs)).
    require_labels: bool = True
    # Record each action's (token, start, end) into the pipeline's Recorder.
    record: bool = False

    def __post_init__(self) -> None:
        if not (self.comm_timeout_s > 0):
            raise ValueError(f"RuntimeConfig.comm_timeout_s must be positive, got {self.comm_timeout_s}")
