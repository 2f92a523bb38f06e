"""A drop-in training script's rank body, for the clean-exit test: started by
``torch.multiprocessing.spawn`` and ``init_process_group`` as a user's script would, not by run_ranks."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

HIDDEN, MICRO = 8, 2


def _criterion(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(y, t).clone()


def drop_in_rank(rank: int, world: int, schedule: str, chunks: int, port: int, out_dir: str) -> None:
    """A DualPipe/DualPipeV training step, a no_grad step, gradient all_gather/all_reduce, then
    destroy_process_group; writes ``<out_dir>/<rank>`` (the reduced gradient sum) when it got there."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from dualpipe_ext import DualPipe, DualPipeV, set_p2p_tensor_dtype, set_p2p_tensor_shapes

    set_p2p_tensor_shapes([(MICRO, HIDDEN)])
    set_p2p_tensor_dtype(torch.float32)
    torch.manual_seed(0)
    stages = [nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, HIDDEN)) for _ in range(2 * world)]
    if schedule == "dualpipev":
        pipe = DualPipeV((stages[rank], stages[2 * world - 1 - rank]))
        feeds, half = rank == 0, chunks
    else:
        pipe = DualPipe((stages[rank], stages[world - 1 - rank]))
        feeds, half = rank in (0, world - 1), chunks // 2
    x = torch.randn(half * MICRO, HIDDEN)
    y = torch.randn(half * MICRO, HIDDEN)
    inputs, labels = ((x,), (y,)) if feeds else ((), ())
    pipe.step(*inputs, num_chunks=chunks, criterion=_criterion, labels=labels)
    with torch.no_grad():
        pipe.step(*inputs, num_chunks=chunks, criterion=_criterion, labels=labels, return_outputs=True)
    grads = torch.cat([p.grad.flatten() for p in pipe.parameters()])
    gathered = [torch.empty_like(grads) for _ in range(world)]
    dist.all_gather(gathered, grads)
    dist.all_reduce(grads)
    dist.destroy_process_group()
    with open(os.path.join(out_dir, str(rank)), "w") as f:
        f.write(repr(float(grads.sum())))
