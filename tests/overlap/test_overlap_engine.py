"""The overlap engine on two gloo ranks (expert parallel over both): equality and in-flight overlap."""
import pytest

from overlap_workers import pair_equality, pipeline_and_latency
from dist_harness import run_ranks


@pytest.mark.parametrize("layers", [1, 3])
def test_overlapped_pair_equals_forward_then_backward(layers):
    for rank, failures in enumerate(run_ranks(pair_equality, 2, layers, timeout_s=60)):
        assert failures == [], f"rank {rank}: {failures}"


@pytest.mark.slow
def test_dualpipe_with_engine_matches_plain_and_overlaps_injected_latency():
    latency_s = 0.02
    results = run_ranks(pipeline_and_latency, 2, 2, 6, latency_s, timeout_s=90)
    for rank, r in enumerate(results):
        assert r["failures"] == [], f"rank {rank}: {r['failures']}"
        assert len(r["pair_ms"]["overlapped"]) == len(r["pair_ms"]["plain"]) == 3  # pairs of DualPipe, 2 ranks, 6 chunks
    print("pair ms (rank 0):", results[0]["pair_ms"])
