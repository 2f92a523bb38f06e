"""An MoE transformer trained with DualPipe (PP = 2) and expert parallelism (EP = 2) on four CPU processes.

Layout (global rank g = 2 * replica + pipeline rank)::

    pipeline groups (DualPipe, PP = 2):  {0, 1}  {2, 3}     two data-parallel replicas
    expert groups   (all-to-all, EP = 2): {0, 2}  {1, 3}     the same pipeline rank of both replicas

The model is two pipeline stages of ``--layers`` MoE transformer blocks each (pre-norm causal
attention, then an MoE MLP with ``EXPERTS`` routed experts, top-``TOPK``, one shared expert).
As in DeepSeek-V3, DualPipe feeds the model from both ends: pipeline rank ``p`` holds stage
``p`` for the forward direction (module0) and a copy of stage ``1 - p`` for the reverse one
(module1). Expert parallelism runs across the replicas: the two ranks of an expert group hold
the same stages and each keeps half of every MoE layer's routed experts, so each token goes
by all-to-all to the replica holding its experts and back. Both ranks of an expert group run
the same DualPipe schedule, so they reach every all-to-all in the same order. The stages are
``OverlappedMoEStage``: every forward+backward pair of the schedule runs through the overlap
engine, each all-to-all of one micro-batch in flight while the other micro-batch computes.

Weights: a stage's attention, router, norms and shared expert are replicated on all four
ranks; expert shard ``e`` of a stage on the two ranks of replica ``e``. After each step the
gradients of the copies are summed (all-reduce over all ranks, resp. over the pipeline group)
and divided by the number of micro-batches over both replicas, so every copy takes the same
AdamW step on the mean loss and the copies stay identical.

Task: regress a fixed random teacher, ``y = tanh(x A) B`` per token, on fresh random inputs
every step. Printed per step: the mean loss over all micro-batches and the step time (slowest
rank; pipeline step, gradient all-reduce and optimizer). The check: the first step is also run
with plain ``MoEStage`` stages (the same components, a pair running forward then backward)
from the same weights on the same data; every micro-batch loss must be bitwise equal and every
local gradient must satisfy 1 - cos < 1e-12 (float64), or the script exits non-zero.

    python examples/moe_dualpipe_demo.py --steps 6 --layers 2 --hidden 32 --chunks 8
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.distributed as dist

from dualpipe_ext import DualPipe, RuntimeConfig, set_p2p_tensor_dtype, set_p2p_tensor_shapes
from dualpipe_ext.moe import MoEConfig
from dualpipe_ext.overlap import BlockConfig, MoEStage, OverlappedMoEStage
from dualpipe_ext.launch import LaunchError, run_ranks
from dualpipe_ext.runtime.reference import grad_cos_diff

PP, EP = 2, 2
WORLD = PP * EP
EXPERTS, TOPK, HEADS = 4, 2, 2
BATCH, SEQ = 2, 8  # one micro-batch: [BATCH, SEQ, hidden]
DTYPE = torch.float64
LR = 1e-2


def criterion(out, target):
    return (out - target).pow(2).mean()


def build_stage(cls, stage: int, args, ep_group, ep_rank: int):
    """Stage ``stage`` of the model: the same weights on every rank, except the routed experts,
    of which this rank holds shard ``ep_rank``."""
    cfg = BlockConfig(MoEConfig(hidden=args.hidden, moe_intermediate=args.hidden, num_experts=EXPERTS, topk=TOPK,
                                num_shared_experts=1), num_heads=HEADS)
    torch.manual_seed(1000 + stage)
    module = cls(cfg, args.layers, ep_group, dtype=DTYPE)
    for layer, block in enumerate(module.blocks):
        experts = block.moe.experts
        gen = torch.Generator().manual_seed(5000 + 100 * stage + 10 * layer + ep_rank)
        with torch.no_grad():
            for p, fan_in in ((experts.gate_up, experts.hidden), (experts.down, experts.intermediate)):
                p.copy_((torch.rand(p.shape, generator=gen, dtype=DTYPE) * 2 - 1) * fan_in ** -0.5)
    return module


def teacher(x: torch.Tensor, hidden: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    a = torch.randn(hidden, hidden, generator=gen, dtype=DTYPE) * hidden ** -0.5
    b = torch.randn(hidden, hidden, generator=gen, dtype=DTYPE) * hidden ** -0.5
    return torch.tanh(x @ a) @ b


def batch(step: int, replica: int, direction: int, args):
    """(inputs, targets) that replica ``replica`` feeds in ``direction`` (0: from pipeline rank 0)."""
    gen = torch.Generator().manual_seed(10_000 * step + 10 * replica + direction)
    x = torch.randn(args.chunks // 2 * BATCH, SEQ, args.hidden, generator=gen, dtype=DTYPE)
    return x, teacher(x, args.hidden)


def step_args(step: int, replica: int, pp_rank: int, args):
    """DualPipe.step's inputs and labels on pipeline rank ``pp_rank``: it feeds direction
    ``pp_rank`` and computes the loss of the other direction."""
    x, _ = batch(step, replica, pp_rank, args)
    _, y = batch(step, replica, 1 - pp_rank, args)
    return [x], [y]


def is_expert(name: str) -> bool:
    return ".moe.experts." in name


def sync_grads(stages, world_group, pp_group, scale: float) -> None:
    """Sum the gradients of every copy of each weight, then scale: replicated weights over all
    ranks, expert shards over the pipeline group (the ranks holding the same shard)."""
    for expert in (False, True):
        grads = [p.grad for m in stages for n, p in m.named_parameters() if is_expert(n) == expert]
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat, group=pp_group if expert else world_group)
        flat.mul_(scale)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def copies_differ(stages, world_group, pp_group) -> bool:
    """Whether the copies of some weight differ between the ranks holding it."""
    differ = False
    for expert in (False, True):
        flat = torch.cat([p.detach().flatten() for m in stages for n, p in m.named_parameters() if is_expert(n) == expert])
        hi, lo = flat.clone(), flat.clone()
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=pp_group if expert else world_group)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=pp_group if expert else world_group)
        differ |= not torch.equal(hi, lo)
    return differ


def make_pipe(cls, args, pp_group, ep_group, pp_rank: int, ep_rank: int):
    stages = [build_stage(cls, s, args, ep_group, ep_rank) for s in range(PP)]
    local = (stages[pp_rank], stages[1 - pp_rank])  # module0: stage p forward; module1: stage 1-p reverse
    return DualPipe(local, process_group=pp_group, config=RuntimeConfig(comm_timeout_s=30.0)), stages


def run(rank: int, args) -> dict:
    replica, pp_rank = divmod(rank, PP)
    ep_rank = replica
    # every rank creates every group, in the same order
    pp_groups = [dist.new_group([r * PP + p for p in range(PP)]) for r in range(EP)]
    ep_groups = [dist.new_group([r * PP + p for r in range(EP)]) for p in range(PP)]
    pp_group, ep_group = pp_groups[replica], ep_groups[pp_rank]
    world_group = dist.group.WORLD
    set_p2p_tensor_shapes([(BATCH, SEQ, args.hidden)])
    set_p2p_tensor_dtype(DTYPE)

    over, over_stages = make_pipe(OverlappedMoEStage, args, pp_group, ep_group, pp_rank, ep_rank)
    plain, _ = make_pipe(MoEStage, args, pp_group, ep_group, pp_rank, ep_rank)
    opt = torch.optim.AdamW(over.parameters(), lr=LR, weight_decay=0.0)
    n_micro = args.chunks * EP  # micro-batches of one step over both replicas

    # the check: first step with the plain stages, same weights, same data
    failures = []
    inputs, labels = step_args(0, replica, pp_rank, args)
    loss_plain, _ = plain.step(*inputs, num_chunks=args.chunks, criterion=criterion, labels=labels)
    bitwise_grads = n_grads = 0

    losses, times = [], []
    for step in range(args.steps):
        inputs, labels = step_args(step, replica, pp_rank, args)
        opt.zero_grad(set_to_none=True)
        dist.barrier()
        t0 = time.perf_counter()
        loss, _ = over.step(*inputs, num_chunks=args.chunks, criterion=criterion, labels=labels)
        t_pipe = time.perf_counter() - t0
        if step == 0:
            if not torch.equal(loss, loss_plain):
                failures.append(f"micro-batch losses {loss.tolist()} != plain {loss_plain.tolist()}")
            for (name, p), q in zip(over.named_parameters(), plain.parameters()):
                n_grads += 1
                bitwise_grads += int(torch.equal(p.grad, q.grad))
                d = grad_cos_diff(p.grad, q.grad)
                if not d < 1e-12:
                    failures.append(f"{name}.grad: 1 - 2xy/(x²+y²) = {d:.3g}")
            if over.executor.num_overlapped_calls == 0:
                failures.append("no forward+backward pair ran through the overlap engine")
        t1 = time.perf_counter()
        sync_grads(over_stages, world_group, pp_group, 1.0 / n_micro)
        opt.step()
        times.append(t_pipe + time.perf_counter() - t1)
        total = torch.stack([loss.detach().sum(), torch.tensor(float(loss.numel()), dtype=DTYPE)])
        dist.all_reduce(total)
        losses.append(float(total[0] / total[1]))
    if copies_differ(over_stages, world_group, pp_group):
        failures.append(f"the copies of the weights differ after {args.steps} steps")
    return {"failures": failures, "losses": losses, "step_s": times, "pairs": over.executor.num_overlapped_calls,
            "bitwise_grads": bitwise_grads, "grads": n_grads}


def worker(rank: int, world: int, args) -> dict:
    return run(rank, args)


def main() -> int:
    p = argparse.ArgumentParser(description="An MoE transformer with DualPipe (PP=2) x expert parallelism (EP=2) "
                                            "on four CPU processes, overlap engine checked against plain stages")
    p.add_argument("--steps", type=int, default=6, help="training steps (default 6)")
    p.add_argument("--layers", type=int, default=2, help="MoE blocks per pipeline stage (default 2)")
    p.add_argument("--hidden", type=int, default=32, help="model width (default 32)")
    p.add_argument("--chunks", type=int, default=8, help="micro-batches per DualPipe step (default 8)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds before unfinished ranks are killed")
    args = p.parse_args()
    if args.steps < 1 or args.layers < 1:
        p.error("--steps and --layers must be positive")
    if args.hidden < HEADS or args.hidden % HEADS:
        p.error(f"--hidden must be a positive multiple of {HEADS}")
    if args.chunks < 2 * PP or args.chunks % 2:
        p.error(f"--chunks must be even and at least {2 * PP}")
    t_start = time.perf_counter()
    try:
        results = run_ranks(worker, WORLD, args, timeout_s=args.timeout)
    except LaunchError as e:
        print(f"FAIL: {e}")
        return 1

    r0 = results[0]
    print(f"MoE transformer: 2 stages x {args.layers} blocks, hidden {args.hidden}, {EXPERTS} experts top-{TOPK} "
          f"+ 1 shared, float64; DualPipe PP={PP} x EP={EP} on {WORLD} gloo CPU processes, "
          f"{args.chunks} micro-batches per pipeline, AdamW lr {LR:g}")
    print(f"pipeline groups {{0,1}} {{2,3}}; expert groups {{0,2}} {{1,3}}; "
          f"{r0['pairs'] // args.steps} forward+backward pairs through the overlap engine per rank and step")
    for i, loss in enumerate(r0["losses"]):
        ms = max(results[r]["step_s"][i] for r in range(WORLD)) * 1e3
        print(f"step {i}: loss {loss:.6f}  time {ms:.1f} ms")
    step_ms = [max(results[r]["step_s"][i] for r in range(WORLD)) * 1e3 for i in range(args.steps)]
    print(f"median step {statistics.median(step_ms):.1f} ms; wall {time.perf_counter() - t_start:.1f} s")
    failures = [f"rank {r}: {f}" for r in range(WORLD) for f in results[r]["failures"]]
    if failures:
        print(f"check FAIL: first step, overlapped vs plain MoEStage: {len(failures)} mismatches")
        for f in failures[:20]:
            print("   ", f)
        return 1
    bitwise = sum(results[r]["bitwise_grads"] for r in range(WORLD))
    grads = sum(results[r]["grads"] for r in range(WORLD))
    print(f"check OK: first step, overlapped vs plain MoEStage: losses bitwise equal, every gradient "
          f"1 - cos < 1e-12 ({bitwise}/{grads} bitwise equal); "
          f"weight copies identical on all ranks after {args.steps} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
