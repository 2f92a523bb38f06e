"""Write a :class:`~dualpipe_ext.viz.layout.Drawing`: SVG by :mod:`dualpipe_ext.viz.svg` (no optional
package), PNG and PDF painted with matplotlib (Agg, imported lazily; ``pip install -e ".[plot]"``)."""
from __future__ import annotations

import os

from dualpipe_ext.viz.layout import Drawing

__all__ = ["render", "FORMATS"]

FORMATS = (".svg", ".png", ".pdf")
_DPI = 150
_GRID = "#D5D8DC"


def render(drawing: Drawing, path: str) -> str:
    """Write the picture to ``path`` (``.svg``, ``.png`` or ``.pdf``, chosen by suffix); returns ``path``."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"the picture's path must be a str or os.PathLike, got {type(path).__name__} {path!r}")
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise ValueError(f"cannot write {path!r}: expected a file name ending in one of {', '.join(FORMATS)}")
    if ext == ".svg":
        from dualpipe_ext.viz.svg import write_svg

        return write_svg(drawing, path)
    matplotlib = _require_matplotlib(ext)

    matplotlib.use("Agg", force=False)
    from matplotlib.collections import PatchCollection
    from matplotlib.figure import Figure
    from matplotlib.legend_handler import HandlerTuple
    from matplotlib.patches import Patch, Rectangle

    n = len(drawing.rows)
    fig = Figure(figsize=(drawing.width_in, drawing.height_in))
    left = 0.9 / drawing.width_in
    bottom = 0.95 / drawing.height_in
    top = 1.0 - 0.35 / drawing.height_in
    ax = fig.add_axes((left, bottom, drawing.axes_width_in / drawing.width_in, top - bottom))

    fills, colours, outlines = [], [], []
    for r, row in enumerate(drawing.rows):
        y = n - 1 - r  # rank 0 on top
        for box in row:
            outlines.append(Rectangle((box.start, y), box.end - box.start, 1.0))
            for c in box.cells:
                fills.append(Rectangle((c.start, y), c.end - c.start, 1.0))
                colours.append(c.colour)
                if c.label:
                    ax.text(
                        (c.start + c.end) / 2, y + 0.5, c.label, ha="center", va="center",
                        fontsize=c.font_size, color=c.text_colour,
                    )
    # Group ids in SVG output: "cells" holds one path per cell, "actions" one outline per action.
    ax.add_collection(PatchCollection(fills, facecolors=colours, edgecolors="none", linewidths=0, gid="cells"))
    # Black outlines per action: an overlapped pair shares one border around both halves.
    ax.add_collection(PatchCollection(outlines, facecolors="none", edgecolors="black", linewidths=0.6, gid="actions"))
    for y in range(n + 1):
        ax.axhline(y, color=_GRID, linewidth=0.5, zorder=0)

    ax.set_xlim(0, drawing.makespan)
    ax.set_ylim(0, n)
    ax.set_yticks([n - 1 - r + 0.5 for r in range(n)])
    ax.set_yticklabels([f"Device {r}" for r in range(n)], fontsize=8, fontweight="bold")
    ax.tick_params(axis="y", length=0)
    ax.tick_params(axis="x", labelsize=7)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    ax.set_xlabel(f"Time ({drawing.time_unit}) \u2192", fontsize=8, loc="left")
    if drawing.title:
        ax.set_title(drawing.title, fontsize=9, loc="left")

    handles, labels = [], []
    for name, cols in drawing.legend:
        patches = tuple(Patch(facecolor=col, edgecolor="black", linewidth=0.6) for col in cols)
        handles.append(patches if len(patches) > 1 else patches[0])
        labels.append(name)
    if handles:
        fig.legend(
            handles, labels, loc="lower center", ncol=min(len(handles), 5), fontsize=7, frameon=False,
            handler_map={tuple: HandlerTuple(ndivide=None, pad=0)}, bbox_to_anchor=(0.5, 0.0),
        )
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    # Text stays text in SVG: smaller files, searchable labels.
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "dualpipe-ext"}):
        if ext == ".png":
            _save_png(fig, path)
        else:
            fig.savefig(path, dpi=_DPI, metadata={"Date": None} if ext == ".svg" else None)
    return path


def _require_matplotlib(ext: str):
    """``import matplotlib``, or an ImportError of one line naming it and the extra that installs it."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError(f"writing a {ext} picture needs matplotlib, which is not installed: "
                          f"pip install -e \".[plot]\" (or write an .svg, which needs nothing)") from None
    return matplotlib


def _save_png(fig, path: str) -> None:
    """PNG with a 256-colour palette: the picture is flat colours, and the file gets several times smaller."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    buf.seek(0)
    with Image.open(buf) as im:
        im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
