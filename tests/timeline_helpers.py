"""Test scaffolding: timelines and run records built from schedule traces with fixed costs."""
from __future__ import annotations

import json
import os
from typing import List, Tuple

from dualpipe_ext.schedules import Costs, trace
from dualpipe_ext.schedules.tokens import BACKWARD, BACKWARD_INPUT, FORWARD, WEIGHT, compute_parts


def cost_of(token: str, costs: Costs = Costs()) -> float:
    """What the simulator charges for a compute token under ``costs`` (the defaults: F 1, B 2, W 1)."""
    first, second = compute_parts(token)
    if second is not None:
        return costs.FB
    return {FORWARD: costs.F, BACKWARD: costs.B, BACKWARD_INPUT: costs.B - costs.W, WEIGHT: costs.W}[first.kind]


def sequential_timeline(name: str, ranks: int, chunks: int, gap: float = 0.0) -> List[List[Tuple[str, float, float]]]:
    """Each rank runs its trace back to back (rank r starting at r), with ``gap`` between actions.

    Not dependency-correct; enough to check what the drawing does with any timeline.
    """
    out = []
    for r, row in enumerate(trace(name, ranks, chunks)):
        t = float(r)
        items = []
        for tok in row:
            d = cost_of(tok)
            items.append((tok, t, t + d))
            t += d + gap
        out.append(items)
    return out


def write_records(tmpdir: str, name: str, ranks: int, chunks: int, scale_ns: int = 1_000_000) -> List[str]:
    """Per-rank record files in the runtime's format, for two steps of a sequential timeline."""
    paths = []
    tl = sequential_timeline(name, ranks, chunks, gap=0.1)
    span = max(e for row in tl for _, _, e in row) + 1
    for r, row in enumerate(tl):
        events, steps = [], []
        for step in range(2):
            base = int(step * span * scale_ns) + 5_000_000_000
            steps.append([base, base + int(span * scale_ns)])
            for i, (tok, s, e) in enumerate(row):
                events.append({"name": tok, "cat": "compute", "start_ns": base + int(s * scale_ns),
                               "end_ns": base + int(e * scale_ns), "step": step, "index": 3 * i})
                events.append({"name": "wait", "cat": "comm", "start_ns": base + int(e * scale_ns),
                               "end_ns": base + int((e + 0.05) * scale_ns), "step": step, "index": 3 * i + 1})
        rec = {"format": "dualpipe_ext.timeline/1", "rank": r, "global_rank": r, "schedule": name,
               "ranks": ranks, "chunks": chunks, "clock_offset_ns": 0, "steps": steps, "events": events}
        path = os.path.join(tmpdir, f"rank{r}.json")
        with open(path, "w") as f:
            json.dump(rec, f)
        paths.append(path)
    return paths
