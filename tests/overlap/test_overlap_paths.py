"""The overlap engine over both expert-parallel paths and with two-batch overlap: bitwise equal
to the plain stages (a pair; DualPipe and DualPipeV x EP), bit-identical when run again from the same
seeds, and no host read on the EPBuffer path."""
import pytest
from overlap_paths import host_reads, pair_equality, pipelines
from dist_harness import run_ranks


@pytest.mark.slow
def test_pair_equals_plain_stages_on_both_paths_with_and_without_two_batch():
    for rank, failures in enumerate(run_ranks(pair_equality, 2, 2, timeout_s=300)):
        assert failures == [], f"rank {rank}: {failures}"


@pytest.mark.slow
def test_dualpipe_and_dualpipev_with_expert_parallelism_equal_plain_stages_and_rerun_bit_identical():
    results = run_ranks(pipelines, 4, 1, 4, timeout_s=600)
    for rank, out in enumerate(results):
        assert set(out) == {f"{path} {name}" for path in ("collective", "ep")
                            for name in ("DualPipe", "DualPipeV", "DualPipe, run again")}
        for name, failures in out.items():
            assert failures == [], f"rank {rank} {name}: {failures}"


@pytest.mark.slow
def test_no_host_read_inside_overlapped_steps_on_the_epbuffer_path():
    for rank, reports in enumerate(run_ranks(host_reads, 2, timeout_s=300)):
        for what, report in reports.items():
            assert report == "no host reads", f"rank {rank}, {what}: {report}"
