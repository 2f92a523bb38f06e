"""The runtime replay behind `trace --predict`: agrees with the simulator where their models meet,
shares cores as processor sharing, and reads its costs off the records."""
from __future__ import annotations

import pytest

from dualpipe_ext.schedules import Costs, get_plan, simulate
from dualpipe_ext.viz.predict import _producers, predict_shared, replay
from dualpipe_ext.viz.records import load_record, merge_step
from viz_helpers import sequential_timeline, write_records


def _run(name, ranks, chunks):
    from dualpipe_ext.viz.records import RunStep

    tl = sequential_timeline(name, ranks, chunks)
    return RunStep(schedule=name, ranks=ranks, chunks=chunks, step=0,
                   compute=tuple(tuple((t, int(s), int(e)) for t, s, e in row) for row in tl),
                   other=tuple(() for _ in tl), bounds=tuple((0, 1) for _ in tl))


@pytest.mark.parametrize("name,ranks,chunks", [("dualpipe", 4, 8), ("dualpipev", 4, 8), ("1f1b", 4, 8),
                                               ("zb1p", 4, 8), ("dualpipe", 8, 20)])
def test_replay_matches_simulator_without_transfer_time(name, ranks, chunks):
    plan = get_plan(name, ranks, chunks)
    run = _run(name, ranks, chunks)
    tokens = [[t for t, _, _ in row] for row in run.compute]
    for c in (Costs(F=1, B=2, W=1, FB=3, P2P=0), Costs(F=1.5, B=2.5, W=0.5, FB=3.5, P2P=0)):
        work = {"F": c.F, "B": c.B, "Bz": c.B - c.W, "W": c.W, "FB": c.FB}
        assert replay(tokens, _producers(plan, run), work, 0.0, 0.0, None) == pytest.approx(
            simulate(plan, costs=c).makespan)


def test_replay_shares_cores_and_waits_for_inputs():
    work = {"F": 1.0, "B": 2.0, "Bz": 2.0, "W": 1.0, "FB": 3.0}
    free = [[[]], [[]], [[]], [[]]]
    tokens = [["F0.0"]] * 4
    assert replay(tokens, free, work, 0.0, 0.0, None) == pytest.approx(1.0)
    assert replay(tokens, free, work, 0.0, 0.0, 2) == pytest.approx(2.0)
    assert replay(tokens, free, work, 0.0, 0.0, 1) == pytest.approx(4.0)
    # Rank 1's action needs rank 0's output: one after the other, plus the transfer delay,
    # whatever the cores; a rank waiting for input leaves its core to the others.
    chain = [[[]], [[(0, 0)]]]
    assert replay([["F0.0"], ["F0.0"]], chain, work, 0.0, 0.5, 1) == pytest.approx(2.5)
    # Overhead is spent between a rank's actions, not before its first.
    assert replay([["F0.0", "B0.0"]], [[[], []]], work, 0.25, 0.0, None) == pytest.approx(3.25)
    with pytest.raises(ValueError, match="stuck"):
        replay([["F0.0"], ["F0.0"]], [[[(1, 0)]], [[(0, 0)]]], work, 0.0, 0.0, None)


def test_predict_shared_reads_costs_from_records(tmp_path):
    paths = write_records(str(tmp_path), "dualpipe", 4, 8)
    records = [load_record(p) for p in paths]
    runs = [merge_step(records, step=1)]
    alone = predict_shared(runs)
    # Durations come straight from the records (1, 2, 1, 3 ms), every rank in its own core.
    assert alone.work["F"] == pytest.approx(1e6, rel=1e-6)
    assert alone.work["FB"] == pytest.approx(3e6, rel=1e-6)
    assert alone.cores is None and alone.predicted_ns > 0
    # On one core for four ranks, an action that ran while others ran cost less core-time
    # than its wall time, never more.
    one = predict_shared(runs, cores=1)
    assert 0 < one.work["F"] < alone.work["F"]
    with pytest.raises(ValueError, match="cores"):
        predict_shared(runs, cores=0)
