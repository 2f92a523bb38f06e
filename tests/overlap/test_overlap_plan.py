"""The component plan from the C++ core: dependencies, pairing, the in-flight bound, the cost
model, DeepSeek's published order, and the checker catching faults."""
import itertools

import pytest

from dualpipe_ext import _C
from dualpipe_ext.overlap import ComponentCosts
from dualpipe_ext.overlap.plan import (component_plan, deepseek_plan, exposed_comm, format_plan, pair_runs,
                                       sequential_plan, validate_plan)

F, B, W = _C.Pass.FORWARD, _C.Pass.BACKWARD_INPUT, _C.Pass.WEIGHT
COMPUTE, ISSUE, WAIT = _C.StepKind.COMPUTE, _C.StepKind.ISSUE, _C.StepKind.WAIT
A, M, D, K, S = _C.Component.ATTN, _C.Component.MLP, _C.Component.DISPATCH, _C.Component.COMBINE, _C.Component.SHARED
R = _C.RunSpec


def _pos(steps):
    return {(s.kind, s.component, s.pass_, s.run, s.layer): i for i, s in enumerate(steps)}


def _unpaired(steps):
    """Exchanges with no computation of another run between their issue and wait."""
    return [str(s) for s in steps if s.kind == ISSUE and all(steps[u].run == s.run for u in s.under)]


@pytest.mark.parametrize("num_layers", range(1, 9))
def test_dependencies_hold(num_layers):
    steps = component_plan(num_layers)
    assert validate_plan(steps, num_layers, 2) == []
    assert len(steps) == 14 * num_layers  # 6 computations, 4 issues, 4 waits per layer
    pos = _pos(steps)
    for l in range(num_layers):
        # forward chain of layer l, checked here independently of the C++ checker
        chain = [(COMPUTE, A, F), (ISSUE, D, F), (WAIT, D, F), (COMPUTE, M, F), (ISSUE, K, F), (WAIT, K, F)]
        idx = [pos[(k, c, p, 0, l)] for k, c, p in chain]
        assert idx == sorted(idx)
        bchain = [(ISSUE, K, B), (WAIT, K, B), (COMPUTE, M, B), (ISSUE, D, B), (WAIT, D, B), (COMPUTE, A, B),
                  (COMPUTE, A, W)]
        idx = [pos[(k, c, p, 1, l)] for k, c, p in bchain]
        assert idx == sorted(idx)
        assert pos[(COMPUTE, M, B, 1, l)] < pos[(COMPUTE, M, W, 1, l)]
        if l:
            assert pos[(WAIT, K, F, 0, l - 1)] < pos[(COMPUTE, A, F, 0, l)]
            assert pos[(COMPUTE, A, B, 1, l)] < pos[(ISSUE, K, B, 1, l - 1)]


@pytest.mark.parametrize("num_layers", range(1, 9))
def test_each_comm_runs_under_the_other_micro_batch(num_layers):
    steps = component_plan(num_layers)
    issues = [(i, s) for i, s in enumerate(steps) if s.kind == ISSUE]
    assert len(issues) == 4 * num_layers
    pos = _pos(steps)
    for i, s in issues:
        wait = pos[(WAIT, s.component, s.pass_, s.run, s.layer)]
        assert s.under and all(i < u < wait and steps[u].kind == COMPUTE for u in s.under)
    assert _unpaired(steps) == []


def test_deepseek_order_per_layer():
    steps = deepseek_plan(2)
    assert validate_plan(steps, 2) == []
    text = format_plan(steps).splitlines()
    # one pair iteration: forward layer 1, backward layer 0 (brief: DeepSeek's per-layer order)
    order = [t for t in text[13:27] if not t.startswith("wait")]
    assert [t.split(" under")[0] for t in order] == [
        "issue combine.B0", "attn.F1", "issue dispatch.F1", "mlp.B0", "issue dispatch.B0", "mlp.W0", "mlp.F1",
        "issue combine.F1", "attn.B0", "attn.W0"]
    assert text[-1] == "wait combine.F1"


@pytest.mark.parametrize("num_layers", [1, 2, 4, 8])
def test_plan_hides_at_least_as_much_as_deepseeks_order(num_layers):
    runs = pair_runs(num_layers)
    for comm in (0.25, 0.5, 1.0, 1.5, 2.0, 3.0):
        costs = ComponentCosts(comm=comm)
        ours = exposed_comm(component_plan(runs, costs), runs, costs)
        theirs = exposed_comm(deepseek_plan(num_layers), runs, costs)
        assert ours <= theirs + 1e-9, (comm, ours, theirs)
        if comm <= 1.0:
            assert ours == 0.0  # every exchange hidden when it takes no longer than one component
    # run after run, each exchange waited at once: all of them exposed
    costs = ComponentCosts(comm=1.0)
    assert exposed_comm(sequential_plan(runs), runs, costs) == pytest.approx(4 * num_layers)


