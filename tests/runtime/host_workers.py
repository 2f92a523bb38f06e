"""Rank bodies of tests/runtime/test_host_agreement.py."""
from __future__ import annotations

import os
import random
import time
from typing import Dict

import torch
import torch.distributed as dist

def _global(g: int) -> str:
    return f"global rank {g}"


def _wait(what: str, timeout_s: float = 20.0):
    from dualpipe_ext.runtime.agreement import Wait

    return Wait(what, dist.get_rank(), timeout_s, (_global, list(range(dist.get_world_size()))), time.time())


def _open():
    from dualpipe_ext.runtime.host_agreement import open_on_host

    wait = _wait("the set-up")
    return open_on_host(dist.group.WORLD, wait), wait.names


def many_maxima(rank: int, world: int, rounds: int) -> Dict:
    """``rounds`` agreements in a row, ranks at different speeds (nothing else synchronises them, so a fast
    rank runs an agreement ahead); afterwards each result against the maximum of every rank's values."""
    host, names = _open()
    rng = random.Random(1000 + rank)
    sent, got = [], []
    for _ in range(rounds):
        flags = [rng.randrange(-50, 50) for _ in range(5)]
        sent.append(flags)
        got.append(host.max_over_ranks(flags, _wait("test")))
        if rng.random() < 0.3:
            time.sleep(rng.random() * 2e-3)
    everyone = [torch.empty(rounds, 5, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(everyone, torch.tensor(sent, dtype=torch.int64))
    want = torch.stack(everyone).amax(0).tolist()
    mismatches = [(i, g, w) for i, (g, w) in enumerate(zip(got, want)) if g != w]
    return {"opened": host is not None, "mismatches": mismatches}


def disagreement(rank: int, world: int) -> Dict:
    """Ranks that pass different values raise the same ValueError through either path."""
    from dualpipe_ext.runtime.agreement import agree

    host, names = _open()
    out = {}
    for label, h in (("host", host), ("group", None)):
        try:
            agree(dist.group.WORLD, torch.device("cpu"), rank, 0, None, values=(("num_chunks", 8 + 2 * (rank == 1)),),
                  timeout_s=20, names=names, host=h)
            out[label] = None
        except ValueError as e:
            out[label] = str(e)
    try:  # one rank reports an error: the messages travel over the group, every rank raises it
        agree(dist.group.WORLD, torch.device("cpu"), rank, 1 if rank == 2 else 0, "bad input here" if rank == 2
              else None, timeout_s=20, names=names, host=host)
        out["error"] = None
    except ValueError as e:
        out["error"] = str(e)
    return out


def missing(rank: int, world: int, how: str) -> Dict:
    """Rank ``world - 1`` does not come to the second agreement: it sleeps (alive, silent) or exits."""
    host, names = _open()
    host.max_over_ranks([0], _wait("first"))
    if rank == world - 1:
        if how == "exit":
            os._exit(3)
        time.sleep(6.0)
        return {"message": None, "elapsed": 0.0}
    begin = time.monotonic()
    try:
        host.max_over_ranks([0], _wait("the error agreement of the step", 1.5 if how == "silent" else 60.0))
        message = None
    except Exception as e:  # noqa: BLE001 - reported to the test
        message = f"{type(e).__name__}: {e}"
    return {"message": message, "elapsed": time.monotonic() - begin, "pid": os.getpid()}


def other_host(rank: int, world: int) -> Dict:
    """One rank looks like it runs on another host: no rank uses shared memory."""
    from dualpipe_ext.runtime import host_agreement

    if rank == 1:
        host_agreement.host_identity = lambda: 12345
    host, _ = _open()
    leftover = [f for f in os.listdir("/dev/shm") if f.startswith(f"dualpipe_ext_agree_{os.getpid()}_")]
    return {"opened": host is not None, "leftover": leftover}


def pipeline_uses_host(rank: int, world: int) -> Dict:
    """A DualPipeV whose ranks share a host agrees in shared memory; bad input still raises alike."""
    from dualpipe_ext import DualPipeV, set_p2p_tensor_dtype, set_p2p_tensor_shapes

    torch.manual_seed(0)
    mods = [torch.nn.Linear(4, 4) for _ in range(2 * world)]
    pipe = DualPipeV((mods[rank], mods[2 * world - 1 - rank]))
    set_p2p_tensor_shapes([(2, 4)])
    set_p2p_tensor_dtype(torch.float32)
    x, y = torch.randn(16, 4), torch.randn(16, 4)

    def step(**kw):
        if rank == 0:
            return pipe.step(x, num_chunks=8, criterion=torch.nn.functional.mse_loss, labels=[y], **kw)
        return pipe.step(num_chunks=8, **kw)

    step()
    out = {"host": pipe._host is not None}
    try:
        if rank == 0:
            pipe.step(x[:15], num_chunks=8, criterion=torch.nn.functional.mse_loss, labels=[y])
        else:
            step()
        out["bad"] = None
    except ValueError as e:
        out["bad"] = str(e)
    loss, _ = step()
    out["after"] = None if loss is None else loss.shape[0]
    return out
