"""Error agreement: every rank of a pipeline raises the same error, or none does.

Only some ranks hold the inputs, labels and criterion of a step, so a mistake there is
seen by those ranks alone; if they raised on their own, their peers would wait forever
for messages that never come. Instead each rank reports what it found (a message, or
nothing) together with values all ranks must agree on, in one small all_reduce; when
anything is wrong, a second collective exchanges the messages and every rank raises the
same exception. The common, error-free case costs one maximum of a few integers over the
ranks: on gloo, for 2^k ranks, k rounds of one message each way (recursive doubling); for
other sizes one all_reduce up to 4 ranks and one round of messages between all pairs above
(one network latency where gloo's ring all_reduce takes 2 (N - 1) of them). Ranks that share
a host agree in shared memory instead (``host_agreement``), in microseconds.
"""
from __future__ import annotations

import time
from datetime import timedelta
from typing import Callable, Dict, List, NamedTuple, Optional, Protocol, Sequence, Tuple

import torch
import torch.distributed as dist

from dualpipe_ext import faults

__all__ = ["PipelineError", "agree"]

# Error kinds, ordered by precedence when several ranks fail differently.
NONE, INPUT, STEP = 0, 1, 2
_MAX_MESSAGE = 1024
# Tag of the agreement's point-to-point messages on gloo; pipeline traffic uses tag 0.
_TAG = 0x5A5A


class PipelineError(RuntimeError):
    """A pipeline step failed on some rank; raised on every rank with the same message."""


# How messages name global ranks, and the global ranks of the group (for the fault board).
Names = Tuple[Callable[[int], str], Sequence[int]]


class Wait(NamedTuple):
    """How the waits of one agreement are bounded and worded."""

    what: str  # what is waited for, in messages ("the error agreement of the step")
    rank: int  # this rank's name in messages (its pipeline rank)
    timeout_s: float
    names: Optional[Names]  # words global ranks, and the group's global ranks; None: "global rank N"
    since: float  # a time.time(): the fault board's reports from then on explain a failure

    def name(self, global_rank: int) -> str:
        return self.names[0](global_rank) if self.names is not None else f"global rank {global_rank}"


class MaxOverRanks(Protocol):
    """Where the common case of an agreement runs instead of the group (``host_agreement.HostAgreement``)."""

    def max_over_ranks(self, flags: Sequence[int], wait: Wait) -> List[int]: ...


def wait_for(work, wait: Wait, peer: int = -1) -> None:
    """Wait for ``work``; a failure raises PipelineError with its true cause (``peer``: global rank, -1 if
    unknown), diagnosed from the fault board."""
    begin = time.monotonic()
    try:
        done = work.wait(timedelta(seconds=wait.timeout_s))
    except RuntimeError as e:
        _raise(e, time.monotonic() - begin, wait, peer)
    if done is False:
        _raise(None, time.monotonic() - begin, wait, peer)


def _raise(error: Optional[BaseException], elapsed: float, wait: Wait, peer: int) -> None:
    cause = faults.cause_of(error) if error is not None else faults.TIMEOUT
    rank, what, timeout_s, name = wait.rank, wait.what, wait.timeout_s, wait.name
    faults.report(peer, cause or "error", what, str(error or "")[:200])
    verdict = faults.diagnose([peer] if peer >= 0 else [], wait.since, name, wait.names[1] if wait.names else ())
    if cause == faults.TIMEOUT:
        head = (f"pipeline rank {rank}: {what} did not complete within {timeout_s:g} s: some rank of the pipeline "
                f"did not reach it")
        raise PipelineError(head + (f"; {verdict.text}" if verdict.gone else "")) from None
    if cause in faults.LOST_CAUSES:
        who = f" by {name(peer)}" if peer >= 0 else ""
        raise PipelineError(f"pipeline rank {rank}: {what} failed after {faults.duration(elapsed)}: {cause}{who}; "
                            f"{verdict.text}") from None
    raise PipelineError(f"pipeline rank {rank}: {what} failed after {faults.duration(elapsed)}: "
                        f"{type(error).__name__}: "
                        f"{str(error).strip().splitlines()[0][:300] if str(error).strip() else ''}") from None


