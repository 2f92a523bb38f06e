"""Which rank failed: what a lost connection means, and a board of failures in the job's store.

When a process of a job dies (killed for memory, a lost node), its peers see only their
connections to it reset or closed; a peer that loses it then stops, and *its* peers see
their connections to that peer closed next. Each rank alone would blame its own neighbour.
To name the rank that is really gone, a rank that sees a failure writes one line to a board
in the process group's key-value store (the one ``init_process_group`` set up) before it
raises: who it is, which peer, what happened and where. A rank that reports was alive when it
wrote, so the rank that is gone is one that was reported (or whose connection broke) and that
reported nothing itself. Processes of the same host are also checked by pid: every process
publishes its host and pid once (``publish_process``).

The board costs nothing while nothing fails: one ``set`` per process at start, and store
round trips only on the failure path. If the store is unreachable too (it lived in the process
that died, as with ``init_method="tcp://..."`` on rank 0), messages say so and name what
this rank saw. Ranks are global ranks (of the default group) here; callers translate them.
"""
from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, TypeVar

import torch.distributed as dist

__all__ = ["LOST_CAUSES", "PeerLostError", "Verdict", "cause_of", "checked", "diagnose", "describe_failure", "duration",
           "looks_lost", "pid_alive", "publish_process", "raised_by", "report", "stopped", "begin_window", "window"]

T = TypeVar("T")

# Causes a failed communication is put down to, in the words messages use.
RESET, CLOSED, LOST, TIMEOUT = "connection reset", "connection closed", "connection lost", "timeout"
LOST_CAUSES = (RESET, CLOSED, LOST)
RAISED = "raised"  # a rank reports its own exception

_BOARD = "dualpipe_ext/faults"  # appended JSON lines, one per report
_SEQ = "dualpipe_ext/faults_seq"  # a counter: its round trip orders a report before what the reporter does next
_PROC = "dualpipe_ext/proc/"  # + global rank: "host pid"
# Reports written before the failing operation began are from an earlier incident; for reports
# of other hosts, allow this much clock skew (NTP keeps hosts far closer).
_SKEW_S = 1.0

_MAX_PID_CHECKS = 64

_published = False
_window: Optional[float] = None  # when the current step began (begin_window); reports before it are stale
_store_failed = False  # a store operation failed: the store is gone, do not try (and warn) again


def duration(t: float) -> str:
    """How messages say a time: '3 s', '3.2 s', '160 ms', '7.7 ms'."""
    if t >= 1:
        return f"{round(t, 1):g} s"
    return f"{t * 1e3:.0f} ms" if t >= 0.01 else f"{t * 1e3:.2g} ms"


def cause_of(exc: BaseException) -> Optional[str]:
    """What a communication error means: a RESET/CLOSED/LOST connection, a TIMEOUT, or None (something else).

    Reads the backend's message (gloo: "Connection reset by peer", "Connection closed by peer",
    "Timed out waiting ..."; NCCL: "remote process exited", "Connection closed by remote peer").
    """
    text = str(exc)
    low = text.lower()
    if "connection reset" in low:
        return RESET
    if "connection closed" in low or "closed by peer" in low or "broken pipe" in low or "connection refused" in low:
        return CLOSED
    if "remote process exited" in low or "network error" in low or "communicator was aborted" in low:
        return LOST
    if "timed out" in low or "timeout" in low or "deadline exceeded" in low:
        return TIMEOUT
    return None


def _store():
    """The default process group's store, or None (none, or found unreachable before)."""
    if _store_failed:
        return None
    try:
        if not (dist.is_available() and dist.is_initialized()):
            return None
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no store: the board is simply not there
        return None


def _global_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def publish_process() -> None:
    """Put this process's host and pid in the store (once per process), for peers to check after a failure."""
    global _published
    if _published:
        return
    store = _store()
    if store is None:
        return
    try:
        store.set(f"{_PROC}{_global_rank()}", f"{socket.gethostname()} {os.getpid()}")
        _published = True
    except Exception:  # noqa: BLE001 - best effort
        pass


def begin_window() -> float:
    """Mark the start of a step: reports written before it belong to earlier incidents. Returns the time."""
    global _window
    _window = time.time()
    return _window


