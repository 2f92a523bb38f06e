"""Knobs of the pipeline runtime."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

__all__ = ["RuntimeConfig"]


@dataclass(frozen=True)
class RuntimeConfig:
    # Seconds a rank waits for one posted batch of sends/receives (and for the agreement
    # collectives) before it raises an error naming the missing peers and operations. It bounds
    # only a peer that is alive but silent (hung, stopped, in a different plan): a peer whose
    # process exits breaks its connections and is named within seconds. Five minutes leave
    # room for a slow first step (Triton and torch.compile compile kernels between two
    # messages) without letting a hung job sit for NCCL's ten minutes or gloo's thirty.
    comm_timeout_s: float = 300.0
    # Agree on errors across ranks: one agreement before the step checks the inputs
    # everywhere alike, and one after it reports a failure on any rank on every rank (in
    # shared memory when the ranks share a host, microseconds; else small gloo messages).
    # With this off, bad input on one rank may leave its peers waiting until comm_timeout_s.
    check_errors: bool = True
    # Ask for labels on the ranks that compute the loss of a training step. Turn off for
    # criteria of the outputs alone (called as criterion(*outputs)).
    require_labels: bool = True
    # On gloo: post receives ahead of the plan's waits and let sends complete in the
    # background (checked at later waits and at the end of the step). Same messages, same
    # order per peer, less waiting. NCCL always posts the plan's batches as they are.
    eager_comm: bool = True
    # With eager_comm: how many waits ahead receives are posted (their buffers are
    # allocated that early); None posts every receive of the step at its first wait (after
    # that wait's sends), 0 each receive at its own wait. Tiny-compute DualPipeV, 4 ranks, 8 micro-batches, medians
    # of 20 steps: 0: 63 ms, 1: 34 ms, 4: 38 ms, all: 30 ms.
    recv_lookahead: Optional[int] = None
    # Record each action's (token, start, end) into the pipeline's Recorder.
    record: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.comm_timeout_s, bool) or not isinstance(self.comm_timeout_s, (int, float)):
            raise TypeError(f"RuntimeConfig.comm_timeout_s must be a number of seconds, got "
                            f"{type(self.comm_timeout_s).__name__} {self.comm_timeout_s!r}")
        for name in ("check_errors", "require_labels", "eager_comm", "record"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"RuntimeConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if self.recv_lookahead is not None and (isinstance(self.recv_lookahead, bool)
                                                or not isinstance(self.recv_lookahead, int)):
            raise TypeError(f"RuntimeConfig.recv_lookahead must be None or an int, got {self.recv_lookahead!r}")
        if not (self.comm_timeout_s > 0):
            raise ValueError(f"RuntimeConfig.comm_timeout_s must be positive, got {self.comm_timeout_s}")
        if self.recv_lookahead is not None and self.recv_lookahead < 0:
            raise ValueError(f"RuntimeConfig.recv_lookahead must be >= 0, got {self.recv_lookahead}")
