"""Lay out a per-rank timeline as the cells of a DualPipe-style picture, without drawing it.

The layout is a plain description (boxes, cells, colours, labels, legend, figure size)
so that tests can check what would be drawn and :mod:`dualpipe_ext.viz.render` only paints.
It serves simulated timelines (cost units) and measured ones (milliseconds) alike.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Deque, Dict, List, Optional, Sequence, Tuple

from dualpipe_ext.schedules.analysis import TimedAction
from dualpipe_ext.schedules.registry import schedule_info, schedule_names
from dualpipe_ext.schedules.tokens import BACKWARD, BACKWARD_INPUT, FORWARD, KINDS, WEIGHT, Part, compute_parts

__all__ = ["Box", "Cell", "Drawing", "Timeline", "layout", "COLOURS"]

# Per rank: each compute action (token, start, end) in execution order; plain 3-tuples are accepted too.
Timeline = Sequence[Sequence[TimedAction]]

# (kind, module) -> fill colour. Module 1 (reverse direction of DualPipe, second leg of
# DualPipeV) is a darker shade of the same hue. Hues follow the DualPipe README figure.
COLOURS: Dict[Tuple[str, int], str] = {
    (FORWARD, 0): "#F5B041",
    (FORWARD, 1): "#B9770E",
    (BACKWARD, 0): "#52BE80",
    (BACKWARD, 1): "#1E8449",
    (BACKWARD_INPUT, 0): "#A9DF7F",
    (BACKWARD_INPUT, 1): "#6E9E3C",
    (WEIGHT, 0): "#85C1E9",
    (WEIGHT, 1): "#2E86C1",
}
_DARK = {COLOURS[(kind, 1)] for kind in KINDS}
_KIND_NAMES = {FORWARD: "Forward", BACKWARD: "Backward", BACKWARD_INPUT: "Backward input", WEIGHT: "Weight"}
PAIR_LEGEND = "Overlapped forward & backward"

# Geometry, in inches and points. A shortest action gets _MIN_CELL_IN so that its
# micro-batch number stays legible; past _MAX_WIDTH_IN labels shrink, then disappear.
_MIN_CELL_IN = 0.26
_MIN_WIDTH_IN, _MAX_WIDTH_IN = 6.0, 40.0
_ROW_IN = 0.3
_LEFT_IN, _RIGHT_IN, _TOP_IN, _BOTTOM_IN = 0.9, 0.2, 0.35, 0.95
_MAX_FONT_PT, _MIN_FONT_PT = 9.0, 4.5
_CHAR_WIDTH = 0.62  # glyph width of a digit as a fraction of the font size


@dataclass(frozen=True)
class Cell:
    """A filled rectangle: one computation (half of the box for an overlapped pair)."""

    kind: str  # a computation's kind (schedules.tokens.KINDS): "forward", "backward", "backward_input", "weight"
    module: int  # 0 or 1; -1 for a W whose backward was not in the timeline
    mb: int  # micro-batch within the module; -1 when unknown
    start: float
    end: float
    colour: str  # fill colour, one of COLOURS
    label: str  # text drawn in the cell; "" when the cell is too narrow
    font_size: float  # points; 0 when there is no label
    text_colour: str


@dataclass(frozen=True)
class Box:
    """One compute action, outlined in black; holds one cell, or two for an overlapped pair."""

    rank: int
    token: str
    start: float
    end: float
    cells: Tuple[Cell, ...]


@dataclass(frozen=True)
class Drawing:
    """Everything a timeline picture shows."""

    rows: Tuple[Tuple[Box, ...], ...]  # per rank, in time order
    legend: Tuple[Tuple[str, Tuple[str, ...]], ...]  # (entry, its colours); pairs show two
    makespan: float  # end of the last action, with time starting at 0
    time_unit: str  # x-axis unit
    title: str
    width_in: float  # figure size, inches
    height_in: float
    axes_width_in: float  # width of the time axis, inches

    def colours_used(self) -> set:
        return {c.colour for row in self.rows for b in row for c in b.cells}

    def legend_colours(self) -> set:
        return {c for _, cols in self.legend for c in cols}


def _check(timeline: Timeline) -> List[List[TimedAction]]:
    if not isinstance(timeline, (list, tuple)) or not timeline:
        raise ValueError("timeline must be a non-empty list with one list of (token, start, end) per rank")
    rows = []
    for r, row in enumerate(timeline):
        clean = []
        for item in row:
            try:
                token, start, end = item
                start, end = float(start), float(end)
            except (TypeError, ValueError):
                raise ValueError(f"rank {r}: expected (token, start, end) entries, got {item!r}") from None
            if end < start:
                raise ValueError(f"rank {r}: action {token!r} ends ({end}) before it starts ({start})")
            if any(p is not None and p.module > 1 for p in compute_parts(token)):
                raise ValueError(f"rank {r}: action {token!r} names a module above 1; a rank draws modules 0 and 1")
            clean.append(TimedAction(token, start, end))
        clean.sort(key=lambda e: (e[1], e[2]))
        rows.append(clean)
    return rows


def _pair_split(rows: List[List[TimedAction]]) -> float:
    """Fraction of an overlapped pair drawn as its forward.

    Mean lone forward over mean lone forward plus mean lone backward (backward inputs where
    no backward runs alone; half when there is neither).
    """
    durs: Dict[str, List[float]] = {FORWARD: [], BACKWARD: [], BACKWARD_INPUT: []}
    for row in rows:
        for token, s, e in row:
            part, second = compute_parts(token)
            if second is None and part.kind in durs:
                durs[part.kind].append(e - s)
    mean = {k: sum(v) / len(v) for k, v in durs.items() if v}
    f, b = mean.get(FORWARD), mean.get(BACKWARD, mean.get(BACKWARD_INPUT))
    return 0.5 if f is None or b is None or f + b <= 0 else min(0.8, max(0.2, f / (f + b)))


def _module1_name(schedule: Optional[str]) -> str:
    """What local module 1 is in the legend: the registry's word for it, else "module 1"."""
    if schedule in schedule_names():
        return schedule_info(schedule).module1 or "module 1"
    return "module 1"