def window() -> float:
    """Start of the current step (``begin_window``), or 0 when no step has begun: every report counts."""
    return _window if _window is not None else 0.0


def report(peer: int, cause: str, where: str, detail: str = "") -> None:
    """Write this rank's observation to the board: ``peer`` (global rank, -1 if unknown) failed with
    ``cause`` at ``where`` (this rank's action, e.g. "action 23 'wait'"). Best effort."""
    store = _store()
    if store is None:
        return
    line = json.dumps({"t": time.time(), "host": socket.gethostname(), "by": _global_rank(), "peer": int(peer),
                       "cause": cause, "where": where, "detail": detail[:300]})
    try:
        store.append(_BOARD, line + "\n")
        store.add(_SEQ, 1)  # a round trip: the line is on the board before this rank goes on
    except Exception:  # noqa: BLE001 - the store may be gone with the process that hosted it
        _mark_failed()


def _mark_failed() -> None:
    global _store_failed
    _store_failed = True


@dataclass(frozen=True)
class Report:
    time: float
    by: int
    peer: int
    cause: str
    where: str
    detail: str


def _board(store, since: float) -> Optional[List[Report]]:
    try:
        if not store.check([_BOARD]):
            return []
        raw = store.get(_BOARD).decode(errors="replace")
    except Exception:  # noqa: BLE001
        _mark_failed()
        return None
    out = []
    host = socket.gethostname()
    for line in raw.splitlines():
        try:
            d = json.loads(line)
            r = Report(float(d["t"]), int(d["by"]), int(d["peer"]), str(d["cause"]), str(d["where"]),
                       str(d.get("detail", "")))
            same_host = d.get("host") == host
        except (ValueError, KeyError, TypeError):
            continue
        if r.time >= since - (0.0 if same_host else _SKEW_S):
            out.append(r)
    return out


def pid_alive(pid: int) -> bool:
    """True while process ``pid`` (of this host) runs; a zombie has exited."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def _process(store, rank: int) -> Optional[str]:
    """'exited (pid N)', 'running (pid N)', 'on host H' or None (never published)."""
    try:
        key = f"{_PROC}{rank}"
        if not store.check([key]):
            return None
        host, pid = store.get(key).decode().split()
    except Exception:  # noqa: BLE001
        return None
    if host != socket.gethostname():
        return f"on host {host}"
    return f"{'running' if pid_alive(int(pid)) else 'exited'} (pid {pid})"


@dataclass(frozen=True)
class Verdict:
    """Which ranks are gone, as far as this rank can tell, and the sentence that says why."""

    gone: List[int]  # global ranks, most likely first
    text: str  # e.g. "rank 1 is gone: its process (pid 4242) has exited"
    store_reachable: bool


def diagnose(suspects: Sequence[int], since: float, name: Callable[[int], str] = lambda r: f"rank {r}",
             everyone: Sequence[int] = ()) -> Verdict:
    """Name the rank(s) that failed, from this rank's ``suspects`` (global ranks whose operations failed),
    the board (reports since ``since``, a ``time.time()``) and the pids of the ranks involved.

    ``name(global_rank)`` words a rank. ``everyone``: the ranks to check by pid when the suspects and
    the board name no one (the members of a collective whose failing peer is unknown; at most
    ``_MAX_PID_CHECKS`` of them, so that thousands of ranks do not all query the store at once).
    """
    store = _store()
    reports = _board(store, since) if store is not None else None
    reachable = reports is not None
    reports = reports or []
    reporters = {r.by for r in reports}
    raised = [r for r in reports if r.cause == RAISED]
    candidates: List[int] = []
    for r in list(suspects) + [r.peer for r in reports if r.peer >= 0] + [r.by for r in raised]:
        if r >= 0 and r not in candidates:
            candidates.append(r)
    if not candidates:
        candidates = list(everyone)[:_MAX_PID_CHECKS]
    states: Dict[int, Optional[str]] = {r: _process(store, r) for r in candidates} if reachable else {}
    exited = [r for r in candidates if (states.get(r) or "").startswith("exited")]
    # Gone: exited without a report, else reported by others without reporting themselves.
    gone = [r for r in exited if r not in reporters] or [r for r in exited]
    if not gone:
        gone = [r for r in candidates if r not in reporters and (r in suspects or any(x.peer == r for x in reports))
                and not (states.get(r) or "").startswith("running")]
    if not gone and raised:
        gone = [raised[0].by]
    me = _global_rank()
    parts = []
    for r in gone[:4]:
        state = states.get(r)
        own = [x for x in raised if x.by == r]
        seen = [x for x in reports if x.peer == r and x.by != me and x.by not in gone]
        saw = f" ({name(seen[0].by)} saw a {seen[0].cause} at its {seen[0].where})" if seen else ""
        if own:
            parts.append(f"{name(r)} failed at its {own[0].where}: {own[0].detail}")
        elif state and state.startswith("exited"):
            parts.append(f"{name(r)} is gone: its process ({state.split('(')[1].rstrip(')')}) has exited{saw}")
        elif not reachable:
            parts.append(f"{name(r)} closed the connection: its process exited, or it stopped after losing a peer "
                         f"of its own")
        else:
            where = f" ({state})" if state else ""
            parts.append(f"{name(r)}{where} is gone or stopped answering{saw}")
    if not parts:
        parts.append("no rank reported a failure and no process of this host has exited")
    if not reachable:
        parts.append("the store is unreachable as well, so no other rank's report could be read (it lived in the "
                     "process of a rank, as with init_method='tcp://' or 'env://'; with torchrun, or a store outside "
                     "the ranks, every rank names the rank that is gone)")
    return Verdict(gone, "; ".join(parts), reachable)


def raised_by(ranks: Sequence[int], since: float) -> Dict[int, str]:
    """The failures that ranks of ``ranks`` (global) put on the board since ``since``: rank -> "its action
    12 'F0.1+B1.0': RuntimeError: ...". Empty when none did or the store is unreachable."""
    store = _store()
    reports = _board(store, since) if store is not None else None
    out: Dict[int, str] = {}
    for r in reports or ():
        if r.cause == RAISED and r.by in ranks and r.by not in out:
            out[r.by] = f"its {r.where}: {r.detail}"
    return out


