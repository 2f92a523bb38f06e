"""``python -m dualpipe_ext.demo`` (also ``dualpipe-ext demo``): the main job.

Trains a small DeepSeek-V3-style MoE language model (the transformers DeepseekV3
architecture from a tiny config, every layer MoE unless ``--dense-layers``, its blocks swapped
for dualpipe_ext's MoE)
with DualPipe across the pipeline ranks and expert parallelism across replicas, on byte-level
tokens of the Python standard library's own sources. By default: PP=2 x EP=2 on 4 CPU
processes over gloo; ``--device cuda`` uses NCCL and one GPU per rank; started by ``torchrun``
(``RANK``/``WORLD_SIZE`` set) it runs the rank it was given, on any number of nodes.

Prints per step the loss, tokens per second and the time the slowest rank waited on
communication; at the end the held-out loss, and whether the first step matched the
untouched transformers model run in one process on the same global batch (no pipeline, no
overlap, no expert parallelism). Exits non-zero when it did not, or when the loss did not fall.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import List, Optional

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dualpipe_ext.demo", description=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python -m dualpipe_ext.demo                       # PP=2 x EP=2 on 4 CPU processes\n"
               "  python -m dualpipe_ext.demo --schedule dualpipev --pp 1 --ep 1 --device cuda\n"
               "  torchrun --nproc-per-node 4 -m dualpipe_ext.demo  # one process per rank, any number of nodes\n"
               "  torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\\n"
               "      -m dualpipe_ext.demo --ep-nodes 2             # expert parallelism across two nodes")
    a = p.add_argument
    a("--steps", type=int, default=40, help="training steps (default 40)")
    a("--layers", type=int, default=4, help="decoder layers of the model (default 4)")
    a("--dense-layers", type=int, default=0,
      help="how many of the first layers are dense, as DeepSeek-V3's first_k_dense_replace (default 0)")
    a("--hidden", type=int, default=64, help="model width (default 64)")
    a("--seq", type=int, default=64, help="tokens per sequence (default 64)")
    a("--micro-batch", type=int, default=2, help="sequences per micro-batch (default 2)")
    a("--chunks", type=int, default=8, help="micro-batches per pipeline and step (default 8)")
    a("--experts", type=int, default=8, help="routed experts per layer (default 8)")
    a("--topk", type=int, default=2, help="experts per token (default 2)")
    a("--schedule", choices=("dualpipe", "dualpipev"), default="dualpipe",
      help="DualPipe (two stages per rank, both directions) or DualPipeV (the V-shaped half) (default dualpipe)")
    a("--pp", type=int, default=2, help="pipeline ranks per replica (default 2)")
    a("--ep", type=int, default=2, help="expert-parallel degree = replicas (default 2)")
    a("--ep-path", choices=("collective", "buffer"), default="collective",
      help="all_to_all (collective) or the device-side EPBuffer (buffer)")
    a("--ep-nodes", type=int, default=0,
      help="nodes the expert-parallel group spans, dispatched hierarchically (once per token and node between "
           "nodes, then inside the node); without torchrun the nodes are simulated, under torchrun they must be "
           "the launch's (default 0: flat dispatch)")
    a("--no-overlap", action="store_true", help="run every forward+backward pair one after the other")
    a("--fp8-dispatch", action="store_true",
      help="dispatch tokens as FP8 (e4m3, a scale per 1x128 group; combine and gradients unquantized)")
    a("--two-batch", action="store_true", help="split every chunk into two halves that overlap each other")
    a("--lr", type=float, default=3e-3, help="AdamW learning rate (default 3e-3)")
    a("--eval-batches", type=int, default=4, help="held-out steps at the end (default 4)")
    a("--device", choices=("cpu", "cuda"), default="cpu",
      help="cpu: gloo processes; cuda: NCCL, one GPU per rank (default cpu)")
    a("--no-check", action="store_true", help="skip the first step's check against the unpipelined model")
    a("--timeout", type=float, default=300.0, help="seconds a rank waits for a peer (default 300)")
    a("--seed", type=int, default=0, help="seed of the weights and the data order (default 0)")
    a("--json", metavar="PATH", help="also write the run's figures (losses, tokens/s, exposed time, check) as JSON")
    a("--save", metavar="DIR", help="save a checkpoint under DIR every --save-every steps and at the end")
    a("--save-every", type=int, default=0, metavar="N", help="steps between checkpoints (default 0: at the end only)")
    a("--resume", metavar="DIR", help="continue from the latest checkpoint under DIR (any --pp/--ep)")
    return p


def _job(args):
    from .lm import LMConfig
    from .train import JobConfig

    lm = LMConfig(hidden=args.hidden, layers=args.layers, heads=4 if args.hidden % 4 == 0 else 1,
                  experts=args.experts, topk=args.topk, groups=2 if args.experts % 2 == 0 else 1,
                  topk_groups=1, moe_intermediate=args.hidden, seq=args.seq, dense_layers=args.dense_layers,
                  seed=args.seed)
    return JobConfig(lm=lm, schedule=args.schedule, pp=args.pp, ep=args.ep, ep_path=args.ep_path,
                     overlap=not args.no_overlap, two_batch=args.two_batch, steps=args.steps, chunks=args.chunks,
                     micro_batch=args.micro_batch, lr=args.lr, eval_batches=args.eval_batches, device=args.device,
                     check=not args.no_check, timeout_s=args.timeout, fp8_dispatch=args.fp8_dispatch,
                     ep_nodes=args.ep_nodes, save=args.save, save_every=args.save_every, resume=args.resume,
                     ep_ranks_per_node=args.ep // args.ep_nodes if args.ep_nodes and not _torchrun() else None)


def _check_args(p: argparse.ArgumentParser, args) -> None:
    if args.save_every < 0 or (args.save_every and not args.save):
        p.error("--save-every N takes N >= 0 and needs --save DIR")
    if args.resume:
        from dualpipe_ext.checkpoint import CheckpointError, resolve

        from .checkpointing import check_resume

        try:
            check_resume(resolve(args.resume), _job(args))
        except CheckpointError as e:
            p.error(str(e))
    stages = args.pp if args.schedule == "dualpipe" else 2 * args.pp
    if min(args.steps, args.layers, args.hidden, args.seq, args.micro_batch, args.chunks, args.pp, args.ep,
           args.experts, args.topk) < 1 or args.eval_batches < 0 or not args.lr > 0 or not args.timeout > 0:
        p.error("--steps, --layers, --hidden, --seq, --micro-batch, --chunks, --pp, --ep, --experts, --topk, --lr and "
                "--timeout must be positive, --eval-batches at least 0")
    if args.schedule == "dualpipe" and args.pp % 2:
        p.error(f"--pp must be even for DualPipe (got {args.pp}); DualPipeV runs on any number of ranks")
    if args.layers < stages:
        p.error(f"--layers ({args.layers}) must be at least the number of stages ({stages} for {args.schedule} "
                f"with --pp {args.pp})")
    first_stage = -(-args.layers // stages)  # layers of stage 0 (split_layers: the earlier stages take more)
    if not 0 <= args.dense_layers < first_stage:
        p.error(f"--dense-layers must be at least 0 and leave stage 0 an MoE layer: below {first_stage} (stage 0 "
                f"has {first_stage} of the {args.layers} layers), got {args.dense_layers}")
    if args.experts % args.ep or args.topk > args.experts:
        p.error(f"--experts ({args.experts}) must be a multiple of --ep ({args.ep}) and at least --topk ({args.topk})")
    if args.ep_nodes < 0 or (args.ep_nodes and args.ep % args.ep_nodes):
        p.error(f"--ep-nodes must divide --ep: the expert-parallel group's {args.ep} ranks do not split into "
                f"{args.ep_nodes} nodes of equal size")
    if args.ep_nodes and args.ep_path == "buffer":
        p.error("--ep-nodes runs on the collective path (--ep-path collective)")
    if args.ep_nodes and _torchrun():
        local = os.environ.get("LOCAL_WORLD_SIZE")
        world = int(os.environ["WORLD_SIZE"])
        nodes = world // int(local) if local and local.isdigit() and int(local) > 0 else 1
        if not local or world % int(local) or nodes != args.ep_nodes:
            p.error(f"--ep-nodes {args.ep_nodes} does not match the launch: {world} processes with "
                    f"LOCAL_WORLD_SIZE={local} are {nodes} node(s)")
    if args.schedule == "dualpipe" and args.chunks % 2:
        p.error(f"--chunks must be even for DualPipe, got {args.chunks}")
    from dualpipe_ext.schedules import get_plan

    try:  # the planner knows every other constraint on ranks and chunks
        get_plan(args.schedule, args.pp, args.chunks)
    except ValueError as e:
        p.error(f"--schedule {args.schedule} --pp {args.pp} --chunks {args.chunks}: {e}")
    if args.fp8_dispatch and args.ep_nodes:
        p.error("--fp8-dispatch runs on the flat collective path; it does not combine with --ep-nodes yet")


def _torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "DUALPIPE_EXT_SPAWNED" not in os.environ


def _report(job, results: List[dict], wall_s: float, json_path: Optional[str] = None) -> int:
    r0 = results[0]
    steps = len(r0["losses"])
    dense = f" ({job.lm.dense_layers} dense)" if job.lm.dense_layers else ""
    print(f"\nDeepSeek-V3-style MoE LM: {job.lm.layers} layers{dense}, hidden {job.lm.hidden}, {job.lm.experts} experts "
          f"top-{job.lm.topk} + 1 shared, byte-level vocabulary {job.lm.vocab}, seq {job.lm.seq}, float32; "
          f"{job.schedule} PP={job.pp} x EP={job.ep} ({job.ep_path} path) on {job.pp * job.ep} {job.device} "
          f"processes, {job.chunks} micro-batches of {job.micro_batch} per pipeline, overlap "
          f"{'on' if job.overlap else 'off'}{' + two-batch' if job.two_batch else ''}, "
          f"{r0['pairs'] // max(1, steps)} overlapped pairs per rank and step")
    step_s = r0["step_s"][1:] or r0["step_s"]
    exposed = r0["exposed_ms"][1:] or r0["exposed_ms"]
    print(f"loss {r0['losses'][0]:.4f} -> {r0['losses'][-1]:.4f}; held-out loss {r0['held_out']:.4f}; median step "
          f"{statistics.median(step_s) * 1e3:.0f} ms, {r0['tokens_per_step'] / statistics.median(step_s):,.0f} "
          f"tokens/s, communication exposed {statistics.median(exposed):.1f} ms per step; wall {wall_s:.1f} s")
    if r0.get("off_node"):
        inter = [r[0] for r in r0["off_node"]]
        flat = [r[1] for r in r0["off_node"]]
        how = "simulated on this host" if job.ep_ranks_per_node else "of the launch"
        print(f"hierarchical dispatch over {job.ep_nodes} nodes ({how}): {statistics.median(inter):,.0f} dispatch rows "
              f"per step left their node (flat path: {statistics.median(flat):,.0f}, "
              f"{statistics.median(flat) / max(1, statistics.median(inter)):.2f}x); combine sends as many back")
    rss = r0["resident_mb"]
    if len(rss) > 20:
        print(f"resident memory of the largest rank: {rss[19]:.0f} MiB after step 20, {rss[-1]:.0f} MiB after step "
              f"{len(rss)} ({(rss[-1] / rss[19] - 1) * 100:+.1f} %)")
    if r0.get("dispatch_bytes"):
        print(_bytes_line(job, r0))
    ckpt = r0.get("checkpoint") or {}
    if job.save or job.resume:
        print(f"losses from step {r0['first_step']}: {r0['losses']!r}")
    if "loaded" in ckpt:
        print(f"checkpoint: resumed from {ckpt['loaded']} at step {r0['first_step']} (load {ckpt['load_s']:.2f} s)")
    if "saved" in ckpt:
        print(f"checkpoint: saved {ckpt['saved']} ({ckpt['save_bytes'] / 2 ** 20:.2f} MiB, last save "
              f"{ckpt['save_s']:.2f} s)")
    ok = True
    if job.check and "check" in r0:
        mismatches = [f"rank {r}: {m}" for r, res in enumerate(results) for m in res["check"]["mismatches"]]
        worst = max(res["check"]["worst"] for res in results)
        compared = sum(res["check"]["compared"] for res in results)
        if mismatches:
            ok = False
            fp8 = ", FP8 dispatch rounding in both" if job.fp8_dispatch else ""
            print(f"first step vs the unpipelined model{fp8}: MISMATCH ({len(mismatches)} of {compared} gradients or the "
                  f"loss)")
            for m in mismatches[:10]:
                print("   ", m)
        else:
            fp8 = ", FP8 dispatch rounding in both" if job.fp8_dispatch else ""
            print(f"first step vs the unpipelined model{fp8}: matched (mean loss {r0['check']['ref_loss']:.6f}; {compared} "
                  f"gradients, worst 1 - 2xy/(x²+y²) = {worst:.2g})")
    if any(res["copies_differ"] for res in results):
        ok = False
        print("the copies of the weights differ between the ranks holding them")
    head = statistics.mean(r0["losses"][:2])
    tail = statistics.mean(r0["losses"][-2:])
    if steps >= 4 and not tail < head - 0.1:
        ok = False
        print(f"the loss did not fall (first steps {head:.4f}, last steps {tail:.4f})")
    if json_path:
        figures = {"ok": ok, "losses": r0["losses"], "held_out": r0["held_out"], "wall_s": wall_s,
                   "median_step_s": statistics.median(step_s),
                   "tokens_per_s": r0["tokens_per_step"] / statistics.median(step_s),
                   "exposed_ms": statistics.median(exposed), "device": job.device, "schedule": job.schedule,
                   "pp": job.pp, "ep": job.ep, "ep_path": job.ep_path, "overlap": job.overlap,
                   "check_matched": (not any(res["check"]["mismatches"] for res in results)) if job.check else None}
        with open(json_path, "w") as f:
            json.dump(figures, f, indent=1)
    return 0 if ok else 1


def _bytes_line(job, r0) -> str:
    """Bytes of the dispatches per step and per row, against float32 and bfloat16 rows."""
    row = r0["dispatch_row_bytes"]
    h = job.lm.hidden
    per_step = statistics.median(r0["dispatch_bytes"])
    form = "e4m3 + float32 scale per 128 columns" if job.fp8_dispatch else "float32"
    return (f"dispatch: {per_step / 2 ** 20:.2f} MiB per step, {row} B per token row ({form}; "
            f"{row / (4 * h):.2f}x float32 rows, {row / (2 * h):.2f}x bfloat16 rows)")


def main(argv: Optional[List[str]] = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    _check_args(p, args)
    job = _job(args)
    if args.ep_path == "buffer" and args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # EPBuffer's kernels in Triton's interpreter on CPU
    world = args.pp * args.ep
    start = time.perf_counter()
    if _torchrun():
        return _under_torchrun(job, world, start, args.json)
    from dualpipe_ext.launch import LaunchError, run_ranks

    from .train import run_rank

    os.environ["DUALPIPE_EXT_SPAWNED"] = "1"
    try:
        results = run_ranks(run_rank, world, job, timeout_s=max(600.0, 30.0 * args.steps),
                            backend="nccl" if args.device == "cuda" else "gloo",
                            preload=["transformers.models.deepseek_v3.modeling_deepseek_v3"])
    except LaunchError as e:
        print(f"the job failed: {e}", file=sys.stderr)
        return 1
    return _report(job, results, time.perf_counter() - start, args.json)


def _under_torchrun(job, world: int, start: float, json_path: Optional[str]) -> int:
    import torch.distributed as dist

    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if size != world:
        print(f"torchrun started {size} processes, the job needs --pp x --ep = {world}", file=sys.stderr)
        return 2
    dist.init_process_group("nccl" if job.device == "cuda" else "gloo")
    from .train import run_rank

    mine = run_rank(rank, world, job)
    results = [None] * world
    dist.all_gather_object(results, mine)
    dist.destroy_process_group()
    return _report(job, results, time.perf_counter() - start, json_path) if rank == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