def agree(group: dist.ProcessGroup, device: torch.device, rank: int, kind: int, message: Optional[str],
          values: Sequence[Tuple[str, int]] = (), timeout_s: float = 300.0, what: str = "step",
          names: Optional[Names] = None, since: Optional[float] = None,
          host: Optional[MaxOverRanks] = None) -> None:
    """Exchange this rank's error (``kind``, ``message``) and ``values`` with every rank of ``group``.

    Raises the same exception on every rank when any rank reported an error or when the
    ranks passed different ``values`` (pairs of name and integer, e.g. ``("num_chunks", 8)``).
    ``rank`` is this rank's name in messages (its pipeline rank); ``names`` words the ranks of a
    failed collective (a function of the global rank, and the group's global ranks). ``since``
    (``time.time()``, default: now): the fault board's reports from then on explain a failed exchange.
    ``host``: the group's ranks' ``host_agreement.HostAgreement`` when they share a host: the common
    case then runs in shared memory, not over ``group``.
    """
    wait = Wait(f"the error agreement of the {what}", rank, timeout_s, names,
                time.time() if since is None else since)
    flags = [kind]
    for _, v in values:
        flags += [int(v), -int(v)]
    if host is not None:
        summary = host.max_over_ranks(flags, wait)
    else:
        summary = _max_over_ranks(group, torch.tensor(flags, dtype=torch.int64, device=device), wait)
    worst = summary[0]
    disagree = [f"{name} (from {-summary[2 + 2 * i]} to {summary[1 + 2 * i]})"
                for i, (name, _) in enumerate(values) if summary[1 + 2 * i] != -summary[2 + 2 * i]]
    if worst == NONE and not disagree:
        return
    if disagree:
        raise ValueError(f"the ranks of the pipeline passed different values of {', '.join(disagree)} to the "
                         f"{what}; every rank must pass the same")
    size = dist.get_world_size(group)
    rows = torch.zeros(size, _MAX_MESSAGE + 2, dtype=torch.int32, device=device)
    if kind != NONE:
        data = (message or "unknown error").encode()[:_MAX_MESSAGE]
        me = dist.get_rank(group)
        rows[me, 0] = kind
        rows[me, 1] = rank
        rows[me, 2:2 + len(data)] = torch.tensor(list(data), dtype=torch.int32)
    wait_for(dist.all_reduce(rows, group=group, async_op=True), wait._replace(what=f"the error report of the {what}"))
    raise _combined(rows.cpu())


def _max_over_ranks(group: dist.ProcessGroup, t: torch.Tensor, wait: Wait) -> List[int]:
    """Elementwise maximum of ``t`` over the ranks of ``group``."""
    size = group.size()
    if size == 1:
        return t.tolist()
    # Measured on 2 CPU cores (median of 60): 4 ranks all_reduce 1.7 ms, pairwise 3.3 ms;
    # 8 ranks all_reduce 8.6 ms, pairwise 5.0 ms. Powers of two: recursive doubling, log2(N)
    # rounds of one message each way (one round on 2 ranks, two on 4, against the ring's 2 (N - 1)).
    if dist.get_backend(group) != "gloo":
        wait_for(dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group, async_op=True), wait)
        return t.tolist()
    if size & (size - 1) == 0:
        return _doubling_max(group, t, wait)
    if size <= 4:
        wait_for(dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group, async_op=True), wait)
        return t.tolist()
    me = group.rank()
    bufs = [torch.empty_like(t) for _ in range(size)]
    works = []
    for peer in range(size):
        if peer != me:
            works += _post(group, t, bufs[peer], peer, wait)
    for peer, w in works:
        wait_for(w, wait, dist.get_global_rank(group, peer))
    bufs[me] = t
    return torch.stack(bufs).amax(0).tolist()


def _post(group: dist.ProcessGroup, send: torch.Tensor, recv: torch.Tensor, peer: int,
          wait: Wait) -> List[Tuple[int, object]]:
    """Post one receive from and one send to ``peer`` (group rank); a connection already closed fails at
    posting, and is explained like a failed wait."""
    begin = time.monotonic()
    try:
        return [(peer, group.recv([recv], peer, _TAG)), (peer, group.send([send], peer, _TAG))]
    except RuntimeError as e:
        _raise(e, time.monotonic() - begin, wait, dist.get_global_rank(group, peer))
        raise  # unreachable: _raise raises


def _doubling_max(group: dist.ProcessGroup, t: torch.Tensor, wait: Wait) -> List[int]:
    """Elementwise maximum over a group of 2^k ranks: in round d, exchange with rank ``me ^ d``."""
    me, size = group.rank(), group.size()
    acc, d = t, 1
    while d < size:
        peer = me ^ d
        buf = torch.empty_like(acc)
        for _, w in _post(group, acc, buf, peer, wait):
            wait_for(w, wait, dist.get_global_rank(group, peer))
        acc = torch.maximum(acc, buf)
        d <<= 1
    return acc.tolist()


def _combined(rows: torch.Tensor) -> Exception:
    """One exception from all ranks' reports, identical on every rank."""
    by_message: Dict[str, List[int]] = {}
    kinds: Dict[str, int] = {}
    for r in range(rows.shape[0]):
        k = int(rows[r, 0])
        if k == NONE:
            continue
        data = rows[r, 2:]
        n = int((data != 0).sum())
        text = bytes(data[:n].to(torch.uint8).tolist()).decode(errors="replace")
        by_message.setdefault(text, []).append(int(rows[r, 1]))
        kinds[text] = max(kinds.get(text, 0), k)
    parts = []
    for text, ranks in by_message.items():
        ranks.sort()
        who = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"
        parts.append(f"[{who}] {text}")
    kind = max(kinds.values())
    message = "pipeline step failed: " + "; ".join(parts)
    return ValueError(message) if kind == INPUT else PipelineError(message)