def stopped(ranks: Sequence[int], since: float) -> List[int]:
    """The ranks of ``ranks`` (global) that reported a failed communication since ``since``: a rank raises
    at once then, so it will not reach a later wait of the same step (a rank whose own action raised,
    ``RAISED``, goes on to the step's end). Empty when none did or the store is unreachable."""
    store = _store()
    reports = _board(store, since) if store is not None else None
    return sorted({r.by for r in reports or () if r.by in ranks and r.cause != RAISED})


def looks_lost(exc: BaseException) -> bool:
    """True for an exception about a peer: a connection error, a timeout, an ``EPBufferError``."""
    return cause_of(exc) is not None or type(exc).__name__ == "EPBufferError"


def describe_failure(exc: BaseException, since: float, name: Callable[[int], str] = lambda r: f"global rank {r}"
                     ) -> Optional[str]:
    """For an exception that looks like a lost peer (``looks_lost``): the board's verdict on who failed,
    checking every rank of the job by pid; None for other exceptions."""
    if not looks_lost(exc):
        return None
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 0
    return diagnose([], since, name, range(world)).text


class PeerLostError(RuntimeError):
    """A collective could not complete: a connection to a peer broke, or it timed out; says who failed."""


def checked(what: str, fn: Callable[[], T]) -> T:
    """``fn()`` (a collective, or a wait on one); a backend error about a lost peer or a timeout becomes a
    :class:`PeerLostError` saying ``what`` failed, why, after how long, and who failed (the board's verdict)."""
    begin = time.monotonic()
    try:
        return fn()
    except RuntimeError as e:
        cause = cause_of(e)
        if cause is None or isinstance(e, PeerLostError):
            raise
        elapsed = time.monotonic() - begin
        report(-1, cause, what, str(e)[:200])
        text = describe_failure(e, window()) or ""
        if cause == TIMEOUT:
            head = (f"{what}: a peer of the process group did not answer within {duration(elapsed)} (the group's "
                    f"timeout)")
        else:
            head = f"{what}: {cause} by a peer of the process group after {duration(elapsed)}"
        raise PeerLostError(f"{head}; {text}") from None
