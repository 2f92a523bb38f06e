"""Read the per-rank JSON records that the runtime writes and merge them into one step's timeline.

The record format is described in :mod:`dualpipe_ext.runtime.timeline`
(``"format": "dualpipe_ext.timeline/1"``). Ranks of one machine share
``time.perf_counter_ns``'s clock; ``clock_offset_ns`` moves other ranks onto it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple

from dualpipe_ext.schedules.analysis import TimedAction

__all__ = ["FORMAT", "RunStep", "load_record", "merge_step"]

FORMAT = "dualpipe_ext.timeline/1"
_EVENT_KEYS = ("name", "cat", "start_ns", "end_ns", "step")


@dataclass(frozen=True)
class RunStep:
    """One recorded step of every rank, in nanoseconds from the step's earliest start."""

    schedule: str  # plan name ("dualpipe", ...)
    ranks: int  # pipeline ranks of the plan
    chunks: int  # micro-batches of the plan
    step: int  # index of the step within the records
    # per rank: each compute action (token, start_ns, end_ns), in time order
    compute: Tuple[Tuple[TimedAction, ...], ...]
    # per rank: (name, cat, start_ns, end_ns) of communication waits and spans
    other: Tuple[Tuple[Tuple[str, str, int, int], ...], ...]
    # per rank: (start_ns, end_ns) of the step itself
    bounds: Tuple[Tuple[int, int], ...]

    @property
    def step_time_ns(self) -> int:
        """Wall time of the step: first rank's start to last rank's end."""
        return max(e for _, e in self.bounds) - min(s for s, _ in self.bounds)


def load_record(path: str) -> Dict[str, Any]:
    """Load and check one rank's record file; raises ``ValueError`` saying what is wrong."""
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        raise ValueError(f"cannot read trace file {path!r}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"trace file {path!r} is not JSON: {e}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"trace file {path!r} is not a dualpipe_ext timeline record (expected \"format\": \"{FORMAT}\")")
    for key in ("rank", "ranks", "chunks", "steps", "events"):
        if key not in data:
            raise ValueError(f"trace file {path!r} lacks the field {key!r}")
    if not isinstance(data["events"], list) or not isinstance(data["steps"], list):
        raise ValueError(f"trace file {path!r}: 'events' and 'steps' must be lists")
    for ev in data["events"]:
        if not isinstance(ev, dict) or any(k not in ev for k in _EVENT_KEYS):
            raise ValueError(f"trace file {path!r}: event {ev!r} lacks one of {', '.join(_EVENT_KEYS)}")
    data["_path"] = path
    return data


def merge_step(records: Sequence[Dict[str, Any]], step: int = -1) -> RunStep:
    """Merge the records of all ranks for one step (default: the last one every rank recorded)."""
    if not records:
        raise ValueError("no trace files given: pass one record file per pipeline rank")
    by_rank: Dict[int, Dict[str, Any]] = {}
    for rec in records:
        r = int(rec["rank"])
        if r in by_rank:
            raise ValueError(f"two trace files for pipeline rank {r}: {by_rank[r]['_path']!r} and {rec.get('_path')!r}")
        by_rank[r] = rec
    ranks = int(records[0]["ranks"])
    plan = {(rec.get("schedule", ""), int(rec["ranks"]), int(rec["chunks"])) for rec in records}
    if len(plan) != 1:
        raise ValueError(f"trace files come from different plans: {sorted(plan)}")
    if sorted(by_rank) != list(range(ranks)):
        raise ValueError(f"expected one trace file for each of the {ranks} ranks, got ranks {sorted(by_rank)}")
    num_steps = min(len(rec["steps"]) for rec in records)
    if num_steps == 0:
        raise ValueError("trace files hold no recorded step")
    if not -num_steps <= step < num_steps:
        raise ValueError(f"step {step} out of range: the records hold {num_steps} step(s)")
    step = step % num_steps

    compute: List[List[Tuple[str, int, int]]] = []
    other: List[List[Tuple[str, str, int, int]]] = []
    bounds: List[Tuple[int, int]] = []
    for r in range(ranks):
        rec = by_rank[r]
        off = int(rec.get("clock_offset_ns", 0) or 0)
        s, e = rec["steps"][step]
        bounds.append((int(s) + off, int(e) + off))
        evs = [ev for ev in rec["events"] if ev["step"] == step]
        compute.append(sorted(
            ((ev["name"], int(ev["start_ns"]) + off, int(ev["end_ns"]) + off) for ev in evs if ev["cat"] == "compute"),
            key=lambda x: (x[1], x[2]),
        ))
        other.append(sorted(
            ((ev["name"], ev["cat"], int(ev["start_ns"]) + off, int(ev["end_ns"]) + off)
             for ev in evs if ev["cat"] != "compute"),
            key=lambda x: (x[2], x[3]),
        ))
    t0 = min(s for s, _ in bounds)
    return RunStep(
        schedule=records[0].get("schedule", ""),
        ranks=ranks,
        chunks=int(records[0]["chunks"]),
        step=step,
        compute=tuple(tuple(TimedAction(n, s - t0, e - t0) for n, s, e in row) for row in compute),
        other=tuple(tuple((n, c, s - t0, e - t0) for n, c, s, e in row) for row in other),
        bounds=tuple((s - t0, e - t0) for s, e in bounds),
    )
