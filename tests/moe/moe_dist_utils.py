"""Helpers of the MoE tests: run a function on several gloo ranks under a hard timeout, and a
dense single-process reference of routing + experts."""
from __future__ import annotations

import io
import multiprocessing as mp
import os
import socket
import traceback
from datetime import timedelta

import torch
import torch.nn.functional as F


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world, port, queue, args):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    try:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=60))
        try:
            # serialised to bytes: shared-memory tensors would die with this process
            buf = io.BytesIO()
            torch.save(fn(rank, world, *args), buf)
            queue.put((rank, "ok", buf.getvalue()))
        finally:
            dist.destroy_process_group()
    except BaseException:  # report everything to the parent
        queue.put((rank, "error", traceback.format_exc()))


def run_ranks(fn, world: int, *args, timeout: float = 90.0):
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks; return the per-rank results.

    Fails naming the ranks that raised or did not finish within ``timeout`` seconds.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, queue, args), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results, errors = {}, {}
    import queue as queue_mod
    import time

    deadline = time.monotonic() + timeout
    while len(results) + len(errors) < world and time.monotonic() < deadline:
        try:
            rank, status, value = queue.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue_mod.Empty:
            break
        (results if status == "ok" else errors)[rank] = value
    for p in procs:
        p.join(timeout=max(0.1, deadline - time.monotonic()) if not errors else 5)
        if p.is_alive():
            p.kill()
            p.join()
    missing = [r for r in range(world) if r not in results and r not in errors]
    if errors:
        raise AssertionError("ranks failed:\n" + "\n".join(f"--- rank {r} ---\n{e}" for r, e in sorted(errors.items())))
    if missing:
        raise AssertionError(f"ranks {missing} did not finish within {timeout} s")
    return [torch.load(io.BytesIO(results[r]), weights_only=False) for r in range(world)]


def swiglu_expert(x, gate_up, down):
    """One expert: x [n, hidden], gate_up [2I, hidden], down [hidden, I]."""
    gate, up = (x @ gate_up.t()).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ down.t()


def dense_moe_reference(x, topk_idx, topk_weights, gate_up, down):
    """out[t] = sum_k w[t, k] * expert_{idx[t, k]}(x[t]) over slots with idx >= 0, token by token."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(topk_idx.shape[1]):
            e = int(topk_idx[t, k])
            if e >= 0:
                out[t] = out[t] + topk_weights[t, k] * swiglu_expert(x[t:t + 1], gate_up[e], down[e])[0]
    return out


def reference_router(x, gate, topk, mode, first_token=0):
    """Softmax router of the tests (differentiable in gate through the weights).

    mode "topk": top-k of the scores; "skewed": every token to experts 0..topk-1;
    "holes": top-k with the last slot of every even (global) token unused (-1, weight 0);
    ``first_token`` is the global index of ``x[0]``.
    """
    scores = torch.softmax(x @ gate.t(), dim=-1)
    if mode == "skewed":
        idx = torch.arange(topk).expand(x.shape[0], topk).contiguous()
    else:
        idx = scores.topk(topk, dim=-1).indices
    weights = scores.gather(1, idx)
    if mode == "holes" and topk > 1:
        idx = idx.clone()
        idx[(first_token % 2)::2, -1] = -1
        weights = torch.where(idx >= 0, weights, torch.zeros_like(weights))
    return idx, weights.float()
