"""Simulator properties on every schedule: sound timelines, deterministic, and clear errors."""
import subprocess
import sys

import pytest
from hypothesis import given, settings, strategies as st

from dualpipe_ext.schedules import Costs, get_plan, schedule_names, simulate

NAMES = schedule_names()


def _plan(name, ranks, chunks):
    if name == "dualpipe":
        ranks += ranks % 2
        chunks = max(chunks + chunks % 2, 2 * ranks)
    if name == "dualpipev":
        chunks = max(chunks, 2 * ranks)
    return get_plan(name, ranks, chunks)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    name=st.sampled_from(NAMES),
    ranks=st.integers(2, 16),
    chunks=st.integers(1, 64),
    f=st.floats(0.1, 4),
    b=st.floats(0.2, 8),
    w_frac=st.floats(0, 1),
    fb_frac=st.floats(0.3, 1.2),
    p2p=st.sampled_from([0.0, 0.25, 1.0]),
)
def test_timeline_properties(name, ranks, chunks, f, b, w_frac, fb_frac, p2p):
    plan = _plan(name, ranks, chunks)
    costs = Costs(F=f, B=b, W=b * w_frac, FB=(f + b) * fb_frac, P2P=p2p)
    sim = simulate(plan, costs)
    assert len(sim.timeline) == plan.ranks
    for r, row in enumerate(sim.timeline):
        assert [tok for tok, _, _ in row] == plan.trace()[r]
        for (_, s0, e0), (_, s1, e1) in zip(row, row[1:]):
            assert s0 <= e0 <= s1 + 1e-9, (r, s0, e0, s1)
        assert sim.busy[r] == pytest.approx(sum(e - s for _, s, e in row))
        assert sim.makespan >= sim.busy[r] - 1e-9
        assert sim.bubble[r] == pytest.approx(sim.makespan - sim.busy[r])
        assert all(e <= sim.makespan + 1e-9 for _, _, e in row)
        assert sim.peak_activations[r] >= 1
    assert simulate(plan, costs) == sim  # deterministic


def test_costs_checked():
    with pytest.raises(ValueError, match="cannot exceed"):
        Costs(B=1, W=2)
    with pytest.raises(ValueError, match="non-negative"):
        Costs(F=-1)
    with pytest.raises(TypeError):
        simulate(get_plan("1f1b", 2, 2), costs=(1, 2, 1, 3, 0))


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["dualpipe", "--ranks", "3", "--chunks", "8"], "even number of ranks"),
        (["dualpipe", "--ranks", "4", "--chunks", "6"], "at least 8"),
        (["dualpipev", "--ranks", "4", "--chunks", "7"], "at least 8"),
        (["pipedream", "--ranks", "4", "--chunks", "8"], "expected one of dualpipe, dualpipev, 1f1b, zb1p, gpipe"),
        (["dualpipe", "--ranks", "4", "--chunks", "x"], "invalid int value"),
        (["dualpipe", "--ranks", "4"], "required: --chunks"),
    ],
)
def test_cli_bad_requests(args, fragment):
    proc = subprocess.run([sys.executable, "-m", "dualpipe_ext.schedules", *args, "--json"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], proc.stderr
