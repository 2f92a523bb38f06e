"""The overlap engine over both expert-parallel paths and with two-batch overlap: bitwise equal
to the plain stages (a pair; DualPipe and DualPipeV x EP), and no host read on the EPBuffer path."""
import pytest
from overlap_paths import determinism, host_reads, pair_equality, pipelines
from dist_harness import run_ranks


@pytest.mark.slow
def test_pair_equals_plain_stages_on_both_paths_with_and_without_two_batch():
    for rank, failures in enumerate(run_ranks(pair_equality, 2, 2, timeout_s=300)):
        assert failures == [], f"rank {rank}: {failures}"


@pytest.mark.slow
def test_dualpipe_and_dualpipev_with_expert_parallelism_equal_plain_stages():
    results = run_ranks(pipelines, 4, 1, 4, timeout_s=600)
    for rank, out in enumerate(results):
        assert set(out) == {"collective DualPipe", "collective DualPipeV", "ep DualPipe", "ep DualPipeV"}
        for name, failures in out.items():
            assert failures == [], f"rank {rank} {name}: {failures}"


@pytest.mark.slow
def test_no_host_read_inside_overlapped_steps_on_the_epbuffer_path():
    for rank, reports in enumerate(run_ranks(host_reads, 2, timeout_s=300)):
        for what, report in reports.items():
            assert report == "no host reads", f"rank {rank}, {what}: {report}"


@pytest.mark.slow
def test_two_runs_from_the_same_seed_are_bit_identical():
    for rank, failures in enumerate(run_ranks(determinism, 4, 1, 4, timeout_s=600)):
        assert failures == [], f"rank {rank}: {failures}"
