"""The validator against an independent reading of its rules (plan_oracle), on random plans and on
generated plans with one action moved, dropped or duplicated: every unsound plan is rejected with
the first offending action named, every generated plan passes, and the executor compiles exactly
the plans the validator accepts."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dualpipe_ext import _C
from dualpipe_ext.runtime.compiled import CompiledPlan
from dualpipe_ext.schedules import PlanError, schedule_names, validate

from plan_oracle import first_issue

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _plan_or_none(name: str, ranks: int, chunks: int):
    try:
        return _C.make_plan(name, ranks, chunks)
    except ValueError:
        return None


@st.composite
def generated(draw, max_ranks: int = 6, max_chunks: int = 16):
    """A plan from a generator (any registered schedule at a size it accepts)."""
    name = draw(st.sampled_from(schedule_names()))
    ranks = draw(st.integers(1, max_ranks))
    step = 2 if name == "dualpipe" else 1
    chunks = draw(st.integers(1, max_chunks // step)) * step
    plan = _plan_or_none(name, ranks, chunks)
    if plan is None:  # e.g. DualPipe on an odd number of ranks: try its own sizes
        ranks = 2 * max(1, ranks // 2)
        plan = _plan_or_none(name, ranks, max(chunks, 2 * ranks))
    if plan is None:
        plan = _C.make_plan("1f1b", ranks, chunks)
    if draw(st.booleans()):
        plan = plan.forward_only()
    return plan


def _with_rows(plan, rows):
    out = _C.make_plan(plan.schedule, plan.ranks, plan.chunks) if plan.schedule else plan
    if plan.num_modules != out.num_modules or plan.mbs_per_module != out.mbs_per_module:
        out = plan
    out.actions = [[_C.Action.parse(t) for t in row] for row in rows]
    return out


@st.composite
def mutated(draw):
    """A generated plan with one action moved, dropped or duplicated (unsound or, by chance, still sound)."""
    plan = draw(generated())
    rows = [[str(a) for a in row] for row in plan.actions]
    r = draw(st.integers(0, len(rows) - 1))
    if not rows[r]:
        return plan, "none"
    i = draw(st.integers(0, len(rows[r]) - 1))
    how = draw(st.sampled_from(["move", "move near", "drop", "duplicate"]))
    token = rows[r][i]
    if how != "duplicate":
        del rows[r][i]
    if how == "move near":  # a few steps away: across a wait, past its consumer or its partner's batch
        j = min(max(0, i + draw(st.integers(-4, 4))), len(rows[r]))
        rows[r].insert(j, token)
    elif how != "drop":
        rows[r].insert(draw(st.integers(0, len(rows[r]))), token)
    return _with_rows(plan, rows), f"{how} {token} (rank {r}, step {i})"


@st.composite
def random_plans(draw):
    """The stage table of a generated plan with random actions: mostly unsound in every way there is."""
    plan = draw(generated(max_ranks=4, max_chunks=6))
    R, M, N = plan.ranks, plan.num_modules, plan.mbs_per_module

    def index(n: int):  # in [0, n), and now and then n (out of range)
        return st.integers(0, 24 * n).map(lambda x: min(x // 24, n))
    m, c, p = index(M), index(N), index(R)
    mc = st.tuples(m, c).map(lambda t: f"{t[0]}.{t[1]}")
    token = st.one_of(
        mc.map(lambda x: "F" + x), mc.map(lambda x: "B" + x), mc.map(lambda x: f"B{x}z"), st.just("W"),
        st.tuples(mc, mc).map(lambda t: f"F{t[0]}+B{t[1]}"), st.just("wait"), st.just("wait"),
        st.tuples(st.sampled_from(["recvF", "recvB"]), mc, p).map(lambda t: f"{t[0]}{t[1]}<{t[2]}"),
        st.tuples(st.sampled_from(["sendF", "sendB"]), mc, p).map(lambda t: f"{t[0]}{t[1]}>{t[2]}"),
    )
    rows = [draw(st.lists(token, max_size=12)) for _ in range(R)]
    return _with_rows(plan, rows)


def _verdict(plan):
    try:
        validate(plan)
    except PlanError as e:
        return e
    return None


def _check_agreement(plan, what: str = "") -> None:
    want = first_issue(plan)
    got = _verdict(plan)
    if want is None:
        assert got is None, f"{what}: the validator rejects a plan the rules accept:\n{got}"
        return
    assert got is not None, f"{what}: the validator accepts a plan that breaks {want}"
    assert (got.rule, got.rank, got.step) == want, f"{what}: validator {(got.rule, got.rank, got.step)}, " \
                                                   f"rules {want}:\n{got}"
    if got.rank >= 0:  # the offending action is named, and is the one in the plan
        assert got.token == str(plan.actions[got.rank][got.step])
        assert f"first offending action: rank {got.rank}, step {got.step}: {got.token}" in str(got)


@pytest.mark.slow
@SETTINGS
@given(generated(max_ranks=24, max_chunks=64))
def test_no_generated_plan_is_rejected(plan):
    assert first_issue(plan) is None
    validate(plan)


@SETTINGS
@given(mutated())
def test_one_action_moved_dropped_or_duplicated(case):
    plan, what = case
    _check_agreement(plan, what)


@pytest.mark.slow
@SETTINGS
@given(random_plans())
def test_random_plans(plan):
    _check_agreement(plan)


@SETTINGS
@given(st.one_of(mutated().map(lambda c: c[0]), random_plans()))
def test_the_executor_compiles_exactly_the_plans_the_validator_accepts(plan):
    rejected = _verdict(plan)
    ranks = list(range(plan.ranks))
    if rejected is None:
        CompiledPlan(plan, 0, ranks, ranks)
        return
    with pytest.raises(PlanError) as info:
        CompiledPlan(plan, 0, ranks, ranks)
    assert str(info.value) == str(rejected)


def _edited(name, ranks, chunks, rank, tokens):
    plan = _C.make_plan(name, ranks, chunks)
    rows = [[str(a) for a in row] for row in plan.actions]
    rows[rank] = tokens.split() if isinstance(tokens, str) else tokens(rows[rank])
    return _with_rows(plan, rows)


def _deadlocked():
    plan = _C.make_plan("1f1b", 2, 1)
    rows = ["recvB0.0<1 wait F0.0 sendF0.0>1 wait B0.0".split(), "recvF0.0<0 wait F0.0 B0.0 sendB0.0>0 wait".split()]
    return _with_rows(plan, rows)


@pytest.mark.parametrize("rule,plan", [
    ("deadlock", _deadlocked()),
    ("peer", _edited("1f1b", 3, 3, 0, lambda row: row[:1] + ["sendF0.0>2"] + row[2:])),
    ("forward only", _with_rows(_C.make_plan("1f1b", 2, 2).forward_only(),
                                [["F0.0", "sendF0.0>1", "wait", "F0.1", "sendF0.1>1", "wait", "recvB0.0<1", "wait"],
                                 ["recvF0.0<0", "wait", "F0.0", "recvF0.1<0", "wait", "F0.1"]])),
    ("unposted", _edited("1f1b", 2, 2, 1, lambda row: row[:-1])),
    ("structure", _edited("gpipe", 2, 2, 0, lambda row: row + ["F3.0"])),
])
def test_rules_the_random_plans_rarely_reach(rule, plan):
    assert first_issue(plan)[0] == rule
    _check_agreement(plan, rule)


def test_the_documented_example_names_its_cell():
    plan = _C.make_plan("1f1b", 4, 8)
    rows = [[str(a) for a in row] for row in plan.actions]
    rows[1].remove("recvF0.2<0")
    with pytest.raises(PlanError) as info:
        validate(_with_rows(plan, rows))
    e = info.value
    assert (e.rule, e.rank, e.step, e.token) == ("dependency", 1, 9, "F0.2")
    assert isinstance(e, ValueError)


def test_validate_wants_a_plan():
    with pytest.raises(TypeError, match="expects a dualpipe_ext.schedules.Plan, got list"):
        validate([["F0.0"]])
