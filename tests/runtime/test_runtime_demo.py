"""The packaged demo runs, checks itself against the sequential reference and says so."""
import pytest
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_demo_passes_its_own_check():
    proc = subprocess.run(
        [sys.executable, "-m", "dualpipe_ext.demo.pipeline", "--ranks", "2", "--chunks", "4",
         "--steps", "1", "--timeout", "90"],
        capture_output=True, text=True, timeout=900)  # a hang guard; --timeout bounds the ranks
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("every gradient 1 - cos < 1e-12: OK") == 2, proc.stdout


def _svg_groups(path):
    """Number of drawn shapes in each id'd group of a timeline SVG (raises if the file is not XML)."""
    import xml.etree.ElementTree as ET

    ns = "{http://www.w3.org/2000/svg}"
    root = ET.parse(path).getroot()
    assert root.tag == ns + "svg"
    return {g.get("id"): len(g.findall(f".//{ns}path")) for g in root.iter(ns + "g") if g.get("id")}


@pytest.mark.slow
def test_demo_timeline_and_records(tmp_path, capsys):
    import json

    from dualpipe_ext.cli import main
    from dualpipe_ext.schedules import trace
    from dualpipe_ext.viz.records import load_record

    svg, rec = tmp_path / "timeline.svg", tmp_path / "rec"
    proc = subprocess.run(
        [sys.executable, "-m", "dualpipe_ext.demo.pipeline", "--ranks", "4", "--chunks", "8",
         "--steps", "2", "--timeout", "90", "--timeline", str(svg), "--record", str(rec)],
        capture_output=True, text=True, timeout=900)  # a hang guard; --timeout bounds the ranks
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("every gradient 1 - cos < 1e-12: OK") == 2, proc.stdout
    for name in ("dualpipe", "dualpipev"):
        picture = tmp_path / f"timeline-{name}.svg"
        assert f"timeline: {picture}" in proc.stdout and str(rec / name / "rank*.json") in proc.stdout
        records = [load_record(str(rec / name / f"rank{r}.json")) for r in range(4)]
        assert all(len(r["steps"]) == 2 for r in records)
        # The picture is the last step: one outlined box per recorded compute action, in plan order.
        last = [[e for e in r["events"] if e["cat"] == "compute" and e["step"] == 1] for r in records]
        assert [[e["name"] for e in row] for row in last] == trace(name, 4, 8)
        groups = _svg_groups(picture)
        n = sum(map(len, last))
        assert groups["actions"] == n
        assert groups["cells"] == n + sum(e["name"].count("+") for row in last for e in row)
        chrome = tmp_path / f"{name}.json"
        code = main(["trace", *[str(rec / name / f"rank{r}.json") for r in range(4)], "--chrome", str(chrome),
                     "--svg", str(tmp_path / f"{name}-trace.svg"), "--predict"])
        out = capsys.readouterr().out
        assert code == 0, out
        assert "simulator (as the gloo runtime runs)" in out and "relative error" in out
        assert _svg_groups(tmp_path / f"{name}-trace.svg")["actions"] == n
        assert sum(1 for ev in json.load(open(chrome))["traceEvents"] if ev.get("cat") == "compute") == n
