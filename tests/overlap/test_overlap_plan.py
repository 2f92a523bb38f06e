"""The component plan from the C++ core: dependencies, pairing, the checker catches faults."""
import pytest

from dualpipe_ext import _C
from dualpipe_ext.overlap.plan import component_plan, format_plan, validate_plan

F, B, W = _C.Pass.F, _C.Pass.B, _C.Pass.W
COMPUTE, ISSUE, WAIT = _C.StepKind.COMPUTE, _C.StepKind.ISSUE, _C.StepKind.WAIT


def _pos(steps):
    return {(s.kind, s.component, s.pass_, s.layer): i for i, s in enumerate(steps)}


@pytest.mark.parametrize("num_layers", range(1, 9))
def test_dependencies_hold(num_layers):
    steps = component_plan(num_layers)
    assert validate_plan(steps, num_layers) == []
    assert len(steps) == 14 * num_layers  # 6 computations, 4 issues, 4 waits per layer
    pos = _pos(steps)
    A, M, D, K = _C.Component.ATTN, _C.Component.MLP, _C.Component.DISPATCH, _C.Component.COMBINE
    for l in range(num_layers):
        # forward chain of layer l, checked here independently of the C++ checker
        chain = [(COMPUTE, A, F), (ISSUE, D, F), (WAIT, D, F), (COMPUTE, M, F), (ISSUE, K, F), (WAIT, K, F)]
        idx = [pos[(k, c, p, l)] for k, c, p in chain]
        assert idx == sorted(idx)
        bchain = [(ISSUE, K, B), (WAIT, K, B), (COMPUTE, M, B), (ISSUE, D, B), (WAIT, D, B), (COMPUTE, A, B),
                  (COMPUTE, A, W)]
        idx = [pos[(k, c, p, l)] for k, c, p in bchain]
        assert idx == sorted(idx)
        assert pos[(COMPUTE, M, B, l)] < pos[(COMPUTE, M, W, l)]
        if l:
            assert pos[(WAIT, K, F, l - 1)] < pos[(COMPUTE, A, F, l)]
            assert pos[(COMPUTE, A, B, l)] < pos[(ISSUE, K, B, l - 1)]


@pytest.mark.parametrize("num_layers", range(1, 9))
def test_each_comm_runs_under_the_other_micro_batch(num_layers):
    steps = component_plan(num_layers)
    issues = [(i, s) for i, s in enumerate(steps) if s.kind == ISSUE]
    assert len(issues) == 4 * num_layers
    pos = _pos(steps)
    for i, s in issues:
        wait = pos[(WAIT, s.component, s.pass_, s.layer)]
        assert s.under and all(i < u < wait and steps[u].kind == COMPUTE for u in s.under)
        other = [steps[u] for u in s.under if (steps[u].pass_ == F) != (s.pass_ == F)]
        assert other, f"{s} runs under no computation of the other micro-batch"


def test_deepseek_order_per_layer():
    text = format_plan(component_plan(2)).splitlines()
    # one pair iteration: forward layer 1, backward layer 0 (brief: DeepSeek's per-layer order)
    order = [t for t in text[13:27] if not t.startswith("wait")]
    assert [t.split(" under")[0] for t in order] == [
        "issue combine.B0", "attn.F1", "issue dispatch.F1", "mlp.B0", "issue dispatch.B0", "mlp.W0", "mlp.F1",
        "issue combine.F1", "attn.B0", "attn.W0"]
    assert text[-1] == "wait combine.F1"


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
    # a communication paired only with its own micro-batch
    s = steps[0]
    own = _C.OverlapStep(s.kind, s.component, s.pass_, s.layer, [4])  # 'wait combine.B2'.. a B-side step
    bad = [own] + list(steps[1:])
    assert any("partner" in e or "other micro-batch" in e for e in validate_plan(bad, 3))
    # duplicates and layers out of range
    assert any("twice" in e for e in validate_plan(list(steps) + [steps[1]], 3))
    assert validate_plan(steps, 2)


def test_bad_num_layers():
    with pytest.raises(ValueError, match="num_layers"):
        component_plan(0)
    with pytest.raises(ValueError, match="num_layers"):
        _C.overlap_plan(-1)
