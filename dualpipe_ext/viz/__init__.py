"""Pictures and traces of pipeline schedules: timeline drawing, run records, Chrome-trace export.

The analysis behind them (comparison table, prediction of a recorded step) lives in
:mod:`dualpipe_ext.schedules`.

Nothing here imports matplotlib until a picture is written.
"""
from __future__ import annotations

from dualpipe_ext.schedules.analysis import TimedAction
from dualpipe_ext.viz.layout import COLOURS, Box, Cell, Drawing, layout
from dualpipe_ext.viz.render import render

__all__ = ["COLOURS", "Box", "Cell", "Drawing", "draw_run", "draw_timeline", "layout", "measured_timeline", "render"]


def draw_timeline(timeline, path: str, schedule: str = "", time_unit: str = "cost units", title: str = "") -> Drawing:
    """Lay out ``timeline`` (per rank: ``TimedAction``s or (token, start, end)), write it to ``path`` and return what was drawn."""
    drawing = layout(timeline, schedule=schedule or None, time_unit=time_unit, title=title)
    render(drawing, path)
    return drawing


def measured_timeline(run):
    """Per rank, each compute action of a merged recorded step (:class:`~dualpipe_ext.viz.records.RunStep`) as a
    ``TimedAction`` in milliseconds."""
    return [[TimedAction(t, s / 1e6, e / 1e6) for t, s, e in row] for row in run.compute]


def draw_run(run, path: str, title: str = "") -> Drawing:
    """Draw the measured timeline of a merged recorded step to ``path`` (milliseconds on the time axis)."""
    if not title:
        title = f"{run.schedule}: {run.ranks} ranks, {run.chunks} micro-batches; measured step {run.step}"
    return draw_timeline(measured_timeline(run), path, schedule=run.schedule, time_unit="ms", title=title)
