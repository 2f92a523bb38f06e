"""Records of a real DualPipe run (4 gloo processes on 127.0.0.1) merge, export, draw and predict."""
from __future__ import annotations

import pytest
import json
import os
import subprocess
import sys

from dualpipe_ext.schedules import trace
from dualpipe_ext.viz import layout
from dualpipe_ext.viz.chrome import to_chrome_trace
from dualpipe_ext.schedules.predict import predict
from dualpipe_ext.viz.records import load_record, merge_step

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.slow
def test_recorded_dualpipe_run(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(HERE)))
    proc = subprocess.run([sys.executable, os.path.join(HERE, "record_run.py"), str(tmp_path), "--ranks", "4",
                           "--chunks", "8", "--hidden", "32", "--batch", "32", "--steps", "2"],
                          capture_output=True, text=True, timeout=150, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [load_record(str(tmp_path / f"rank{r}.json")) for r in range(4)]
    run = merge_step(records)
    expected = trace("dualpipe", 4, 8)
    assert [[t for t, _, _ in row] for row in run.compute] == expected
    for row, (s, e) in zip(run.compute, run.bounds):
        assert all(s <= a <= b <= e for _, a, b in row)
    chrome = json.loads(json.dumps(to_chrome_trace(run)))
    assert sum(1 for ev in chrome["traceEvents"] if ev.get("cat") == "compute") == sum(map(len, expected))
    d = layout([[(t, s / 1e6, e / 1e6) for t, s, e in row] for row in run.compute], schedule="dualpipe",
               time_unit="ms")
    assert [[b.token for b in row] for row in d.rows] == expected
    assert d.colours_used() == d.legend_colours()
    p = predict([merge_step(records, step=1)])
    assert p.measured_ns > 0 and p.predicted_ns > 0 and set(p.costs) == {"F", "B", "W", "FB", "P2P", "overhead"}
    assert all(p.costs[k] > 0 for k in ("F", "FB")) and p.costs["P2P"] >= 0 and p.costs["overhead"] >= 0
    assert p.rendezvous_ns >= p.predicted_ns - 1e-3 and len(p.start_ns) == len(p.tail_ns) == 4
