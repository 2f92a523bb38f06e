"""Write a :class:`~dualpipe_ext.viz.layout.Drawing` as SVG text, with nothing but the standard library.

The picture is the one :mod:`dualpipe_ext.viz.render` paints with matplotlib for PNG and PDF:
one row per rank ("Device r", rank 0 on top), a filled cell per computation with its
micro-batch number, a black outline per action (both halves of an overlapped pair inside one),
grid lines between rows, a time axis with ticks, a title and the legend below. Sizes are in
points (72 per inch), as the layout gives them in inches. Group ids: ``cells`` (one path per
cell), ``labels``, ``actions`` (one outline path per action), ``legend``.
"""
from __future__ import annotations

import math
import os
from typing import List, Tuple
from xml.sax.saxutils import escape

from dualpipe_ext.viz.layout import Drawing

__all__ = ["write_svg", "svg_text"]

_PT = 72.0  # points per inch
_LEFT_IN, _TOP_IN, _BOTTOM_IN = 0.9, 0.35, 0.95  # the axes' margins, as render.py places the axes
_GRID = "#D5D8DC"
_FONT = "DejaVu Sans, Arial, Helvetica, sans-serif"


def _num(v: float) -> str:
    return f"{v:.2f}".rstrip("0").rstrip(".") or "0"


def _box(x: float, y: float, w: float, h: float) -> str:
    """Path data of a rectangle (cells and outlines are paths, as matplotlib writes them)."""
    return f"M{_num(x)} {_num(y)}h{_num(w)}v{_num(h)}h{_num(-w)}Z"


def _ticks(makespan: float, width_pt: float) -> List[float]:
    """Round tick values along [0, makespan], about one per 60 points."""
    target = max(2, min(12, int(width_pt / 60)))
    raw = makespan / target
    mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    n = int(makespan / step + 1e-9)
    return [i * step for i in range(n + 1)]


def svg_text(drawing: Drawing) -> str:
    """The SVG document of ``drawing``."""
    w, h = drawing.width_in * _PT, drawing.height_in * _PT
    ax_x, ax_w = _LEFT_IN * _PT, drawing.axes_width_in * _PT
    ax_y, ax_h = _TOP_IN * _PT, h - (_TOP_IN + _BOTTOM_IN) * _PT
    n = max(1, len(drawing.rows))
    row_h = ax_h / n
    span = drawing.makespan if drawing.makespan > 0 else 1.0

    def x(t: float) -> float:
        return ax_x + t / span * ax_w

    out: List[str] = []
    if drawing.title:
        out.append(f'<text x="{_num(ax_x)}" y="{_num(ax_y - 6)}" font-size="9">{escape(drawing.title)}</text>')
    out.append('<g id="grid">')
    for i in range(n + 1):
        y = ax_y + i * row_h
        out.append(f'<line x1="{_num(ax_x)}" y1="{_num(y)}" x2="{_num(ax_x + ax_w)}" y2="{_num(y)}" '
                   f'stroke="{_GRID}" stroke-width="0.5"/>')
    out.append("</g>")
    cells, labels, outlines = ['<g id="cells">'], ['<g id="labels">'], ['<g id="actions">']
    for r, row in enumerate(drawing.rows):
        y = ax_y + r * row_h
        for box in row:
            outlines.append(f'<path d="{_box(x(box.start), y, x(box.end) - x(box.start), row_h)}" fill="none" '
                            f'stroke="black" stroke-width="0.6"><title>{escape(box.token)}</title></path>')
            for c in box.cells:
                cells.append(f'<path d="{_box(x(c.start), y, x(c.end) - x(c.start), row_h)}" fill="{c.colour}"/>')
                if c.label:
                    labels.append(f'<text x="{_num((x(c.start) + x(c.end)) / 2)}" y="{_num(y + row_h / 2)}" '
                                  f'font-size="{_num(c.font_size)}" fill="{c.text_colour}" text-anchor="middle" '
                                  f'dominant-baseline="central">{escape(c.label)}</text>')
        out.append(f'<text x="{_num(ax_x - 6)}" y="{_num(y + row_h / 2)}" font-size="8" font-weight="bold" '
                   f'text-anchor="end" dominant-baseline="central">Device {r}</text>')
    out += cells + ["</g>"] + labels + ["</g>"] + outlines + ["</g>"]
    base = ax_y + ax_h
    out.append(f'<g id="axis"><line x1="{_num(ax_x)}" y1="{_num(base)}" x2="{_num(ax_x + ax_w)}" y2="{_num(base)}" '
               f'stroke="black" stroke-width="0.8"/>')
    for t in _ticks(span, ax_w):
        out.append(f'<line x1="{_num(x(t))}" y1="{_num(base)}" x2="{_num(x(t))}" y2="{_num(base + 3.5)}" '
                   f'stroke="black" stroke-width="0.8"/><text x="{_num(x(t))}" y="{_num(base + 12)}" font-size="7" '
                   f'text-anchor="middle">{_num(t)}</text>')
    out.append(f'<text x="{_num(ax_x)}" y="{_num(base + 24)}" font-size="8">'
               f'Time ({escape(drawing.time_unit)}) \u2192</text></g>')
    legend, bottom = _legend(drawing, w, base + 34)
    h = max(h, bottom + 6)  # a legend of many rows makes the picture taller
    head = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_num(w)}pt" height="{_num(h)}pt" '
            f'viewBox="0 0 {_num(w)} {_num(h)}" font-family="{_FONT}">',
            f'<rect x="0" y="0" width="{_num(w)}" height="{_num(h)}" fill="white"/>']
    return "\n".join(head + out + legend + ["</svg>"]) + "\n"


def _legend(drawing: Drawing, w: float, top: float) -> Tuple[List[str], float]:
    """Entries in as many columns as fit (up to five, filled top to bottom as matplotlib's legend),
    centred below ``top``: swatches (two for an overlapped pair), then the name. Returns the
    elements and the bottom of the legend."""
    entries = drawing.legend
    if not entries:
        return [], top
    swatch, gap, char, line = 10.0, 14.0, 3.9, 11.0  # points; char: mean glyph width at 7 pt
    entry_w = [len(cols) * swatch + 4 + len(name) * char for name, cols in entries]
    for ncol in range(min(len(entries), 5), 0, -1):
        nrow = -(-len(entries) // ncol)
        columns = [c for c in (list(range(k * nrow, min((k + 1) * nrow, len(entries)))) for k in range(ncol)) if c]
        width = [max(entry_w[i] for i in col) for col in columns]
        if sum(width) + gap * (len(columns) - 1) <= w - 10:
            break
    cx = max(5.0, (w - sum(width) - gap * (len(columns) - 1)) / 2)
    out = ['<g id="legend">']
    for col, cw in zip(columns, width):
        for k, i in enumerate(col):
            name, cols = entries[i]
            y = top + 8 + k * line
            for j, colour in enumerate(cols):
                out.append(f'<rect x="{_num(cx + j * swatch)}" y="{_num(y - 7)}" width="{_num(swatch)}" height="7" '
                           f'fill="{colour}" stroke="black" stroke-width="0.6"/>')
            out.append(f'<text x="{_num(cx + len(cols) * swatch + 4)}" y="{_num(y)}" font-size="7">'
                       f'{escape(name)}</text>')
        cx += cw + gap
    out.append("</g>")
    return out, top + 8 + (nrow - 1) * line + 3


def write_svg(drawing: Drawing, path: str) -> str:
    """Write ``drawing`` to ``path`` as SVG; returns ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(svg_text(drawing))
    return path
