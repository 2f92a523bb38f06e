"""Per-rank bodies of the fault tests of DualPipe (PP=2) x expert parallelism (EP=2) on 4 ranks:
pipelines {0, 1} and {2, 3}, expert groups {0, 2} and {1, 3}, MoE stages whose pairs run through
the overlap engine, over the collective path or an EPBuffer (run by dist_harness.run_ranks)."""
from __future__ import annotations

import os
import time
from datetime import timedelta
from typing import Dict, List

import torch
import torch.distributed as dist

from dualpipe_ext import DualPipe, RuntimeConfig
from dualpipe_ext.moe import EPBuffer, MoEConfig
from dualpipe_ext.overlap import BlockConfig, OverlapConfig, OverlappedMoEStage

from fault_models import OnBackward
from fault_workers import outcome, write_pid

HIDDEN, BATCH, SEQ, CHUNKS = 8, 2, 3, 4
CFG = BlockConfig(MoEConfig(hidden=HIDDEN, moe_intermediate=8, num_experts=4, topk=2), num_heads=2)
# The expert group's collectives time out after EP_TIMEOUT_S (a silent EP peer); the pipeline waits longer.
EP_TIMEOUT_S, PIPE_TIMEOUT_S = 3.0, 60.0


def _groups(rank: int):
    """Fresh groups for one case (a failed case leaves its expert group out of step)."""
    pipes = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    experts = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    # The short timeout only once connected: new_group's connections wait for the slowest rank.
    dist.distributed_c10d._set_pg_timeout(timedelta(seconds=EP_TIMEOUT_S), experts[rank % 2])
    return pipes[rank // 2], experts[rank % 2]


def _pipeline(rank: int, path: str, pipe_group, ep_group):
    ep = None
    if path == "ep":
        ep = EPBuffer(ep_group, max_tokens=BATCH * SEQ, hidden=HIDDEN, dtype=torch.float32, max_topk=2,
                      timeout_s=EP_TIMEOUT_S)
    stages = []
    for m in (1, 2):
        torch.manual_seed(100 * m + rank % 2)
        stages.append(OverlappedMoEStage(CFG, 1, ep_group, OverlapConfig(), ep=ep))
    pipe = DualPipe(stages, process_group=pipe_group, config=RuntimeConfig(comm_timeout_s=PIPE_TIMEOUT_S),
                    p2p_shapes=[(BATCH, SEQ, HIDDEN)], p2p_dtype=torch.float32)
    g = torch.Generator().manual_seed(300 + rank)
    x = torch.randn(CHUNKS // 2 * BATCH, SEQ, HIDDEN, generator=g)
    y = torch.randn(CHUNKS // 2 * BATCH, SEQ, HIDDEN, generator=g)

    def step():
        return pipe.step(x, num_chunks=CHUNKS, criterion=lambda o, t: (o - t).pow(2).mean(), labels=[y])
    return pipe, step, ep


def _fail_in_pair(stages, how: str) -> None:
    """Make the first layer's attention of ``stages`` fail once it runs inside an overlapped pair (the
    forward half of a pair): raise, or (``how="exit"``) end the process in that attention's backward."""
    pair = OverlappedMoEStage.overlapped_forward_backward
    state = {"in_pair": False}

    def in_pair(cls, *args):
        state["in_pair"] = True
        try:
            return pair.__func__(cls, *args)
        finally:
            state["in_pair"] = False

    def failing(original):
        def attention(x, context=None):
            h, u = original(x, context)
            if state["in_pair"]:
                if how == "raise":
                    raise RuntimeError("attention exploded on purpose")
                h = OnBackward.apply(h, lambda: os._exit(17))  # as an OOM kill would, in a pair's backward
            return h, u
        return attention

    OverlappedMoEStage.overlapped_forward_backward = classmethod(in_pair)
    for stage in stages:
        stage.layers[0].attention = failing(stage.layers[0].attention)


def ep_faults(rank: int, world: int, paths: List[str], kill: bool, pid_dir: str, victim: int = 1,
              kill_path: str = "ep") -> Dict[str, Dict]:
    """For each of ``paths``: ``victim``'s attention raises inside an overlapped pair; then, with ``kill``,
    its process exits in the backward of a pair on ``kill_path`` ("ep": an EPBuffer, or "collective")."""
    write_pid(pid_dir, rank)
    out = {}
    for path in paths:
        pipe_group, ep_group = _groups(rank)
        pipe, step, ep = _pipeline(rank, path, pipe_group, ep_group)
        if rank == victim:
            _fail_in_pair(pipe.module, "raise")
        out[path] = outcome(step)
        if ep is not None:
            ep.close()
    if kill:
        pipe_group, ep_group = _groups(rank)
        pipe, step, ep = _pipeline(rank, kill_path, pipe_group, ep_group)
        if rank == victim:
            _fail_in_pair(pipe.module, "exit")
        out["kill"] = outcome(step)
        time.sleep(0.2)
    return out
