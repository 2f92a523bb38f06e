"""One token language: what the C++ core prints, it parses back, and the Python readers of
timelines accept exactly its compute tokens."""
import pytest

from dualpipe_ext.schedules import ActionType, get_plan, schedule_names
from dualpipe_ext.schedules.tokens import Part, compute_parts, parse_action

MALFORMED = ["", "F", "F0", "F0.", "F.1", "f0.1", "F0.1z", "Fx.1", "B0.1zz", "W0", "w", "WAIT", "F0.1+B1.0z",
             "B0.1+F1.0", "F0.1+F1.0", "F0.1+", "+B0.1", "F0.1 ", " F0.1", "sendF0.1<2", "recvB0.1>2",
             "sendF0.1>", "sendX0.1>2", "sendF0.1>x", "F-1.0", "F0.-1"]


@pytest.mark.parametrize("name", schedule_names())
def test_every_printed_action_parses_back(name):
    for ranks, chunks in ((2, 4), (4, 8), (4, 10)):
        try:
            plan = get_plan(name, ranks, chunks)
        except ValueError:
            continue
        for row in plan.actions + plan.forward_only().actions:
            for a in row:
                text = str(a)
                assert parse_action(text) == a, text
                assert str(parse_action(text)) == text


def test_compute_parts_follow_the_parsed_action():
    assert compute_parts("F0.3") == (Part("forward", 0, 3), None)
    assert compute_parts("B1.2") == (Part("backward", 1, 2), None)
    assert compute_parts("B1.2z") == (Part("backward_input", 1, 2), None)
    assert compute_parts("W") == (Part("weight", -1, -1), None)
    assert compute_parts("F0.3+B1.1") == (Part("forward", 0, 3), Part("backward", 1, 1))
    assert compute_parts("F12.30") == (Part("forward", 12, 30), None)  # the same numbers the C++ parser takes
    for token in get_plan("dualpipe", 4, 8).trace()[1]:
        a = parse_action(token)
        first, second = compute_parts(token)
        assert a.is_compute
        assert (first.module, first.mb) == (a.module, a.mb)
        assert (second is not None) == (a.type == ActionType.FORWARD_BACKWARD)


@pytest.mark.parametrize("token", MALFORMED)
def test_malformed_tokens_rejected_by_both(token):
    with pytest.raises(ValueError):
        parse_action(token)
    with pytest.raises(ValueError, match="malformed"):
        compute_parts(token)


@pytest.mark.parametrize("token", ["sendF0.1>2", "recvB1.0<3", "wait"])
def test_communication_is_an_action_but_not_a_compute_token(token):
    assert str(parse_action(token)) == token
    with pytest.raises(ValueError, match="communication action"):
        compute_parts(token)