@pytest.mark.parametrize("runs", [
    [R(False, 3), R(False, 3)],  # two-batch overlap of a forward chunk
    [R(True, 3), R(True, 3)],  # and of a backward chunk
    [R(False, 2, True, False, True), R(True, 2, False, True, True)],  # embedding, head, shared experts
    [R(False, 3, False, True, True), R(True, 2, True, False, True)],  # layer counts that differ
    [R(False, 2), R(True, 2), R(True, 2)],  # a backward chunk that ran forward in halves
])
@pytest.mark.parametrize("max_in_flight", [1, 2, 3])
def test_every_kind_of_run_is_planned_soundly(runs, max_in_flight):
    steps = component_plan(runs, max_in_flight=max_in_flight)
    assert validate_plan(steps, runs, max_in_flight) == []
    open_per_shape, worst = [0, 0], 0
    for s in steps:  # the in-flight bound, counted here
        shape = 0 if (s.component == D) == (s.pass_ == F) else 1
        if s.kind == ISSUE:
            open_per_shape[shape] += 1
            worst = max(worst, open_per_shape[shape])
        elif s.kind == WAIT:
            open_per_shape[shape] -= 1
    assert worst <= max_in_flight
    costs = ComponentCosts()
    total = sum(1 for s in steps if s.kind == ISSUE) * costs.comm
    assert exposed_comm(steps, runs, costs) <= 0.15 * total + 1e-9 if max_in_flight >= 2 else True
    assert validate_plan(sequential_plan(runs), runs, 1) == []


def test_two_batch_plans_overlap_the_halves():
    for runs in ([R(False, 4), R(False, 4)], [R(True, 4), R(True, 4)]):
        steps = component_plan(runs)
        unpaired = _unpaired(steps)
        assert len(unpaired) <= 2, unpaired  # only where one half has nothing left to compute
        costs = ComponentCosts()
        assert exposed_comm(steps, runs, costs) < exposed_comm(sequential_plan(runs), runs, costs)


def test_checker_catches_faults():
    steps = component_plan(3)
    # a wait moved before its issue
    i = next(i for i, s in enumerate(steps) if str(s) == "issue dispatch.F1")
    j = next(j for j, s in enumerate(steps) if str(s) == "wait dispatch.F1")
    bad = list(steps)
    bad.insert(i, bad.pop(j))
    assert str(bad[i]) == "wait dispatch.F1"
    assert any("depends on" in e for e in validate_plan(bad, 3))
    # a step dropped
    assert any("missing 'mlp.W2'" == e for e in validate_plan([s for s in steps if str(s) != "mlp.W2"], 3))
    # a computation moved before what it consumes
    k = next(k for k, s in enumerate(steps) if str(s) == "mlp.B2")
    bad = list(steps)
    bad.insert(0, bad.pop(k))
    assert any("mlp.B2" in e and "depends on" in e for e in validate_plan(bad, 3))
    # a partner outside the exchange's flight
    s = steps[0]
    bad = [_C.OverlapStep(s.kind, s.component, s.pass_, s.layer, [len(steps) - 1], s.run)] + list(steps[1:])
    assert any("partner" in e for e in validate_plan(bad, 3))
    # duplicates, layers and runs out of range
    assert any("twice" in e for e in validate_plan(list(steps) + [steps[1]], 3))
    assert validate_plan(steps, 2)
    assert any("no such component" in e for e in validate_plan(steps, [R(False, 3)]))
    # the in-flight bound
    issues = [s for s in steps if s.kind == ISSUE]
    burst = issues + [s for s in steps if s.kind != ISSUE]
    assert any("in flight" in e for e in validate_plan(burst, 3, 2))


def test_bad_runs():
    with pytest.raises(ValueError, match="num_layers"):
        component_plan(0)
    with pytest.raises(ValueError, match="num_layers"):
        _C.overlap_plan([R(False, -1)])
    with pytest.raises(ValueError, match="at least one run"):
        _C.overlap_plan([])
    with pytest.raises(ValueError, match="ComponentCosts.comm"):
        ComponentCosts(comm=float("inf"))


def test_plans_are_the_same_on_every_call():
    # every rank of an expert group must issue the same exchanges in the same order
    from dualpipe_ext.overlap import plan

    for runs in ([R(False, 3), R(True, 3)], [R(True, 2), R(True, 2)]):
        a = [str(s) for s in component_plan(runs)]
        plan._plan.cache_clear()
        plan._robust_plan.cache_clear()
        assert [str(s) for s in component_plan(runs)] == a
    assert len({tuple(str(s) for s in component_plan(n)) for n in itertools.repeat(4, 3)}) == 1


@pytest.mark.parametrize("runs", [
    pair_runs(2), pair_runs(4),
    [R(False, 3, True, False, True), R(True, 3, False, True, True)],
    [R(True, 3), R(True, 3)],
    [R(False, 2), R(False, 2), R(True, 2), R(True, 2)],
])
def test_plan_is_never_worse_than_the_cores_and_hides_longer_exchanges(runs):
    """The plan kept is at least as good as the core's for the configured costs, at every exchange
    duration from a tenth of a component to five; and it hides more where exchanges outlast a
    component."""
    gained = 0.0
    for attn, mlp in ((1.0, 1.0), (2.0, 1.0), (0.5, 2.0)):
        configured = ComponentCosts(attn=attn, mlp=mlp)
        core = _C.overlap_plan(runs, configured.to_core(), 2)
        ours = component_plan(runs, configured)
        assert validate_plan(ours, runs, 2) == []
        for comm in (0.1, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0):
            actual = ComponentCosts(attn=attn, mlp=mlp, comm=comm)
            a, b = exposed_comm(ours, runs, actual), exposed_comm(core, runs, actual)
            assert a <= b + 1e-9, (attn, mlp, comm, a, b)
            gained += b - a
    assert gained > 0
