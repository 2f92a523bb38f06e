"""One name per concept: the kinds of work are named alike in the C++ core, its binding, the
runtime and the readers of timelines; only the trace tokens keep their letters."""
from dualpipe_ext import _C
from dualpipe_ext.runtime.compiled import Kind
from dualpipe_ext.schedules.tokens import KINDS, compute_parts

COMPUTE_TOKENS = {"F0.1": "FORWARD", "B0.1": "BACKWARD", "B0.1z": "BACKWARD_INPUT", "W": "WEIGHT"}


def test_runtime_op_kinds_are_the_action_types():
    assert [k.name for k in Kind] == list(_C.ActionType.__members__)
    for name, action_type in _C.ActionType.__members__.items():
        assert int(Kind[name]) == int(action_type)


def test_a_part_kind_is_its_action_type_in_lower_case():
    for token, name in COMPUTE_TOKENS.items():
        assert _C.Action.parse(token).type == _C.ActionType.__members__[name]
        part, second = compute_parts(token)
        assert second is None and part.kind == name.lower()
    assert KINDS == tuple(name.lower() for name in COMPUTE_TOKENS.values())
    first, second = compute_parts("F0.1+B1.0")
    assert _C.Action.parse("F0.1+B1.0").type == _C.ActionType.FORWARD_BACKWARD
    assert (first.kind, second.kind) == ("forward", "backward")


def test_component_passes_use_the_same_words():
    # a component's backward computes input gradients only: the backward input of the action IR
    assert list(_C.Pass.__members__) == ["FORWARD", "BACKWARD_INPUT", "WEIGHT"]
    assert set(_C.Pass.__members__) <= set(_C.ActionType.__members__)


def test_trace_tokens_keep_their_letters():
    assert [str(_C.Action.parse(t)) for t in COMPUTE_TOKENS] == list(COMPUTE_TOKENS)
