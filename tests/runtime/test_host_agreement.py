"""The error agreement of ranks on one host, in shared memory: the same verdict as over the group,
stale slots never taken, and a rank that does not come named alone."""
import mmap
import os
import threading
import time

import pytest

from dist_harness import LaunchError, run_ranks
from host_workers import disagreement, many_maxima, missing, other_host, pipeline_uses_host

from dualpipe_ext.runtime import host_agreement as ha
from dualpipe_ext.runtime.agreement import PipelineError, Wait


@pytest.mark.parametrize("world", [2, 3, 4])
def test_every_rank_gets_the_maximum_of_every_ranks_values(world):
    results = run_ranks(many_maxima, world, 150, timeout_s=120)
    for r in results:
        assert r["opened"]
        assert not r["mismatches"], r["mismatches"][:3]


def test_disagreement_and_errors_raise_the_same_on_every_rank_through_either_path():
    results = run_ranks(disagreement, 3, timeout_s=60)
    for r in results:
        assert r["host"] is not None and r["host"] == r["group"], r
        assert "different values of num_chunks (from 8 to 10)" in r["host"]
        assert r["error"] and "[rank 2] bad input here" in r["error"]
    assert len({r["host"] for r in results}) == 1 and len({r["error"] for r in results}) == 1


def test_a_silent_rank_is_named_alone_after_the_timeout():
    results = run_ranks(missing, 3, "silent", timeout_s=60)
    for r in results[:2]:
        msg = r["message"]
        assert msg and msg.startswith("PipelineError: pipeline rank"), msg
        assert "did not complete within 1.5 s: global rank 2 did not reach it" in msg, msg
        assert "global rank 1 " not in msg and "global rank 1," not in msg, msg
        assert 1.4 < r["elapsed"] < 10, r["elapsed"]


def test_a_rank_whose_process_exits_is_named_long_before_the_timeout():
    with pytest.raises(LaunchError) as info:
        run_ranks(missing, 3, "exit", timeout_s=60, barrier=False, grace_s=20)
    err = info.value
    assert err.exited == {2: 3} and not err.errors, str(err)
    for r in (err.results[0], err.results[1]):
        msg = r["message"]
        assert msg and "global rank 2 did not reach it" in msg, msg
        assert "its process (pid" in msg and "has exited" in msg, msg
        assert r["elapsed"] < 10, r["elapsed"]  # the timeout was 60 s


def test_ranks_on_different_hosts_use_the_group_and_leave_no_file():
    results = run_ranks(other_host, 2, timeout_s=60)
    assert [r["opened"] for r in results] == [False, False]
    assert not results[0]["leftover"]


def test_a_pipeline_on_one_host_agrees_in_shared_memory():
    results = run_ranks(pipeline_uses_host, 2, timeout_s=120)
    assert all(r["host"] for r in results)
    assert results[0]["bad"] and results[0]["bad"] == results[1]["bad"], results
    assert "batch size 15" in results[0]["bad"]
    assert results[0]["after"] == 8  # the pipeline steps on after the refused step (DualPipeV: loss on rank 0)


def _wait(timeout_s: float = 5.0) -> Wait:
    return Wait("the test", 0, timeout_s, None, 0.0)


def _one_process_pair():
    """An agreement of two 'ranks' in this process: rank 0's view, and the shared memory to play rank 1 in."""
    mm = mmap.mmap(-1, ha.file_size(2))
    return ha.HostAgreement(mm, 0, 2, [os.getpid(), os.getpid()], [0, 1]), mm


def _write_later(mm, offset: int, data: bytes, delay_s: float) -> threading.Timer:
    def write():
        mm[offset:offset + len(data)] = data
    t = threading.Timer(delay_s, write)
    t.start()
    return t


def test_a_slot_is_taken_only_when_its_checksum_matches():
    agreement, mm = _one_process_pair()
    good = ha.slot_bytes(1, [3, -4, 9])
    stale = bytearray(good)
    stale[24:32] = ha.slot_bytes(1, [7, -4, 9])[24:32]  # seq and checksum of agreement 1, an older first value
    mm[ha.slot_offset(1, 1):ha.slot_offset(1, 1) + len(stale)] = bytes(stale)
    begin = time.monotonic()
    with pytest.raises(PipelineError, match="did not complete within 0.3 s: global rank 1 did not reach it"):
        agreement.max_over_ranks([1, 2, 3], _wait(0.3))
    assert time.monotonic() - begin >= 0.3
    agreement, mm = _one_process_pair()
    timer = _write_later(mm, ha.slot_offset(1, 1), good, 0.05)
    assert agreement.max_over_ranks([1, 2, 3], _wait()) == [3, 2, 9]
    timer.join()


def test_agreements_alternate_slots_so_a_peer_one_ahead_does_not_overwrite_the_last():
    agreement, mm = _one_process_pair()
    mm[ha.slot_offset(1, 1):ha.slot_offset(1, 1) + ha._SLOT_BYTES] = ha.slot_bytes(1, [5])
    mm[ha.slot_offset(1, 2):ha.slot_offset(1, 2) + ha._SLOT_BYTES] = ha.slot_bytes(2, [6])  # the peer went on
    assert agreement.max_over_ranks([0], _wait()) == [5]
    assert agreement.max_over_ranks([0], _wait()) == [6]
    mm[ha.slot_offset(1, 5):ha.slot_offset(1, 5) + ha._SLOT_BYTES] = ha.slot_bytes(5, [1])  # two ahead: out of step
    with pytest.raises(PipelineError, match="out of step"):
        agreement.max_over_ranks([0], _wait())


def test_ranks_that_pass_different_numbers_of_values_are_told_so():
    agreement, mm = _one_process_pair()
    mm[ha.slot_offset(1, 1):ha.slot_offset(1, 1) + ha._SLOT_BYTES] = ha.slot_bytes(1, [0, 8, -8])
    with pytest.raises(ValueError, match="different numbers of values"):
        agreement.max_over_ranks([0, 8, -8, 5, -5], _wait())
