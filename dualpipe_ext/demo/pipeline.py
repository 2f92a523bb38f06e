"""DualPipe and DualPipeV on CPU processes, checked against an unpipelined run.

Spawns ``--ranks`` processes that talk over gloo, builds a small residual-MLP model,
runs ``--steps`` training steps with each schedule, and checks every step against the
same stages run one after another in one process: losses must be bitwise equal and every
parameter gradient must satisfy 1 - cos < 1e-12 (float64). Exits non-zero on a mismatch.

    python -m dualpipe_ext.demo.pipeline --ranks 4 --chunks 8 --schedule both --steps 3

With ``--timeline FILE.svg`` (or ``.png``, ``.pdf``) every step is recorded with the
runtime's recorder, the ranks' records come back to the launching process, and the last
step is drawn as a measured timeline (the picture of ``dualpipe-ext schedule``, in ms).
``--record DIR`` writes each rank's records as ``DIR/rank{r}.json`` for
``dualpipe-ext trace DIR/rank*.json --chrome trace.json --svg measured.svg --predict``.
With ``--schedule both`` each schedule gets its own files: ``FILE-dualpipe.svg``,
``DIR/dualpipe/rank{r}.json`` and so on. ``--hidden`` and ``--tokens`` size the model and
the micro-batches (the default is tiny, so a step is mostly communication).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from dualpipe_ext import DualPipe, DualPipeV, RuntimeConfig, set_p2p_tensor_dtype, set_p2p_tensor_shapes
from dualpipe_ext.launch import LaunchError, run_ranks
from dualpipe_ext.demo.reference import grad_cos_diff, sequential_step
from dualpipe_ext.viz.render import FORMATS

HIDDEN = 256
TOKENS_PER_MICRO_BATCH = 64
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


def run_schedule(schedule: str, rank: int, world: int, chunks: int, steps: int, hidden: int = HIDDEN,
                 tokens: int = TOKENS_PER_MICRO_BATCH, record: bool = False) -> dict:
    """Train ``steps`` steps with one schedule; compare each with the sequential reference.

    With ``record`` the result holds this rank's records (``Recorder.to_dict()``) under "record".
    """
    torch.manual_seed(0)
    if schedule == "dualpipe":
        # Two independent pipelines of `world` stages, one per direction.
        fwd = [Block(hidden).to(DTYPE) for _ in range(world)]
        rev = [Block(hidden).to(DTYPE) for _ in range(world)]
        refs = [(fwd, 0, world - 1), (rev, world - 1, 0)]  # (stages, feeding rank, loss rank)
        pairs = [fwd[rank], rev[world - 1 - rank]]
        mbs = chunks // 2
    else:
        full = [Block(hidden).to(DTYPE) for _ in range(2 * world)]
        refs = [(full, 0, 0)]
        pairs = [full[rank], full[2 * world - 1 - rank]]
        mbs = chunks
    local = [copy.deepcopy(m) for m in pairs]
    pipe = (DualPipe if schedule == "dualpipe" else DualPipeV)(local, config=RuntimeConfig(comm_timeout_s=30, record=record))
    set_p2p_tensor_shapes([(tokens, hidden)])
    set_p2p_tensor_dtype(DTYPE)

    failures, times = [], []
    for step in range(steps):
        gen = torch.Generator().manual_seed(100 + step)
        data = [(torch.randn(mbs * tokens, hidden, generator=gen, dtype=DTYPE),
                 torch.randn(mbs * tokens, hidden, generator=gen, dtype=DTYPE)) for _ in refs]
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
                    failures.append(f"step {step}: module{i}.{name} gradient difference 1 - 2xy/(x²+y²) = {d:.3g}")
    out = {"failures": failures, "step_s": times}
    if record:
        out["record"] = pipe.timeline.to_dict()
    return out


def worker(rank: int, world: int, args) -> dict:
    """One rank: every requested schedule, by name."""
    schedules = ["dualpipe", "dualpipev"] if args.schedule == "both" else [args.schedule]
    out = {}
    for s in schedules:
        if s == "dualpipe" and world % 2:
            out[s] = {"skipped": f"DualPipe needs an even number of ranks, got {world}"}
            continue
        out[s] = run_schedule(s, rank, world, args.chunks, args.steps, args.hidden, args.tokens,
                              record=bool(args.timeline or args.record))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description="DualPipe/DualPipeV on CPU processes, checked against a sequential run")
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--schedule", choices=["dualpipe", "dualpipev", "both"], default="both")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds before unfinished ranks are killed")
    p.add_argument("--hidden", type=int, default=HIDDEN, help=f"model width (default {HIDDEN})")
    p.add_argument("--tokens", type=int, default=TOKENS_PER_MICRO_BATCH,
                   help=f"rows per micro-batch (default {TOKENS_PER_MICRO_BATCH})")
    p.add_argument("--timeline", metavar="FILE",
                   help="record the steps and draw the last one's measured timeline (.svg, .png or .pdf)")
    p.add_argument("--record", metavar="DIR", help="record the steps and write DIR/rank{r}.json per rank")
    args = p.parse_args()
    if args.timeline and os.path.splitext(args.timeline)[1].lower() not in FORMATS:
        p.error(f"--timeline {args.timeline!r}: expected a file name ending in one of {', '.join(FORMATS)}")
    if args.hidden <= 0 or args.tokens <= 0:
        p.error("--hidden and --tokens must be positive")
    try:
        results = run_ranks(worker, args.ranks, args, timeout_s=args.timeout)
    except LaunchError as e:
        print(f"FAIL: {e}")
        return 1
    ok = True
    for s in results[0]:
        if "skipped" in results[0][s]:
            print(f"{s}: skipped ({results[0][s]['skipped']})")
            continue
        failures = [f"rank {r}: {f}" for r in range(args.ranks) for f in results[r][s]["failures"]]
        step_ms = [max(results[r][s]["step_s"][i] for r in range(args.ranks)) * 1e3 for i in range(args.steps)]
        print(f"{s}: {args.ranks} ranks, {args.chunks} micro-batches, {args.steps} steps, hidden {args.hidden}, float64, "
              f"gloo on CPU; step time median {statistics.median(step_ms):.1f} ms (first {step_ms[0]:.1f} ms)")
        if failures:
            ok = False
            print(f"  FAIL: {len(failures)} mismatches against the sequential reference:")
            for f in failures[:20]:
                print("   ", f)
        else:
            print("  losses bitwise equal to the sequential reference; every gradient 1 - cos < 1e-12: OK")
        if args.timeline or args.record:
            several = sum("skipped" not in results[0][x] for x in results[0]) > 1
            write_records([results[r][s]["record"] for r in range(args.ranks)], s, args, several)
    return 0 if ok else 1


def write_records(records, schedule: str, args, several: bool) -> None:
    """Save the ranks' records (``--record``) and draw the last step (``--timeline``); print where they went."""
    from dualpipe_ext.viz import draw_run
    from dualpipe_ext.viz.records import merge_step

    if args.record:
        folder = os.path.join(args.record, schedule) if several else args.record
        os.makedirs(folder, exist_ok=True)
        for rec in records:
            with open(os.path.join(folder, f"rank{rec['rank']}.json"), "w") as f:
                json.dump(rec, f)
        pattern = os.path.join(folder, "rank*.json")
        print(f"  records: {len(records)} files {pattern} ({len(records[0]['steps'])} steps); read them with\n"
              f"    dualpipe-ext trace {pattern} --chrome trace.json --svg measured.svg --predict")
    if args.timeline:
        path = args.timeline
        if several:
            stem, ext = os.path.splitext(path)
            path = f"{stem}-{schedule}{ext}"
        run = merge_step(records)
        drawing = draw_run(run, path, title=(f"{schedule}: {run.ranks} ranks, {run.chunks} micro-batches, hidden "
                                             f"{args.hidden}; measured step {run.step}"))
        print(f"  timeline: {path} (step {run.step}, {sum(len(r) for r in drawing.rows)} compute actions, "
              f"{drawing.makespan:.1f} ms)")


if __name__ == "__main__":
    sys.exit(main())
