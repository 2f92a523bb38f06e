"""The validator accepts every generated plan and rejects broken ones with the specific rule."""
import pytest

from dualpipe_ext import _C
from dualpipe_ext.schedules import get_plan, schedule_names, validate

Action = _C.Action


def _sizes(name, chunk_stride=1):
    """Every valid (ranks, chunks) with 2..16 ranks and up to 64 chunks (or every ``chunk_stride``-th)."""
    for ranks in range(2, 17):
        for chunks in range(1, 65, chunk_stride):
            try:
                yield ranks, chunks, _C.make_plan(name, ranks, chunks)
            except ValueError:
                continue


@pytest.mark.parametrize("name", schedule_names())
def test_every_generated_plan_validates(name):
    count = 0
    for ranks, chunks, plan in _sizes(name):
        validate(plan)
        validate(plan.forward_only())
        count += 1
    assert count > 100


@pytest.mark.parametrize("name", schedule_names())
def test_every_micro_batch_once(name):
    for ranks, chunks, plan in _sizes(name, chunk_stride=7):
        want = sorted(f"{m}.{c}" for m in range(plan.num_modules) for c in range(plan.mbs_per_module))
        for r, tokens in enumerate(plan.trace()):
            fwd = [t[1:].split("+")[0] for t in tokens if t.startswith("F")]
            bwd = [t.split("B")[1].rstrip("z") for t in tokens if "B" in t]
            assert sorted(fwd) == want and sorted(bwd) == want, (name, ranks, chunks, r)
            assert tokens.count("W") == sum(t.endswith("z") for t in tokens)
        assert plan.mbs_per_module * (2 if name == "dualpipe" else 1) == chunks


def _mutated(name, ranks, chunks, edit):
    plan = _C.make_plan(name, ranks, chunks)
    rows = [[str(a) for a in row] for row in plan.actions]
    edit(rows)
    plan.actions = [[Action.parse(t) for t in row] for row in rows]
    return plan


def _reject(plan, *fragments):
    with pytest.raises(ValueError) as info:
        validate(plan)
    msg = str(info.value)
    for frag in fragments:
        assert frag in msg, msg
    return msg


def test_dropped_receive():
    plan = _mutated("1f1b", 4, 8, lambda rows: rows[1].remove("recvF0.2<0"))
    msg = _reject(plan, "dependency:", "F0.2 (rank 1, step 9) runs without its input", "no recvF0.2<0", "[[F0.2]]")
    assert len(msg.splitlines()) <= 8


def test_receive_completed_late():
    def edit(rows):  # move the wait that completes recvF0.2<0 after the forward that needs it
        i = rows[1].index("recvF0.2<0")
        assert rows[1][i + 1] == "wait" and rows[1][i + 2] == "F0.2"
        rows[1][i + 1], rows[1][i + 2] = rows[1][i + 2], rows[1][i + 1]

    _reject(_mutated("1f1b", 4, 8, edit), "dependency:", "runs before a wait completes its receive")


def test_swapped_sends():
    def edit(rows):
        i = rows[1].index("sendF1.2>0")
        assert rows[1][i + 1] == "sendB0.0>0"
        rows[1][i], rows[1][i + 1] = rows[1][i + 1], rows[1][i]

    _reject(_mutated("dualpipe", 4, 8, edit), "matching:", "the 3rd send from rank 1 to rank 0 is sendB0.0>0",
            "the 3rd receive on rank 0 from rank 1 is recvF1.2<1", "[[sendB0.0>0]]", "[[recvF1.2<1]]")


def test_send_before_data():
    def edit(rows):
        i = rows[0].index("F0.1")
        assert rows[0][i + 1] == "sendF0.1>1"
        rows[0][i], rows[0][i + 1] = rows[0][i + 1], rows[0][i]

    _reject(_mutated("1f1b", 4, 8, edit), "dependency:", "sendF0.1>1 (rank 0, step 3) sends data that does not exist yet")


def test_weight_before_any_backward_input():
    _reject(_mutated("zb1p", 4, 8, lambda rows: rows[0].insert(0, "W")), "weight FIFO:", "[[W]]",
            "no backward input")


def test_weight_never_run():
    def edit(rows):
        rows[3].reverse()
        rows[3].remove("W")
        rows[3].reverse()

    _reject(_mutated("zb1p", 4, 8, edit), "weight FIFO:", "rank 3 ends with 1 queued weight-gradient batch")


def test_deadlock():
    """Each rank waits on a receive before posting the send the other one needs."""

    def edit(rows):
        rows[0][:] = "recvB0.0<1 wait F0.0 sendF0.0>1 wait B0.0".split()
        rows[1][:] = "recvF0.0<0 wait F0.0 B0.0 sendB0.0>0 wait".split()

    msg = _reject(_mutated("1f1b", 2, 1, edit), "deadlock:", "cycle rank 0 -> rank 1 -> rank 0",
                  "rank 0 is blocked at its wait (step 1) on recvB0.0<1", "[[wait]]")
    assert msg.count("[[wait]]") == 2


def test_missing_backward():
    _reject(_mutated("1f1b", 4, 8, lambda rows: rows[0].remove("B0.3")), "exactly once:",
            "B0.3 never runs on rank 0", "[[F0.3]]")


def test_duplicate_forward():
    _reject(_mutated("gpipe", 2, 3, lambda rows: rows[0].insert(1, "F0.0")), "exactly once:", "F0.0 runs twice on rank 0")


def test_wrong_peer_and_unposted():
    _reject(_mutated("1f1b", 3, 3, lambda rows: rows[0].__setitem__(1, "sendF0.0>2")), "peer:",
            "sends its outputs to rank 1")
    _reject(_mutated("1f1b", 2, 2, lambda rows: rows[1].pop()), "unposted:", "rank 1 ends with sendB0.1>0")


def test_pair_halves_may_not_depend_on_each_other():
    _reject(_mutated("1f1b", 1, 2, lambda rows: rows[0].__setitem__(slice(None), ["F0.0", "F0.1+B0.1", "B0.0"])),
            "dependency:", "runs before its forward F0.1")


def test_long_rows_are_elided():
    rows = get_plan("dualpipev", 16, 64).trace()
    pair = [t for t in rows[0] if "+B0." in t][-1]  # rank 0 module 0 is the first stage: nothing to send
    victim = pair.split("+")[1]
    plan = _mutated("dualpipev", 16, 64, lambda rows: rows[0].__setitem__(rows[0].index(pair), pair.split("+")[0]))
    msg = _reject(plan, "exactly once:", f"{victim} never runs on rank 0")
    assert "..." in msg and max(len(line) for line in msg.splitlines()[1:]) < 200


def test_forward_only_rejects_backward_communication():
    plan = get_plan("1f1b", 2, 2).forward_only()
    rows = [[str(a) for a in row] for row in plan.actions]
    rows[0] += ["recvB0.0<1", "wait"]
    p = _C.make_plan("1f1b", 2, 2).forward_only()
    p.actions = [[Action.parse(t) for t in row] for row in rows]
    _reject(p, "forward only:")


def test_schedule_names_cover_generators():
    assert set(schedule_names()) == {"dualpipe", "dualpipev", "1f1b", "zb1p", "gpipe"}
