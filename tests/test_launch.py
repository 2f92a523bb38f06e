"""dualpipe_ext.launch.run_ranks: results by rank, failures named, nothing left running."""
import os
import time

import pytest

from dualpipe_ext.launch import LaunchError, run_ranks
from launch_workers import environ, exit_on_zero, hang_on_last, own_group, raise_on_one, report


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_results_by_rank_in_one_group():
    results = run_ranks(report, 3, "x", timeout_s=60)
    assert [r["rank"] for r in results] == [0, 1, 2]
    assert all(r["world"] == 3 and r["extra"] == "x" and float(r["sum"]) == 3.0 for r in results)
    assert [r["env"] for r in results] == [(str(r), "3", "127.0.0.1") for r in range(3)]
    assert not any(_alive(r["pid"]) for r in results)


def test_a_raising_rank_is_named_with_its_traceback():
    with pytest.raises(LaunchError) as info:
        run_ranks(raise_on_one, 2, timeout_s=60, barrier=False)
    err = info.value
    assert list(err.errors) == [1] and "ValueError: rank one fails on purpose" in err.errors[1]
    assert "rank 1 raised:" in str(err) and "Traceback" in str(err)


@pytest.mark.slow
def test_a_straggler_is_named_and_killed(tmp_path):
    # timeout_s counts from when both ranks run the function: a slow start-up (spawn, import torch)
    # on a busy machine does not count against it, so rank 0 always finishes and rank 1 never does.
    start = time.monotonic()
    with pytest.raises(LaunchError) as info:
        run_ranks(hang_on_last, 2, str(tmp_path), timeout_s=8, barrier=False)
    assert time.monotonic() - start < 600  # killed, not waited for (the straggler sleeps 600 s)
    assert info.value.unfinished == [1] and "ranks [1] did not finish in time (8 s)" in str(info.value)
    pids = [int((tmp_path / f"{r}.pid").read_text()) for r in range(2)]
    assert not any(_alive(p) for p in pids)


def test_a_rank_that_does_not_start_is_named_as_such():
    with pytest.raises(LaunchError) as info:
        run_ranks(report, 2, "x", timeout_s=60, start_timeout_s=0.01)
    assert sorted(info.value.unfinished) == [0, 1] and "did not start within 0.01 s" in str(info.value)


def test_a_rank_that_exits_without_a_result():
    with pytest.raises(LaunchError) as info:
        run_ranks(exit_on_zero, 2, timeout_s=60, init=False)
    assert info.value.exited == {0: 3} and "rank 0 exited with code 3" in str(info.value)


@pytest.mark.slow
def test_without_init_the_function_sets_up_its_own_group():
    assert run_ranks(own_group, 2, timeout_s=60, init=False) == [2, 2]


def test_each_launch_gives_the_ranks_the_callers_current_environment(monkeypatch):
    """The ranks fork from a server started at the first launch; they still see the environment of the
    launch itself, variables set and removed since included."""
    names = ["DUALPIPE_EXT_PROBE_A", "DUALPIPE_EXT_PROBE_B"]
    monkeypatch.setenv("DUALPIPE_EXT_PROBE_B", "first")
    run_ranks(environ, 1, names, timeout_s=60, init=False)  # the server exists from here on
    monkeypatch.setenv("DUALPIPE_EXT_PROBE_A", "second")
    monkeypatch.delenv("DUALPIPE_EXT_PROBE_B")
    results = run_ranks(environ, 2, names, timeout_s=60, init=False)
    assert [r["env"] for r in results] == [{"DUALPIPE_EXT_PROBE_A": "second", "DUALPIPE_EXT_PROBE_B": None}] * 2


def test_preload_names_modules():
    with pytest.raises(ValueError, match="preload must be a sequence of module names"):
        run_ranks(report, 1, "x", preload="torch")
