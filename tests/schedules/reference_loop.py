"""An independent model of deepseek-ai/DualPipe's ``step()`` loops, reduced to the order of compute.

It follows the eight phases of the published ``DualPipe.step`` and ``DualPipeV.step``,
counting chunk ids per module the way the reference does and keeping its weight-gradient
queue, and returns the trace tokens of docs/schedule-trace.md.
"""
from typing import List


class _Rank:
    def __init__(self, swap: int) -> None:
        self.swap = swap  # DualPipe: ranks in the second half map phase p to module p ^ 1
        self.f = [0, 0]
        self.b = [0, 0]
        self.queued_w = 0
        self.out: List[str] = []

    def _fwd(self, phase: int) -> str:
        m = phase ^ self.swap
        tok = f"F{m}.{self.f[m]}"
        self.f[m] += 1
        return tok

    def _bwd(self, phase: int) -> str:
        m = phase ^ self.swap
        tok = f"B{m}.{self.b[m]}"
        self.b[m] += 1
        return tok

    def forward(self, phase: int) -> None:
        self.out.append(self._fwd(phase))

    def backward(self, phase: int, zb: bool = False) -> None:
        self.out.append(self._bwd(phase) + ("z" if zb else ""))
        self.queued_w += zb

    def forward_backward(self, phase0: int, phase1: int) -> None:
        fwd = self._fwd(phase0)
        self.out.append(fwd + "+" + self._bwd(phase1))

    def weight(self) -> None:
        assert self.queued_w > 0, "the reference pops an empty WeightGradStore queue"
        self.queued_w -= 1
        self.out.append("W")


def _phases(rk: _Rank, half_rank: int, num_half_ranks: int, step_4: int, middle: bool) -> List[str]:
    for _ in range((num_half_ranks - half_rank - 1) * 2):  # nF0
        rk.forward(0)
    for _ in range(half_rank + 1):  # nF0F1
        rk.forward(0)
        rk.forward(1)
    for _ in range(num_half_ranks - half_rank - 1):  # nB1W1F1
        rk.backward(1, zb=True)
        rk.weight()
        rk.forward(1)
    for i in range(step_4):  # nF0B1F1B0
        if i == 0 and middle:  # not overlapped at the meeting point
            rk.forward(0)
            rk.backward(1)
        else:
            rk.forward_backward(0, 1)
        rk.forward_backward(1, 0)
    for _ in range(num_half_ranks - half_rank - 1):  # nB1F1B0
        rk.backward(1)
        rk.forward_backward(1, 0)
    step_6 = half_rank + 1  # nB1B0, second half zero-bubble
    zb = False
    for i in range(step_6):
        if i == step_6 // 2 and half_rank % 2 == 1:
            zb = True
        rk.backward(1, zb)
        if i == step_6 // 2 and half_rank % 2 == 0:
            zb = True
        rk.backward(0, zb)
    for _ in range(num_half_ranks - half_rank - 1):  # nWB0
        rk.weight()
        rk.backward(0, zb=True)
    for _ in range(half_rank + 1):  # nW
        rk.weight()
    assert rk.queued_w == 0
    return rk.out


def dualpipe_trace(ranks: int, chunks: int) -> List[List[str]]:
    assert ranks % 2 == 0 and chunks % 2 == 0 and chunks >= 2 * ranks
    out = []
    for rank in range(ranks):
        half_rank = min(rank, ranks - 1 - rank)
        step_4 = chunks // 2 - ranks + half_rank + 1
        middle = rank in (ranks // 2 - 1, ranks // 2)
        out.append(_phases(_Rank(int(rank >= ranks // 2)), half_rank, ranks // 2, step_4, middle))
    return out


def dualpipev_trace(ranks: int, chunks: int) -> List[List[str]]:
    assert chunks >= 2 * ranks
    out = []
    for rank in range(ranks):
        step_4 = chunks - ranks * 2 + rank + 1
        out.append(_phases(_Rank(0), rank, ranks, step_4, rank == ranks - 1))
    return out
