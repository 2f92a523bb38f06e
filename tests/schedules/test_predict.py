"""`trace --predict`: costs and step edges read off the records, fed to the C++ simulator
(communication as the gloo runtime runs it, and rendezvous)."""
from __future__ import annotations

import pytest

from dualpipe_ext.schedules import Costs, get_plan, simulate
from dualpipe_ext.schedules.predict import estimate_costs, format_prediction, predict, step_edges
from dualpipe_ext.viz.records import RunStep, load_record, merge_step
from timeline_helpers import write_records


def _runs(tmp_path, name="dualpipe", ranks=4, chunks=8):
    records = [load_record(p) for p in write_records(str(tmp_path), name, ranks, chunks)]
    return [merge_step(records, step=1)], get_plan(name, ranks, chunks)


def test_costs_and_edges_read_from_records(tmp_path):
    runs, plan = _runs(tmp_path)
    c = estimate_costs(runs, plan)
    # The records hold F = 1, B = 2, W = 1, F&B = 3 ms, 0.1 ms between a rank's actions.
    assert c["F"] == pytest.approx(1e6, rel=1e-6) and c["FB"] == pytest.approx(3e6, rel=1e-6)
    assert c["W"] == pytest.approx(1e6, rel=1e-6)
    assert set(c) == {"F", "B", "W", "FB", "P2P", "overhead"}
    assert c["overhead"] == pytest.approx(0.1e6, rel=1e-3) and c["P2P"] >= 0
    edges = step_edges(runs, plan)
    start, tail, setup = edges
    assert (edges.start, edges.tail, edges.setup) == (start, tail, setup)
    run = runs[0]
    assert len(start) == len(tail) == 4 and setup >= 0
    for r, row in enumerate(run.compute):
        assert start[r] == pytest.approx(run.bounds[r][0] + setup)
        assert tail[r] == pytest.approx(run.bounds[r][1] - row[-1].end)


def test_predict_is_the_simulator_with_those_inputs(tmp_path):
    runs, plan = _runs(tmp_path)
    p = predict(runs)
    start, tail, _ = step_edges(runs, plan)
    c = Costs(**estimate_costs(runs, plan))
    assert p.predicted_ns == pytest.approx(simulate(plan, c, eager_comm=True, start=start, tail=tail).makespan)
    assert p.rendezvous_ns == pytest.approx(simulate(plan, c, start=start, tail=tail).makespan)
    assert p.rendezvous_ns >= p.predicted_ns - 1e-6  # eager communication drops constraints only
    assert p.relative_error == pytest.approx((p.predicted_ns - p.measured_ns) / p.measured_ns)
    text = format_prediction(p)
    assert "simulator (as the gloo runtime runs)" in text and "simulator (rendezvous)" in text


@pytest.mark.parametrize("name,ranks,chunks", [("1f1b", 4, 8), ("dualpipe", 4, 8), ("dualpipev", 4, 8)])
def test_predict_on_a_step_that_runs_as_modelled(name, ranks, chunks):
    # A step built by the simulator itself (as the runtime runs, with overhead, transfer time and
    # edges), read back. Durations come back exactly; an idle consumer's measured delay holds the
    # transfer and the bookkeeping before its action, and the estimate takes the bookkeeping off,
    # so transfer time, overhead and the predicted step come back close to the truth.
    plan = get_plan(name, ranks, chunks)
    ns = 1e6
    truth = Costs(F=1 * ns, B=2 * ns, W=1 * ns, FB=3 * ns, P2P=0.5 * ns, overhead=0.2 * ns)
    start, tail = [0.0] + [0.3 * ns] * (ranks - 1), [0.4 * ns] * ranks
    sim = simulate(plan, truth, eager_comm=True, start=start, tail=tail)
    # Overhead precedes each action but the first; the recorded action is the compute alone.
    compute = tuple(tuple((tok, int(s), int(e)) for tok, s, e in row) for row in sim.timeline)
    bounds = tuple((0, int(row[-1][2] + 0.4 * ns)) for row in sim.timeline)
    run = RunStep(schedule=name, ranks=ranks, chunks=chunks, step=0, compute=compute,
                  other=tuple(() for _ in compute), bounds=bounds)
    p = predict([run])
    assert p.costs["F"] == pytest.approx(truth.F, rel=1e-6)
    assert p.costs["FB"] == pytest.approx(truth.FB, rel=1e-6)
    assert p.costs["P2P"] == pytest.approx(truth.P2P, rel=0.1)
    assert p.costs["overhead"] == pytest.approx(truth.overhead, rel=0.25)
    assert p.measured_ns == pytest.approx(sim.makespan, rel=1e-6)
    assert p.predicted_ns == pytest.approx(p.measured_ns, rel=0.03)


def test_predict_needs_a_step():
    with pytest.raises(ValueError, match="at least one"):
        predict([])
