"""DualPipe and DualPipeV on CPU processes, checked against an unpipelined run.

Spawns ``--ranks`` processes that talk over gloo, builds a small residual-MLP model,
runs ``--steps`` training steps with each schedule, and checks every step against the
same stages run one after another in one process: losses must be bitwise equal and every
parameter gradient must satisfy 1 - cos < 1e-12 (float64). Exits non-zero on a mismatch.

    python examples/dualpipe_demo.py --ranks 4 --chunks 8 --schedule both --steps 3
"""
from __future__ import annotations

import argparse
import copy
import os
import socket
import statistics
import sys
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from dualpipe_ext import DualPipe, DualPipeV, RuntimeConfig, set_p2p_tensor_dtype, set_p2p_tensor_shapes
from dualpipe_ext.runtime.reference import grad_cos_diff, sequential_step

HIDDEN = 32
TOKENS_PER_MICRO_BATCH = 4
DTYPE = torch.float64


class Block(nn.Module):
    """x + W2 gelu(W1 layernorm(x))."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.up = nn.Linear(hidden, 2 * hidden)
        self.down = nn.Linear(2 * hidden, hidden)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))


def criterion(out, target):
    return F.mse_loss(out, target)


def run_schedule(schedule: str, rank: int, world: int, chunks: int, steps: int) -> dict:
    """Train ``steps`` steps with one schedule; compare each with the sequential reference."""
    torch.manual_seed(0)
    if schedule == "dualpipe":
        # Two independent pipelines of `world` stages, one per direction.
        fwd = [Block(HIDDEN).to(DTYPE) for _ in range(world)]
        rev = [Block(HIDDEN).to(DTYPE) for _ in range(world)]
        refs = [(fwd, 0, world - 1), (rev, world - 1, 0)]  # (stages, feeding rank, loss rank)
        pairs = [fwd[rank], rev[world - 1 - rank]]
        mbs = chunks // 2
    else:
        full = [Block(HIDDEN).to(DTYPE) for _ in range(2 * world)]
        refs = [(full, 0, 0)]
        pairs = [full[rank], full[2 * world - 1 - rank]]
        mbs = chunks
    local = [copy.deepcopy(m) for m in pairs]
    pipe = (DualPipe if schedule == "dualpipe" else DualPipeV)(local, config=RuntimeConfig(comm_timeout_s=30))
    set_p2p_tensor_shapes([(TOKENS_PER_MICRO_BATCH, HIDDEN)])
    set_p2p_tensor_dtype(DTYPE)

    failures, times = [], []
    for step in range(steps):
        gen = torch.Generator().manual_seed(100 + step)
        data = [(torch.randn(mbs * TOKENS_PER_MICRO_BATCH, HIDDEN, generator=gen, dtype=DTYPE),
                 torch.randn(mbs * TOKENS_PER_MICRO_BATCH, HIDDEN, generator=gen, dtype=DTYPE)) for _ in refs]
        inputs, labels = [], []
        for (_, feed, loss_rank), (x, y) in zip(refs, data):
            if rank == feed:
                inputs = [x]
            if rank == loss_rank:
                labels = [y]
        for m in local + [s for stages, _, _ in refs for s in stages]:
            m.zero_grad(set_to_none=True)

        dist.barrier()
        t0 = time.perf_counter()
        loss, _ = pipe.step(*inputs, num_chunks=chunks, criterion=criterion if labels else None, labels=labels)
        times.append(time.perf_counter() - t0)

        for (stages, _, loss_rank), (x, y) in zip(refs, data):
            ref_loss, _ = sequential_step(stages, [x], mbs, criterion, [y])
            if rank == loss_rank and not torch.equal(loss, ref_loss):
                failures.append(f"step {step}: loss {loss.tolist()} != reference {ref_loss.tolist()}")
        for i, (mine, ref) in enumerate(zip(local, pairs)):
            for (name, p), q in zip(mine.named_parameters(), ref.parameters()):
                d = grad_cos_diff(p.grad, q.grad)
                if not d < 1e-12:
                    failures.append(f"step {step}: module{i}.{name} gradient 1 - cos = {d:.3g}")
    return {"failures": failures, "step_s": times}


def worker(rank: int, world: int, port: int, args, queue) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=60))
        schedules = ["dualpipe", "dualpipev"] if args.schedule == "both" else [args.schedule]
        out = {}
        for s in schedules:
            if s == "dualpipe" and world % 2:
                out[s] = {"skipped": f"DualPipe needs an even number of ranks, got {world}"}
                continue
            out[s] = run_schedule(s, rank, world, args.chunks, args.steps)
        queue.put((rank, out))
        dist.barrier()
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - reported by the parent
        queue.put((rank, {"error": traceback.format_exc()}))


def main() -> int:
    p = argparse.ArgumentParser(description="DualPipe/DualPipeV on CPU processes, checked against a sequential run")
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--schedule", choices=["dualpipe", "dualpipev", "both"], default="both")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds before unfinished ranks are killed")
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, args.ranks, port, args, queue), daemon=True)
             for r in range(args.ranks)]
    for pr in procs:
        pr.start()
    results, deadline = {}, time.monotonic() + args.timeout
    while len(results) < args.ranks and time.monotonic() < deadline:
        try:
            rank, out = queue.get(timeout=max(0.1, deadline - time.monotonic()))
        except Exception:  # noqa: BLE001 - queue.Empty
            break
        results[rank] = out
    for pr in procs:
        pr.join(timeout=10)
        if pr.is_alive():
            pr.kill()
    missing = [r for r in range(args.ranks) if r not in results]
    if missing:
        print(f"FAIL: ranks {missing} did not finish within {args.timeout:g} s")
        return 1
    ok = True
    for r, out in sorted(results.items()):
        if "error" in out:
            print(f"FAIL: rank {r} raised:\n{out['error']}")
            ok = False
    if not ok:
        return 1
    for s in results[0]:
        if "skipped" in results[0][s]:
            print(f"{s}: skipped ({results[0][s]['skipped']})")
            continue
        failures = [f"rank {r}: {f}" for r in range(args.ranks) for f in results[r][s]["failures"]]
        step_ms = [max(results[r][s]["step_s"][i] for r in range(args.ranks)) * 1e3 for i in range(args.steps)]
        print(f"{s}: {args.ranks} ranks, {args.chunks} micro-batches, {args.steps} steps, hidden {HIDDEN}, float64, "
              f"gloo on CPU; step time median {statistics.median(step_ms):.1f} ms (first {step_ms[0]:.1f} ms)")
        if failures:
            ok = False
            print(f"  FAIL: {len(failures)} mismatches against the sequential reference:")
            for f in failures[:20]:
                print("   ", f)
        else:
            print("  losses bitwise equal to the sequential reference; every gradient 1 - cos < 1e-12: OK")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
