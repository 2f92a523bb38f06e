"""Simulator options: per-action overhead, communication as the gloo runtime runs it, step edges."""
import random

import pytest

from dualpipe_ext import _C
from dualpipe_ext.schedules import Costs, get_plan, simulate

SIZES = [("dualpipe", 4, 8), ("dualpipev", 4, 8), ("1f1b", 4, 8), ("zb1p", 4, 8), ("gpipe", 4, 8),
         ("dualpipe", 8, 20), ("dualpipev", 8, 16), ("1f1b", 6, 12), ("zb1p", 6, 12)]
BALANCED = [Costs(F=1, B=2, W=1, FB=3), Costs(F=1.5, B=2.5, W=0.5, FB=3.5)]


@pytest.mark.parametrize("name,ranks,chunks", SIZES)
def test_eager_comm_equals_rendezvous_without_transfer_time(name, ranks, chunks):
    # With P2P = 0 the two modes differ only where a rendezvous holds a sender at its wait
    # until the receiver posts. Under the costs the schedules are designed for, no sender is
    # held on the critical path: the same makespan and the same compute timeline.
    plan = get_plan(name, ranks, chunks)
    for c in BALANCED:
        rv, eager = simulate(plan, c), simulate(plan, c, eager_comm=True)
        assert eager.makespan == pytest.approx(rv.makespan)
        assert eager.timeline == rv.timeline


@pytest.mark.parametrize("name,ranks,chunks", SIZES)
def test_eager_comm_never_slower(name, ranks, chunks):
    # eager_comm drops constraints (a send never waits for its receive to be posted), so no
    # action starts later. Without transfer time or overhead, 1F1B and GPipe never hold a
    # sender whatever the costs, so they match exactly; with them, a late receiver does.
    plan = get_plan(name, ranks, chunks)
    rng = random.Random(f"{name}{ranks}{chunks}")
    faster = 0
    for i in range(30):
        f, b = rng.uniform(0.1, 4), rng.uniform(0.2, 8)
        p2p, overhead = (0, 0) if i < 20 else (rng.choice([0, 0.25, 1]), rng.choice([0, 0.1]))
        c = Costs(F=f, B=b, W=b * rng.random(), FB=(f + b) * rng.uniform(0.3, 1.2), P2P=p2p, overhead=overhead)
        rv, eager = simulate(plan, c), simulate(plan, c, eager_comm=True)
        for row_r, row_e in zip(rv.timeline, eager.timeline):
            assert all(se <= sr + 1e-9 for (_, sr, _), (_, se, _) in zip(row_r, row_e))
        assert eager.makespan <= rv.makespan + 1e-9
        faster += c.P2P == 0 and c.overhead == 0 and eager.makespan < rv.makespan - 1e-9
    if name in ("1f1b", "gpipe"):
        assert faster == 0
    if name in ("dualpipe", "dualpipev", "zb1p"):
        assert faster > 0  # the modes do differ on these, even without transfer time


def test_eager_receive_waits_for_sender_post_plus_p2p():
    # 1F1B on 2 ranks, F = 1: rank 1's first forward starts when rank 0's send is posted
    # (t = 1) plus P2P, in both modes (rank 1 posted its receive at 0).
    plan = get_plan("1f1b", 2, 2)
    for eager in (False, True):
        sim = simulate(plan, Costs(F=1, B=2, W=1, FB=3, P2P=0.5), eager_comm=eager)
        assert sim.timeline[1][0][1] == pytest.approx(1.5)


@pytest.mark.parametrize("eager", [False, True])
def test_overhead_adds_between_actions(eager):
    plan = get_plan("1f1b", 1, 4)  # one rank: no waits
    n = len(plan.trace()[0])
    base = simulate(plan, Costs(), eager_comm=eager).makespan
    sim = simulate(plan, Costs(overhead=0.25), eager_comm=eager)
    assert sim.makespan == pytest.approx(base + (n - 1) * 0.25)
    assert sim.timeline[0][0][1] == 0  # nothing before the first action
    assert sim.busy[0] == pytest.approx(base)  # bookkeeping is not compute


@pytest.mark.parametrize("name,ranks,chunks", SIZES[:5])
def test_overhead_keeps_actions_apart(name, ranks, chunks):
    plan = get_plan(name, ranks, chunks)
    for eager in (False, True):
        base = simulate(plan, Costs(P2P=0.2), eager_comm=eager)
        sim = simulate(plan, Costs(P2P=0.2, overhead=0.3), eager_comm=eager)
        for row in sim.timeline:
            assert all(s1 >= e0 + 0.3 - 1e-9 for (_, _, e0), (_, s1, _) in zip(row, row[1:]))
        assert base.makespan < sim.makespan <= base.makespan + 0.3 * max(map(len, plan.trace())) * ranks


@pytest.mark.parametrize("name,ranks,chunks", SIZES[:5])
def test_start_and_tail_edges(name, ranks, chunks):
    plan = get_plan(name, ranks, chunks)
    c = Costs(P2P=0.1, overhead=0.05)
    for eager in (False, True):
        base = simulate(plan, c, eager_comm=eager)
        # The same start on every rank shifts the whole step.
        shifted = simulate(plan, c, eager_comm=eager, start=[2.0] * ranks)
        assert shifted.makespan == pytest.approx(base.makespan + 2.0)
        # A rank starting late starts its first action no earlier, and nothing gets faster.
        late = simulate(plan, c, eager_comm=eager, start=[0.0] * (ranks - 1) + [3.0])
        assert late.timeline[-1][0][1] >= 3.0 and late.makespan >= base.makespan - 1e-9
        # A tail on one rank: makespan = max(the others' ends, that rank's end + tail).
        tail = [0.0] * ranks
        tail[1] = 7.0
        with_tail = simulate(plan, c, eager_comm=eager, tail=tail)
        assert with_tail.makespan == pytest.approx(max(base.makespan, base.timeline[1][-1][2] + 7.0))
        assert with_tail.bubble[1] == pytest.approx(with_tail.makespan - with_tail.busy[1])


def test_options_checked():
    plan = get_plan("1f1b", 2, 2)
    with pytest.raises(ValueError, match="overhead"):
        Costs(overhead=-1)
    with pytest.raises(ValueError, match="start needs one value per rank"):
        simulate(plan, start=[0.0])
    with pytest.raises(ValueError, match=r"tail\[1\] must be a finite non-negative"):
        simulate(plan, tail=[0.0, -1.0])
    with pytest.raises(ValueError, match="start"):
        simulate(plan, start=[0.0, float("nan")])
    with pytest.raises(TypeError):
        simulate(plan, Costs(), True)  # options are keyword-only
    # The C++ core checks the same on its own.
    with pytest.raises(ValueError, match="overhead must be a non-negative"):
        _C.Costs(overhead=-0.5)
    with pytest.raises(ValueError, match="tail needs one value per rank"):
        _C.simulate(plan, _C.Costs(), tail=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"start\[0\] must be a finite non-negative"):
        _C.simulate(plan, _C.Costs(), start=[-1.0, 0.0])
    with pytest.raises(TypeError):
        _C.simulate(plan, _C.Costs(), True)
    # Empty edges mean zeros.
    assert _C.simulate(plan, _C.Costs(), eager_comm=True, start=[], tail=[]).makespan == simulate(plan).makespan