def layout(
    timeline: Timeline,
    schedule: Optional[str] = None,
    time_unit: str = "cost units",
    title: str = "",
) -> Drawing:
    """Describe the picture of ``timeline`` (per rank: (token, start, end)).

    ``schedule`` names what module 1 is in the legend (the registry's ``module1``: DualPipe's
    reverse direction, DualPipeV's second leg of the V). Times are shifted so the earliest
    start is 0.
    """
    rows = _check(timeline)
    starts = [s for row in rows for _, s, _ in row]
    if not starts:
        raise ValueError("timeline has no actions on any rank")
    t0 = min(starts)
    makespan = max(e for row in rows for _, _, e in row) - t0
    # The shortest action that matters: near-empty measured actions (under a fifth of the
    # median) would otherwise stretch the whole figure.
    durations = sorted(e - s for row in rows for _, s, e in row if e > s)
    median = durations[len(durations) // 2] if durations else 1.0
    shortest = min((d for d in durations if d >= 0.2 * median), default=1.0)
    if makespan <= 0:
        makespan = 1.0
    axes_w = min(_MAX_WIDTH_IN, max(_MIN_WIDTH_IN, makespan / shortest * _MIN_CELL_IN))
    width = axes_w + _LEFT_IN + _RIGHT_IN
    height = len(rows) * _ROW_IN + _TOP_IN + _BOTTOM_IN
    pt_per_unit = axes_w * 72.0 / makespan
    row_pt = _ROW_IN * 72.0
    split = _pair_split(rows)

    def cell(part: Part, start: float, end: float) -> Cell:
        colour = COLOURS[(part.kind, max(part.module, 0))]
        label = str(part.mb) if part.mb >= 0 else ""
        size = 0.0
        if label:
            size = min(_MAX_FONT_PT, 0.55 * row_pt, (end - start) * pt_per_unit * 0.9 / (_CHAR_WIDTH * len(label)))
            if size < _MIN_FONT_PT:
                label, size = "", 0.0
        text = "white" if colour in _DARK else "black"
        return Cell(part.kind, part.module, part.mb, start - t0, end - t0, colour, label, round(size, 2), text)

    out_rows = []
    for r, row in enumerate(rows):
        pending: Deque[Part] = deque()  # backward-input parts whose W has not run yet
        boxes = []
        for token, s, e in row:
            first, second = compute_parts(token)
            if second is not None:
                mid = s + (e - s) * split
                cells: Tuple[Cell, ...] = (cell(first, s, mid), cell(second, mid, e))
                parts = (first, second)
            else:
                if first.kind == WEIGHT and pending:
                    origin = pending.popleft()
                    first = Part(WEIGHT, origin.module, origin.mb)
                cells = (cell(first, s, e),)
                parts = (first,)
            pending.extend(p for p in parts if p.kind == BACKWARD_INPUT)
            boxes.append(Box(r, token, s - t0, e - t0, cells))
        out_rows.append(tuple(boxes))

    used = {(c.kind, max(c.module, 0)) for row in out_rows for b in row for c in b.cells}
    has_pair = any(len(b.cells) == 2 for row in out_rows for b in row)
    legend: List[Tuple[str, Tuple[str, ...]]] = []
    other = _module1_name(schedule)
    two_modules = any(m == 1 for _, m in used)
    for kind in KINDS:
        for module in (0, 1):
            if (kind, module) in used:
                name = _KIND_NAMES[kind]
                if two_modules:
                    name += f" ({other})" if module == 1 else ""
                legend.append((name, (COLOURS[(kind, module)],)))
    if has_pair:
        pairs = [b.cells for row in out_rows for b in row if len(b.cells) == 2]
        # Show a pair of the first module's forward where there is one.
        shown = min(pairs, key=lambda cells: (cells[0].module != 0, cells[1].module, cells[1].kind))
        legend.append((PAIR_LEGEND, tuple(c.colour for c in shown)))
    return Drawing(
        rows=tuple(out_rows),
        legend=tuple(legend),
        makespan=makespan,
        time_unit=time_unit,
        title=title,
        width_in=round(width, 3),
        height_in=round(height, 3),
        axes_width_in=round(axes_w, 3),
    )
