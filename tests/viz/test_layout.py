"""What the timeline drawing lays out: one box per compute action, honest colours and legend."""
from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from dualpipe_ext.schedules import trace
from dualpipe_ext.viz import COLOURS, draw_timeline, layout
from dualpipe_ext.viz.layout import PAIR_LEGEND
from timeline_helpers import sequential_timeline

SIZES = [("dualpipe", 4, 8), ("dualpipe", 8, 20), ("dualpipev", 2, 4), ("dualpipev", 4, 10),
         ("1f1b", 4, 8), ("zb1p", 4, 8), ("gpipe", 3, 5)]


@pytest.mark.parametrize("name,ranks,chunks", SIZES)
def test_boxes_match_trace_and_do_not_overlap(name, ranks, chunks):
    d = layout(sequential_timeline(name, ranks, chunks, gap=0.25), schedule=name)
    expected = trace(name, ranks, chunks)
    assert len(d.rows) == ranks
    for r, row in enumerate(d.rows):
        assert [b.token for b in row] == expected[r]
        for a, b in zip(row, row[1:]):
            assert a.end <= b.start, (r, a.token, b.token)
        for box in row:
            assert box.cells[0].start == box.start and box.cells[-1].end == box.end
            for x, y in zip(box.cells, box.cells[1:]):
                assert x.end == y.start and x.start < x.end
            assert len(box.cells) == (2 if "+" in box.token else 1)
    assert d.colours_used() == d.legend_colours()
    assert d.makespan == max(b.end for row in d.rows for b in row)
    assert min(b.start for row in d.rows for b in row) == 0


def test_pairs_modules_and_weight_cells():
    d = layout(sequential_timeline("dualpipe", 4, 8), schedule="dualpipe")
    row0 = d.rows[0]
    pair = next(b for b in row0 if b.token == "F0.3+B1.1")
    f, b = pair.cells
    assert (f.kind, f.module, f.mb, f.colour) == ("forward", 0, 3, COLOURS[("forward", 0)])
    assert (b.kind, b.module, b.mb, b.colour) == ("backward", 1, 1, COLOURS[("backward", 1)])
    # F:B = 1:2 in the lone actions, so the forward half gets a third of the pair
    assert f.end - f.start == pytest.approx((pair.end - pair.start) / 3)
    # rank 0: ... B1.0z W ...: the W finishes micro-batch 0 of module 1
    i = [x.token for x in row0].index("B1.0z")
    w = row0[i + 1].cells[0]
    assert (w.kind, w.module, w.mb, w.label) == ("weight", 1, 0, "0")
    names = [n for n, _ in d.legend]
    assert "Forward (reverse direction)" in names and PAIR_LEGEND in names
    assert len(set(COLOURS.values())) == len(COLOURS)


def test_legend_names_second_leg_for_dualpipev_and_single_module_schedules():
    v = layout(sequential_timeline("dualpipev", 4, 10), schedule="dualpipev")
    assert "Forward (second leg of the V)" in [n for n, _ in v.legend]
    g = layout(sequential_timeline("1f1b", 4, 8), schedule="1f1b")
    assert [n for n, _ in g.legend] == ["Forward", "Backward"]
    assert g.colours_used() == {COLOURS[("forward", 0)], COLOURS[("backward", 0)]}


def test_large_plans_stay_bounded_and_labels_shrink_or_drop():
    big = layout(sequential_timeline("dualpipe", 16, 64), schedule="dualpipe")
    assert big.width_in <= 41.2 and big.height_in < 6.5
    # 16 ranks x 64 chunks still fits every two-digit micro-batch number
    assert all(c.label for row in big.rows for b in row for c in b.cells)
    # very short weight-gradient actions: their labels go, the others stay
    tl = [[(t, s * 10, s * 10 + (0.05 if t == "W" else (e - s) * 10)) for t, s, e in row]
          for row in sequential_timeline("dualpipe", 16, 64)]
    d = layout(tl, schedule="dualpipe")
    assert d.width_in <= 41.2
    cells = [c for row in d.rows for b in row for c in b.cells]
    assert all(c.label == "" and c.font_size == 0 for c in cells if c.kind == "weight")
    assert all(c.label and c.font_size >= 4.5 for c in cells if c.kind == "forward")


@pytest.mark.parametrize("bad,msg", [
    ([], "non-empty"),
    ([[("F0.0", 1.0)]], "expected \\(token, start, end\\)"),
    ([[("F0.0", 2.0, 1.0)]], "ends"),
    ([[("X0.0", 0.0, 1.0)]], "malformed compute token"),
    ([[("F0.0+F1.0", 0.0, 1.0)]], "malformed overlapped pair"),
])
def test_bad_timelines_are_rejected(bad, msg):
    with pytest.raises(ValueError, match=msg):
        layout(bad)


def test_svg_and_png_written(tmp_path):
    tl = sequential_timeline("dualpipev", 4, 10)
    svg = tmp_path / "v.svg"
    d = draw_timeline(tl, str(svg), schedule="dualpipev")
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg")
    text = svg.read_text()
    for colour in d.legend_colours():
        assert colour.lower() in text.lower()
    png = tmp_path / "v.png"
    draw_timeline(tl, str(png), schedule="dualpipev")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="ending in one of"):
        draw_timeline(tl, str(tmp_path / "v.txt"))
