"""Pictures and traces of pipeline schedules: timeline drawing, Chrome-trace export, run prediction.

Nothing here imports matplotlib until a picture is written.
"""
from __future__ import annotations

from dualpipe_ext.viz.layout import COLOURS, Box, Cell, Drawing, layout
from dualpipe_ext.viz.render import render

__all__ = ["COLOURS", "Box", "Cell", "Drawing", "draw_timeline", "layout", "render"]


def draw_timeline(timeline, path: str, schedule: str = "", time_unit: str = "cost units", title: str = "") -> Drawing:
    """Lay out ``timeline`` (per rank: (token, start, end)), write it to ``path`` and return what was drawn."""
    drawing = layout(timeline, schedule=schedule or None, time_unit=time_unit, title=title)
    render(drawing, path)
    return drawing
