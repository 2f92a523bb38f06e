"""Memory of the runtime: the most activations a rank holds at once equals the simulator's figure
for the plan (PP + 1 micro-batches for DualPipe), and after step() no activation is held."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

from dist_harness import run_ranks
from rt_models import Stage

HIDDEN, MB = 8, 2


def _worker(rank, world, schedule, chunks):
    from dualpipe_ext import DualPipe, DualPipeV, set_p2p_tensor_dtype, set_p2p_tensor_shapes
    from dualpipe_ext.schedules import get_plan, simulate

    set_p2p_tensor_shapes([(MB, HIDDEN)])
    set_p2p_tensor_dtype(torch.float32)
    torch.manual_seed(rank)
    modules = (Stage(HIDDEN), Stage(HIDDEN))
    pipe = (DualPipe if schedule == "dualpipe" else DualPipeV)(modules)
    outputs = []  # weak references to every stage output of the step

    def keep(module, inputs, out):
        outputs.append(weakref.ref(out))

    hooks = [m.register_forward_hook(keep) for m in modules]
    feeds = schedule == "dualpipev" and rank == 0 or schedule == "dualpipe" and rank in (0, world - 1)
    n = chunks // 2 if schedule == "dualpipe" else chunks
    x = torch.randn(n * MB, HIDDEN) if feeds else None
    loss, _ = pipe.step(*([x] if feeds else []), num_chunks=chunks, criterion=lambda o, t: (o - t).pow(2).mean(),
                        labels=[x] if feeds else [])
    for h in hooks:
        h.remove()
    del loss
    gc.collect()
    alive = sum(r() is not None for r in outputs)
    sim = simulate(get_plan(schedule, world, chunks)).peak_activations[rank]
    return pipe.executor.peak_activations, sim, alive, len(outputs)


@pytest.mark.slow
@pytest.mark.parametrize("schedule,chunks", [("dualpipe", 8), ("dualpipe", 12), ("dualpipev", 10)])
def test_peak_activations_match_the_simulator_and_none_are_held_after_the_step(schedule, chunks):
    for rank, (peak, sim, alive, made) in enumerate(run_ranks(_worker, 4, schedule, chunks, timeout_s=120)):
        assert peak == sim, (rank, peak, sim)
        if schedule == "dualpipe":
            assert peak == 4 + 1  # PP + 1, as the DualPipe README states
        assert made > 0 and alive == 0, (rank, alive, made)
