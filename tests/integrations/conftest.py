"""The multi-process checks of the integration tests, run once per session on one process group."""
import pytest


@pytest.fixture(scope="session")
def two_ranks():
    """Results of ``hf_workers.two_rank_checks`` on 2 gloo ranks, one list entry per rank."""
    pytest.importorskip("transformers")
    from dist_harness import run_ranks
    from hf_workers import EP_BATCH_PER_RANK, EP_NAMES, PIPELINE_CASES, two_rank_checks

    return run_ranks(two_rank_checks, 2, EP_NAMES, EP_BATCH_PER_RANK, PIPELINE_CASES, timeout_s=180)
