"""EPBuffer across processes on one GPU: 2 and 4 ranks share cuda:0 through CUDA symmetric memory
(gloo carries the control, NCCL refusing two ranks on one device), every scenario of the CPU twins
(tests/moe/test_ep_buffer.py, test_ep_moe.py): exchanges bit for bit against the references under
skewed routing, empty receivers, a rank without tokens, two exchanges in flight waited out of
order and 100 successive exchanges; the MoE layer's forward and backward against a float64
dense model, within LAYER_TOLERANCE per dtype. The same bodies also run here on CPU (smaller,
interpreted). Correctness only: the processes' kernels time-slice on the GPU."""
from __future__ import annotations

import pytest
import torch

from dist_harness import run_ranks
from gpu_workers import (LAYER_TOLERANCE, dense_reference, exchange_worker, layer_errors, layer_params, layer_worker,
                         requires_cuda)


def _exchanges(device, world, dtype, rounds, timeout_s):
    for rank, checks in enumerate(run_ranks(exchange_worker, world, device, dtype, rounds, timeout_s=timeout_s)):
        failed = [name for name, ok in checks.items() if not ok]
        assert not failed, f"rank {rank} of {world} ({dtype}): {failed}"


def _layer(device, world, dtype, timeout_s):
    p = layer_params(world, device)
    results = run_ranks(layer_worker, world, device, dtype, p, timeout_s=timeout_s)
    tol = LAYER_TOLERANCE[getattr(torch, dtype)]
    errors = layer_errors(results, dense_reference(p, getattr(torch, dtype)), p)
    assert all(e <= tol for e in errors.values()), f"{world} ranks, {dtype}: relative errors {errors}, allowed {tol}"


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("world,dtype", [(2, "bfloat16"), (2, "float32"), (4, "bfloat16")])
def test_exchanges_across_processes_on_one_gpu(world, dtype):
    _exchanges("cuda", world, dtype, 100, timeout_s=180)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("world,dtype", [(2, "bfloat16"), (2, "float32"), (4, "bfloat16"), (4, "float32")])
def test_moe_layer_across_processes_on_one_gpu_matches_dense_model(world, dtype):
    _layer("cuda", world, dtype, timeout_s=180)


@pytest.mark.slow
def test_exchange_scenarios_on_cpu():
    _exchanges("cpu", 2, "float32", 4, timeout_s=300)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_moe_layer_scenarios_on_cpu_match_dense_model(world):
    _layer("cpu", world, "float32", timeout_s=300)
