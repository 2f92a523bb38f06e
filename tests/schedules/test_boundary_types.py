"""Results of more than two values cross the C++/Python boundary as named types, read by field."""
import pytest

from dualpipe_ext import _C
from dualpipe_ext.schedules import PlanError, TimedAction, get_plan, simulate, validate


def _plan_with_w_first():
    plan = get_plan("zb1p", 2, 4)
    rows = [list(r) for r in plan.actions]
    rows[0].insert(0, _C.Action.parse("W"))
    bad = _C.Plan()
    for name in ("schedule", "ranks", "chunks", "num_modules", "mbs_per_module"):
        setattr(bad, name, getattr(plan, name))
    bad.stages = plan.stages
    bad.actions = rows
    return bad


def test_check_plan_returns_a_plan_issue():
    assert _C.check_plan(get_plan("1f1b", 2, 4)) is None
    issue = _C.check_plan(_plan_with_w_first())
    assert isinstance(issue, _C.PlanIssue)
    assert (issue.rule, issue.rank, issue.step, issue.token) == ("weight FIFO", 0, 0, "W")
    assert "no backward input" in issue.message
    with pytest.raises(AttributeError):
        issue.rule = "other"  # read-only
    with pytest.raises(PlanError) as e:
        validate(_plan_with_w_first())
    assert (e.value.rule, e.value.rank, e.value.step, e.value.token) == ("weight FIFO", 0, 0, "W")
    assert str(e.value) == issue.message


def test_simulation_timelines_are_timed_actions():
    plan = get_plan("dualpipe", 4, 8)
    core = _C.simulate(plan, _C.Costs())
    sim = simulate(plan)
    for r in range(plan.ranks):
        actions = plan.actions[r]
        assert len(core.timeline[r]) == len(sim.timeline[r]) > 0
        for c, t in zip(core.timeline[r], sim.timeline[r]):
            assert isinstance(c, _C.TimedAction) and isinstance(t, TimedAction)
            assert actions[c.step].is_compute
            assert t.token == str(actions[c.step])
            assert (t.start, t.end) == (c.start, c.end) and t.end > t.start
            token, start, end = t  # still a (token, start, end) triple
            assert (token, start, end) == (t.token, t.start, t.end)
    assert max(t.end for row in sim.timeline for t in row) == sim.makespan
