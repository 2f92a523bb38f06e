"""Faults of DualPipe x expert parallelism on 4 processes (pipelines {0, 1}, {2, 3}; expert groups
{0, 2}, {1, 3}): global rank 1's attention raises inside an overlapped pair (collective path, then
EPBuffer), then its process exits in the backward of a pair. Every other rank raises naming rank 1
(and its action, when it raised), in bounded time; no process and no shared-memory file is left."""
from __future__ import annotations

import glob
import re

import pytest

from dist_harness import LaunchError, run_ranks
from ep_fault_workers import EP_TIMEOUT_S, ep_faults


@pytest.fixture(scope="module")
def outcome(tmp_path_factory):
    pid_dir = tmp_path_factory.mktemp("pids")
    with pytest.raises(LaunchError) as info:
        run_ranks(ep_faults, 4, ["collective", "ep"], True, str(pid_dir), timeout_s=400, barrier=False, grace_s=60)
    pids = {r: int((pid_dir / f"{r}.pid").read_text()) for r in range(4)}
    return info.value, pids


@pytest.mark.slow
@pytest.mark.parametrize("path", ["collective", "ep"])
def test_a_raise_inside_an_overlapped_pair_is_named_on_every_rank(outcome, path):
    err, _ = outcome
    for rank in (0, 2, 3):
        got = err.results[rank][path]
        assert got["type"] == "PipelineError", got
        msg = got["message"]
        if rank == 0:  # rank 1's own pipeline agrees on its error
            assert re.search(r"\[rank 1\] pipeline rank 1: action \d+ 'F\d\.\d\+B\d\.\d': RuntimeError: attention "
                             r"exploded on purpose", msg), msg
        else:  # the other pipeline: its expert peer of rank 1 waited for it, then named it from the fault board
            assert re.search(r"global rank 1 failed at its action \d+ 'F\d\.\d\+B\d\.\d': RuntimeError: attention "
                             r"exploded on purpose", msg), msg
        # bounded by the expert group's timeout (the silent peer), not the pipeline's 60 s
        assert got["elapsed"] < 4 * EP_TIMEOUT_S + 10, got


@pytest.mark.slow
def test_a_process_that_exits_in_an_overlapped_pair_is_named_by_every_other_rank(outcome):
    err, pids = outcome
    assert err.exited == {1: 17} and not err.errors and not err.unfinished, str(err)
    for rank in (0, 2, 3):
        got = err.results[rank]["kill"]
        assert got["type"] == "PipelineError", got
        who = "pipeline rank 1" if rank == 0 else "global rank 1"
        assert f"{who} is gone: its process (pid {pids[1]}) has exited" in got["message"], got["message"]
        assert got["elapsed"] < 30, got
    from dualpipe_ext.faults import pid_alive

    assert not any(pid_alive(p) for p in pids.values())  # no orphan
    assert not glob.glob("/dev/shm/dualpipe_ext_ep_*")  # the EPBuffers' files are gone
