"""The dualpipe-ext command line: pictures, the simulate table, traces, and one-line errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from dualpipe_ext.cli import main
from timeline_helpers import write_records


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name,ranks,chunks", [("dualpipe", 4, 8), ("dualpipev", 2, 4), ("zb1p", 4, 8)])
def test_schedule_draws_every_action(tmp_path, capsys, name, ranks, chunks):
    out = tmp_path / f"{name}.svg"
    code, text, err = run(capsys, "schedule", name, "--ranks", str(ranks), "--chunks", str(chunks),
                          "--out", str(out), "--costs", "1,2,1,2.5,0.1")
    assert code == 0 and err == ""
    from dualpipe_ext.schedules import trace

    n = sum(len(row) for row in trace(name, ranks, chunks))
    assert f"{n} compute actions" in text
    assert ET.parse(out).getroot().tag.endswith("svg")


def test_simulate_table_and_best(capsys):
    code, text, err = run(capsys, "simulate", "--ranks", "4", "--chunks", "8")
    assert code == 0
    for name in ("dualpipe", "dualpipev", "1f1b", "zb1p", "gpipe"):
        assert name in text
    dp = next(line for line in text.splitlines() if line.startswith("dualpipe "))
    cols = dp.split()
    # name, makespan, bubble mean/worst, ratio, closed-form, peak, params, devices, stages
    assert cols[7] == "2x" and cols[8] == "4" and cols[9] == "4"
    assert float(cols[5]) == pytest.approx(float(cols[2]))  # simulated bubble = README formula at P2P=0
    v = next(line for line in text.splitlines() if line.startswith("dualpipev ")).split()
    assert v[7] == "2x" and v[8] == "4" and v[9] == "8"
    code, text, _ = run(capsys, "simulate", "--ranks", "4", "--chunks", "8", "--best", "--memory", "4")
    assert code == 0
    best = text.strip().splitlines()[-1]
    assert best.startswith("best within 4 activations:")
    chosen = best.split(":")[1].split()[0]
    row = next(line for line in text.splitlines() if line.startswith(chosen + " *"))
    assert int(row.split()[7]) <= 4  # the "*" mark shifts the columns by one


def test_simulate_lists_invalid_schedules(capsys):
    code, text, _ = run(capsys, "simulate", "--ranks", "3", "--chunks", "6")
    assert code == 0
    tail = text.split("not valid at this size:")[1]
    assert "dualpipe:" in tail and "even" in tail


@pytest.mark.parametrize("argv,needle", [
    (["schedule", "nope", "--ranks", "4", "--chunks", "8", "--out", "x.svg"], "nope"),
    (["schedule", "dualpipe", "--ranks", "3", "--chunks", "8", "--out", "x.svg"], "even"),
    (["schedule", "dualpipe", "--ranks", "4", "--chunks", "8", "--out", "x.txt"], "ending in one of"),
    (["schedule", "dualpipe", "--ranks", "0", "--chunks", "8", "--out", "x.svg"], "positive integer"),
    (["simulate", "--ranks", "4", "--chunks", "8", "--costs", "1,2,1"], "five comma-separated"),
    (["simulate", "--ranks", "4", "--chunks", "8", "--costs", "1,2,a,3,0"], "five comma-separated"),
    (["simulate", "--ranks", "4", "--chunks", "8", "--costs", "1,1,2,3,0"], "cannot exceed"),
    (["simulate", "--ranks", "4", "--chunks", "8", "--costs", "1,2,1,-3,0"], "non-negative"),
    (["simulate", "--ranks", "4", "--chunks", "8", "--best", "--memory", "1"], "no schedule fits"),
    (["simulate", "--ranks", "4", "--chunks", "8", "--memory", "3"], "add --best"),
    (["trace", "/nonexistent/rank0.json", "--chrome", "x.json"], "cannot read trace file"),
    (["trace", "a.json"], "nothing to do"),
    (["schedule", "dualpipe", "--ranks", "4", "--chunks", "8", "--out", "missing/x.svg"], "does not exist"),
    (["trace", "a.json", "--svg", "missing/x.svg"], "does not exist"),
    (["frobnicate"], "invalid choice"),
])
def test_errors_are_one_line(tmp_path, capsys, argv, needle):
    os.chdir(tmp_path)
    try:
        code = main(argv)
    except SystemExit as e:  # argparse usage errors
        code = e.code
    out, err = capsys.readouterr()
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dualpipe-ext") and needle in lines[0], err
    assert not (tmp_path / "x.svg").exists() and not (tmp_path / "missing").exists()


def test_trace_merges_and_predicts(tmp_path, capsys):
    paths = write_records(str(tmp_path), "dualpipe", 4, 8)
    chrome, svg = tmp_path / "t.json", tmp_path / "t.svg"
    code, text, err = run(capsys, "trace", *paths, "--chrome", str(chrome), "--svg", str(svg), "--predict")
    assert code == 0, err
    events = json.loads(chrome.read_text())["traceEvents"]
    from dualpipe_ext.schedules import trace

    n = sum(len(row) for row in trace("dualpipe", 4, 8))
    assert sum(1 for e in events if e["ph"] == "X" and e["cat"] == "compute") == n
    assert ET.parse(svg).getroot().tag.endswith("svg")
    assert "measured step time" in text and "relative error" in text
    assert "simulator (as the gloo runtime runs)" in text and "simulator (rendezvous)" in text
    assert "P2P=" in text and "overhead=" in text and "step edges" in text
    # a garbled record file: one line, no traceback
    (tmp_path / "bad.json").write_text("[1, 2")
    code, _, err = run(capsys, "trace", str(tmp_path / "bad.json"), "--chrome", str(chrome))
    assert code == 2 and "is not JSON" in err and len(err.strip().splitlines()) == 1


def test_runs_as_module_without_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    ok = subprocess.run([sys.executable, "-m", "dualpipe_ext.cli", "simulate", "--ranks", "2", "--chunks", "4"],
                        capture_output=True, text=True, timeout=60, env=env)
    assert ok.returncode == 0 and "dualpipev" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "dualpipe_ext.cli", "schedule", "dualpipe", "--ranks", "4",
                          "--chunks", "1", "--out", str(tmp_path / "x.svg")],
                         capture_output=True, text=True, timeout=60, env=env)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
