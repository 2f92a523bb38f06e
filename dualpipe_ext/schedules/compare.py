"""Compare every schedule at one size: simulated makespan, bubbles, memory, and the closed-form bubble."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

__all__ = ["Row", "compare", "format_table", "pick_best", "parse_costs"]

# Schedules whose ranks hold two stage modules (parameters per device 2x).
_TWO_MODULES = {"dualpipe", "dualpipev"}
_COST_FIELDS = ("F", "B", "W", "FB", "P2P")


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


def parse_costs(text: str):
    """``"F,B,W,FB,P2P"`` (five non-negative numbers) -> ``Costs``; ``ValueError`` saying what is expected."""
    from dualpipe_ext.schedules import Costs

    parts = text.split(",")
    if len(parts) != len(_COST_FIELDS):
        raise ValueError(f"--costs {text!r}: expected five comma-separated numbers F,B,W,FB,P2P, e.g. 1,2,1,3,0")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"--costs {text!r}: expected five comma-separated numbers F,B,W,FB,P2P, e.g. 1,2,1,3,0") from None
    if any(not v >= 0 or v == float("inf") for v in values):
        raise ValueError(f"--costs {text!r}: costs must be finite and non-negative")
    if values[2] > values[1]:
        raise ValueError(f"--costs {text!r}: W ({values[2]:g}) cannot exceed the full backward B ({values[1]:g})")
    try:
        return Costs(**dict(zip(_COST_FIELDS, values)))
    except (ValueError, TypeError) as e:
        raise ValueError(f"--costs {text!r}: {e}") from None


def compare(ranks: int, chunks: int, costs, names: Optional[Sequence[str]] = None) -> List[Row]:
    """Simulate every schedule (or ``names``) at ``ranks`` x ``chunks``; invalid ones carry their reason."""
    from dualpipe_ext.schedules import closed_form_bubble, get_plan, schedule_names, simulate

    rows = []
    for name in names or schedule_names():
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
                params="2x" if name in _TWO_MODULES else "1x",
                devices=ranks,
                stages=len(plan.stages) * plan.num_modules if name == "dualpipev" else ranks,
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
