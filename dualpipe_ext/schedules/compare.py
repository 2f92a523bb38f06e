"""Compare every registered schedule at one size: simulated makespan, bubbles, memory, and the closed-form bubble."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from dualpipe_ext.schedules.analysis import Costs, closed_form_bubble, simulate
from dualpipe_ext.schedules.registry import get_plan, schedule_info, schedule_names

__all__ = ["Row", "compare", "format_table", "pick_best"]


@dataclass(frozen=True)
class Row:
    """One schedule at the requested size."""

    name: str
    error: str  # why the schedule is invalid at this size; "" when valid
    makespan: float = 0.0
    bubble_mean: float = 0.0  # idle time per rank, mean over ranks
    bubble_worst: float = 0.0  # idle time of the idlest rank
    bubble_ratio: float = 0.0  # mean bubble / makespan
    closed_form: Optional[float] = None  # DualPipe README formula; None where it gives none
    peak_activations: int = 0  # most live forward activations on any rank
    params: str = ""  # parameters per device relative to one stage: "1x" or "2x"
    devices: int = 0
    stages: int = 0


def compare(ranks: int, chunks: int, costs: Costs, names: Optional[Sequence[str]] = None) -> List[Row]:
    """Simulate every registered schedule (or ``names``) at ``ranks`` x ``chunks``; invalid ones carry their reason."""
    rows = []
    for name in names or schedule_names():
        info = schedule_info(name)
        try:
            plan = get_plan(name, ranks, chunks)
            sim = simulate(plan, costs=costs)
        except ValueError as e:
            rows.append(Row(name=name, error=str(e).splitlines()[0]))
            continue
        try:
            closed = closed_form_bubble(name, ranks, costs)
        except ValueError:
            closed = None
        bubbles = list(sim.bubble)
        mean = sum(bubbles) / len(bubbles)
        rows.append(
            Row(
                name=name,
                error="",
                makespan=sim.makespan,
                bubble_mean=mean,
                bubble_worst=max(bubbles),
                bubble_ratio=mean / sim.makespan if sim.makespan > 0 else 0.0,
                closed_form=closed,
                peak_activations=max(sim.peak_activations),
                params=f"{info.modules_per_rank}x",
                devices=ranks,
                stages=ranks * info.stages_per_rank,
            )
        )
    return rows


def pick_best(rows: Sequence[Row], memory: Optional[int]) -> Tuple[Optional[Row], str]:
    """The valid row with the smallest makespan whose peak activations fit in ``memory``; else a reason."""
    valid = [r for r in rows if not r.error]
    if not valid:
        return None, "no schedule is valid at this size"
    fits = [r for r in valid if memory is None or r.peak_activations <= memory]
    if not fits:
        least = min(r.peak_activations for r in valid)
        return None, f"no schedule fits in {memory} activations; the smallest peak is {least}"
    return min(fits, key=lambda r: (r.makespan, r.peak_activations, r.name)), ""


def _num(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.4g}"


def format_table(rows: Sequence[Row], best: Optional[Row] = None) -> str:
    """A fixed-width table of valid schedules, then the invalid ones with their reasons."""
    head = ("schedule", "makespan", "bubble mean", "bubble worst", "ratio", "closed-form", "peak act",
            "params", "devices", "stages")
    body = []
    for r in rows:
        if r.error:
            continue
        mark = " *" if best is not None and r.name == best.name else ""
        body.append((r.name + mark, _num(r.makespan), _num(r.bubble_mean), _num(r.bubble_worst),
                     f"{100 * r.bubble_ratio:.1f}%", _num(r.closed_form), str(r.peak_activations), r.params,
                     str(r.devices), str(r.stages)))
    lines = []
    if body:
        widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
        fmt = lambda cols: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cols, widths)))
        lines.append(fmt(head))
        lines.append("  ".join("-" * w for w in widths))
        lines.extend(fmt(b) for b in body)
    invalid = [r for r in rows if r.error]
    if invalid:
        lines.append("")
        lines.append("not valid at this size:")
        lines.extend(f"  {r.name}: {r.error}" for r in invalid)
    return "\n".join(lines)
