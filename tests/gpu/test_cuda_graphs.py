"""CUDA graphs of EPBuffer steps: one MoE layer's forward + backward (one rank, and two processes
sharing cuda:0) and one overlapped forward + backward pair of the overlap engine (EPBuffer,
two-batch) are captured in a ``torch.cuda.CUDAGraph`` through ``StepGraph`` and replayed 10
times; every replay equals the eager step bit for bit (outputs, input and parameter
gradients). Eager itself must repeat bitwise first (attention on SDPA's math kernels). On CPU
the same bodies run with ``StepGraph`` replaying eagerly, which checks the bodies and that the
steps repeat bitwise."""
from __future__ import annotations

import pytest

from dist_harness import run_ranks
from gpu_workers import graph_moe_worker, graph_pair_worker, requires_cuda

REPLAYS = 10


def _check(reports, captured, replays=REPLAYS):
    for rank, r in enumerate(reports):
        assert r["eager_repeats"], f"rank {rank}: two eager steps differ, so no replay can equal eager bitwise"
        assert r["captured"] is captured, r
        assert len(r["replays"]) == replays and all(r["replays"]), (
            f"rank {rank}: replays equal to eager: {r['replays']}, first differing outputs {r.get('first_difference')} "
            f"(0: output, 1: input gradient, then parameter gradients)")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("world", [1, 2])
def test_moe_layer_step_replays_bitwise(world):
    _check(run_ranks(graph_moe_worker, world, "cuda", REPLAYS, timeout_s=180), captured=True)


@pytest.mark.gpu
@requires_cuda
def test_overlapped_pair_replays_bitwise():
    _check(run_ranks(graph_pair_worker, 1, "cuda", REPLAYS, timeout_s=180), captured=True)


@pytest.mark.slow
def test_moe_layer_step_on_cpu_repeats_bitwise():
    _check(run_ranks(graph_moe_worker, 1, "cpu", 3, timeout_s=240), captured=False, replays=3)


@pytest.mark.slow
def test_overlapped_pair_on_cpu_repeats_bitwise():
    _check(run_ranks(graph_pair_worker, 1, "cpu", 3, timeout_s=300), captured=False, replays=3)
