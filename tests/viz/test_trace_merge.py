"""Merging per-rank run records and exporting them as a Chrome trace."""
from __future__ import annotations

import json

import pytest

from dualpipe_ext.schedules import trace
from dualpipe_ext.viz.chrome import to_chrome_trace, write_chrome_trace
from dualpipe_ext.viz.records import load_record, merge_step
from timeline_helpers import write_records


def test_merge_and_chrome_trace(tmp_path):
    paths = write_records(str(tmp_path), "dualpipe", 4, 8)
    run = merge_step([load_record(p) for p in reversed(paths)])
    assert (run.schedule, run.ranks, run.chunks, run.step) == ("dualpipe", 4, 8, 1)
    assert [[t for t, _, _ in row] for row in run.compute] == trace("dualpipe", 4, 8)
    assert min(s for s, _ in run.bounds) == 0
    out = tmp_path / "trace.json"
    write_chrome_trace(run, str(out))
    data = json.loads(out.read_text())
    events = data["traceEvents"]
    complete = [e for e in events if e["ph"] == "X"]
    assert all(isinstance(e["ts"], (int, float)) and e["dur"] >= 0 for e in complete)
    assert {e["pid"] for e in events} == {0, 1, 2, 3}
    names = {e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert names == {"rank 0", "rank 1", "rank 2", "rank 3"}
    for r in range(4):
        mine = sorted((e for e in complete if e["pid"] == r and e["cat"] == "compute"), key=lambda e: e["ts"])
        assert [e["name"] for e in mine] == trace("dualpipe", 4, 8)[r]
        for a, b in zip(mine, mine[1:]):
            assert a["ts"] + a["dur"] <= b["ts"] + 1e-6
    assert any(e["cat"] == "comm" and e["name"] == "wait" for e in complete)
    # the first step is just as reachable, and lines up at 0 too
    first = merge_step([load_record(p) for p in paths], step=0)
    assert first.step == 0 and first.step_time_ns == run.step_time_ns
    assert to_chrome_trace(first)["otherData"]["step"] == 0


def _edit(path, **changes):
    with open(path) as f:
        rec = json.load(f)
    rec.update(changes)
    with open(path, "w") as f:
        json.dump(rec, f)


def test_bad_records(tmp_path):
    paths = write_records(str(tmp_path), "dualpipev", 2, 4)
    with pytest.raises(ValueError, match="cannot read trace file"):
        load_record(str(tmp_path / "missing.json"))
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not JSON"):
        load_record(str(tmp_path / "junk.json"))
    (tmp_path / "other.json").write_text('{"traceEvents": []}')
    with pytest.raises(ValueError, match="not a dualpipe_ext timeline record"):
        load_record(str(tmp_path / "other.json"))
    recs = [load_record(p) for p in paths]
    with pytest.raises(ValueError, match="two trace files for pipeline rank 0"):
        merge_step([recs[0], recs[0]])
    with pytest.raises(ValueError, match="one trace file for each of the 2 ranks"):
        merge_step([recs[1]])
    with pytest.raises(ValueError, match="out of range"):
        merge_step(recs, step=5)
    _edit(paths[1], chunks=6)
    with pytest.raises(ValueError, match="different plans"):
        merge_step([load_record(p) for p in paths])
    _edit(paths[1], events=[{"name": "F0.0"}])
    with pytest.raises(ValueError, match="lacks one of"):
        load_record(paths[1])


def test_clock_offset_moves_a_rank(tmp_path):
    paths = write_records(str(tmp_path), "1f1b", 2, 4)
    base = merge_step([load_record(p) for p in paths])
    _edit(paths[1], clock_offset_ns=1_000_000_000)
    moved = merge_step([load_record(p) for p in paths])
    assert moved.compute[1][0][1] - moved.compute[0][0][1] == base.compute[1][0][1] - base.compute[0][0][1] + 1_000_000_000
