"""Faults on 4 processes: a rank that raises (forward, backward, weight step, a send or receive)
makes every rank raise the same error naming it and its action, at once; a rank whose process
exits mid-step is named by every other rank within seconds, and nothing is left running."""
from __future__ import annotations

import re

import pytest

from dist_harness import LaunchError, run_ranks
from fault_workers import CHUNKS, WEIGHT_STEPS, killed_step, late_to_the_agreement, raise_matrix

KIND = {"forward": "F", "backward": "B", "weight": "W", "send": "send", "recv": "recv"}


def _cases():
    cases = []
    for i, schedule in enumerate(CHUNKS):
        for site in ("forward", "backward", "weight", "send", "recv"):
            if site == "weight" and schedule not in WEIGHT_STEPS:
                continue
            cases.append((schedule, site, 1 + (i % 3)))  # ranks 1, 2 and 3 take turns failing
    return cases


CASES = _cases()


@pytest.fixture(scope="module")
def matrix():
    return run_ranks(raise_matrix, 4, CASES, timeout_s=300)


@pytest.mark.parametrize("schedule,site,bad", CASES)
def test_a_raising_rank_is_named_with_its_action_on_every_rank(matrix, schedule, site, bad):
    key = f"{schedule}/{site}/{bad}"
    got = [m[key] for m in matrix]
    assert all(g["message"] == got[0]["message"] for g in got), got
    assert all(g["type"] == "PipelineError" for g in got), got
    msg = got[0]["message"]
    m = re.search(rf"\[rank {bad}\] pipeline rank {bad}: action (\d+) '([^']+)': RuntimeError: {site} exploded on "
                  rf"purpose", msg)
    assert m, msg
    token = m.group(2)
    # the action is the one of the site: a weight step may run inside a full backward
    kinds = {"weight": ("W", "B")}.get(site, (KIND[site],))
    assert any(k in token for k in kinds), (site, token)
    assert max(g["elapsed"] for g in got) < 20, got  # no rank waited for a timeout (60 s)
    assert all(m[key + "/after"]["type"] is None for m in matrix), [m[key + "/after"] for m in matrix]


def _alive(pid: int) -> bool:
    from dualpipe_ext.faults import pid_alive

    return pid_alive(pid)


@pytest.mark.slow
@pytest.mark.parametrize("schedule,site,victim,nth", [("dualpipe", "backward", 1, 2), ("dualpipev", "forward", 2, 5),
                                                       ("zb1p", "weight", 0, 2)])
def test_a_process_that_exits_mid_step_is_named_by_every_other_rank(tmp_path, schedule, site, victim, nth):
    with pytest.raises(LaunchError) as info:
        run_ranks(killed_step, 4, schedule, site, victim, nth, str(tmp_path), timeout_s=200, barrier=False,
                  grace_s=60)
    err = info.value
    assert err.exited == {victim: 17} and not err.errors and not err.unfinished, str(err)
    pids = {r: int((tmp_path / f"{r}.pid").read_text()) for r in range(4)}
    for rank in range(4):
        if rank == victim:
            continue
        got = err.results[rank]
        assert got["type"] == "PipelineError", got
        msg = got["message"]
        assert f"pipeline rank {victim} is gone: its process (pid {pids[victim]}) has exited" in msg, msg
        # where this rank was: an action of its plan, or the agreement after its walk
        assert re.match(rf"pipeline rank {rank}: (action \d+ '|the error agreement of the step)", msg), msg
        assert "waited" not in msg and "timeout" not in msg, msg  # the cause is a lost connection
        assert got["elapsed"] < 20, got  # seconds, not the 60 s timeout
    assert not any(_alive(p) for p in pids.values())  # no orphan


def test_a_rank_late_to_the_agreement_still_names_the_process_that_exited(tmp_path):
    """The diagnosis reads the fault board from the step's start, not from the failing wait's: the peers'
    reports of the exit may be older than the wait."""
    with pytest.raises(LaunchError) as info:
        run_ranks(late_to_the_agreement, 3, str(tmp_path), timeout_s=60, barrier=False, grace_s=30)
    err = info.value
    assert err.exited == {1: 17} and not err.errors and not err.unfinished, str(err)
    pid1 = int((tmp_path / "1.pid").read_text())
    msg = err.results[2]["message"]
    assert msg and "connection closed by global rank 0" in msg, msg
    assert f"rank 1 is gone: its process (pid {pid1}) has exited" in msg, msg
