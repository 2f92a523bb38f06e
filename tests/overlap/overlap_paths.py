"""Per-rank bodies of the overlap tests over both expert-parallel paths (collective, EPBuffer),
with and without two-batch overlap of lone chunks (run by dist_harness.run_ranks)."""
from __future__ import annotations

import os
from typing import Dict, List

import torch
import torch.distributed as dist

from dualpipe_ext import DualPipe, DualPipeV, RuntimeConfig, set_p2p_tensor_dtype, set_p2p_tensor_shapes
from dualpipe_ext.moe import EPBuffer, MoEConfig
from dualpipe_ext.overlap import BlockConfig, MoEStage, OverlapConfig, OverlappedMoEStage

HIDDEN, BATCH, SEQ = 8, 2, 3
CFG = BlockConfig(MoEConfig(hidden=HIDDEN, moe_intermediate=8, num_experts=4, topk=2, num_shared_experts=1,
                            bias_update_speed=0.01), num_heads=2)


def criterion(out, target):
    return (out - target).pow(2).mean()


def _data(seed: int, n: int = 1) -> torch.Tensor:
    return torch.randn(n * BATCH, SEQ, HIDDEN, generator=torch.Generator().manual_seed(seed))


def _stage(cls, seed, layers, group, overlap, ep):
    torch.manual_seed(seed)
    return cls(CFG, layers, group, overlap, ep=ep)


def _same(a, b, what: str, failures: List[str]) -> None:
    if a is None or b is None or not torch.equal(a, b):
        failures.append(f"{what} differs" + ("" if a is None or b is None else f" (max {float((a - b).abs().max()):.3g})"))


def _buffer(group, path: str):
    if path != "ep":
        return None
    return EPBuffer(group, max_tokens=BATCH * SEQ, hidden=HIDDEN, dtype=torch.float32, max_topk=2, timeout_s=60)


def pair_equality(rank: int, world: int, layers: int) -> List[str]:
    """A lone forward, an overlapped pair, a lone backward: the engine against the plain stages,
    bit for bit, on both paths, with and without two-batch overlap."""
    failures: List[str] = []
    group = dist.new_group(list(range(world)))
    for path in ("collective", "ep"):
        ep = _buffer(group, path)
        for two_batch in (False, True):
            cfg = OverlapConfig(two_batch=two_batch)
            tag = f"{path}, two_batch={two_batch}"
            plain = [_stage(MoEStage, 10 * s + rank, layers, group, cfg, ep) for s in (1, 2)]
            over = [_stage(OverlappedMoEStage, 10 * s + rank, layers, group, cfg, ep) for s in (1, 2)]
            x0, x1, t = _data(30 + rank), _data(40 + rank), _data(50 + rank)
            results = []
            for st0, st1 in (plain, over):
                xa = x1.clone().requires_grad_()
                l1 = criterion(st1(xa), t)  # lone forward of the backward chunk
                if st0 is plain[0]:
                    o0 = st0(x0)
                    l1.backward()
                else:
                    o0, _ = OverlappedMoEStage.overlapped_forward_backward(st0, [x0], None, [], st1, l1, [], [])
                l0 = criterion(o0, t)
                l0.backward()  # lone backward of the forward chunk
                results.append((o0.detach(), l0.detach(), xa.grad, [p.grad for p in st0.parameters()],
                                [p.grad for p in st1.parameters()],
                                torch.stack([b.moe.expert_load for st in (st0, st1) for b in st.blocks])))
            (po, pl, pg, pp0, pp1, pload), (oo, ol, og, op0, op1, oload) = results
            _same(oload, pload, f"{tag}: expert load counted by the layers", failures)
            if not pload.sum() > 0:
                failures.append(f"{tag}: no expert load counted")
            _same(oo, po, f"{tag}: outputs of the pair's forward", failures)
            _same(ol, pl, f"{tag}: loss", failures)
            _same(og, pg, f"{tag}: input grad of the backward chunk", failures)
            for i, (a, b) in enumerate(zip(op0 + op1, pp0 + pp1)):
                _same(a, b, f"{tag}: parameter {i} grad", failures)
        if ep is not None:
            ep.close()
    return failures


def _groups(rank: int, world: int):
    """Pipeline groups {0, 1}, {2, 3}; expert groups {0, 2}, {1, 3} (every rank builds them all)."""
    pipes = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    experts = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    return pipes[rank // 2], experts[rank % 2]


def _pipeline_step(pipe_cls, stage_cls, cfg, pp_rank, rank, layers, chunks, pipe_group, ep_group, ep):
    """One step of a fresh pipeline from fixed seeds: (loss, parameter grads, overlapped pairs run)."""
    local = [_stage(stage_cls, 100 * m + pp_rank, layers, ep_group, cfg, ep) for m in (1, 2)]
    pipe = pipe_cls(local, process_group=pipe_group, config=RuntimeConfig(comm_timeout_s=60.0))
    n = chunks // 2 if pipe_cls is DualPipe else chunks
    first = pipe_cls is DualPipe or pp_rank == 0
    x = _data(300 + rank, n) if first else None
    y = _data(400 + rank, n) if first else None
    loss, _ = pipe.step(*([x] if x is not None else []), num_chunks=chunks, criterion=criterion,
                        labels=[y] if y is not None else [])
    return loss, [p.grad for p in pipe.parameters()], pipe.executor.num_overlapped_calls


def pipelines(rank: int, world: int, layers: int, chunks: int) -> Dict[str, List[str]]:
    """DualPipe and DualPipeV (PP=2) x expert parallelism (EP=2 over the replicas): engine against plain
    stages, losses and every gradient bit for bit, on both paths, two-batch overlap on; and the engine's
    DualPipe step run again from the same seeds on a fresh buffer gives the same bits."""
    set_p2p_tensor_shapes([(BATCH, SEQ, HIDDEN)])
    set_p2p_tensor_dtype(torch.float32)
    pipe_group, ep_group = _groups(rank, world)
    pp_rank = rank % 2
    out: Dict[str, List[str]] = {}
    cfg = OverlapConfig(two_batch=True)
    args = (cfg, pp_rank, rank, layers, chunks, pipe_group, ep_group)
    for path in ("collective", "ep"):
        ep = _buffer(ep_group, path)
        for cls_name, pipe_cls in (("DualPipe", DualPipe), ("DualPipeV", DualPipeV)):
            failures: List[str] = []
            (lp, gp, np_), (lo, go, no) = (_pipeline_step(pipe_cls, stage_cls, *args, ep)
                                           for stage_cls in (MoEStage, OverlappedMoEStage))
            if (lp is None) != (lo is None) or (lp is not None and not torch.equal(lp, lo)):
                failures.append(f"{path} {cls_name}: loss differs: {lp} vs {lo}")
            for i, (a, b) in enumerate(zip(go, gp)):
                _same(a, b, f"{path} {cls_name}: parameter {i} grad", failures)
            if no == 0 or np_ != 0:
                failures.append(f"{path} {cls_name}: overlapped pairs {no} (engine), {np_} (plain)")
            out[f"{path} {cls_name}"] = failures
            if pipe_cls is DualPipe:
                again = _buffer(ep_group, path)
                l2, g2, _ = _pipeline_step(pipe_cls, OverlappedMoEStage, *args, again)
                if again is not None:
                    again.close()
                rerun: List[str] = []
                _same(l2, lo, f"{path}: losses of two runs", rerun)
                for i, (a, b) in enumerate(zip(g2, go)):
                    _same(a, b, f"{path}: parameter {i} grad of two runs", rerun)
                out[f"{path} DualPipe, run again"] = rerun
        if ep is not None:
            ep.close()
    return out


def host_reads(rank: int, world: int) -> Dict[str, str]:
    """Host reads inside an overlapped pair, a two-batch forward and its backward on the EPBuffer path."""
    os.environ["DUALPIPE_EXT_TRITON"] = "1"
    from dualpipe_ext.debug import HostReadCounter

    group = dist.new_group(list(range(world)))
    ep = _buffer(group, "ep")
    cfg = OverlapConfig(two_batch=True)
    st0, st1 = (_stage(OverlappedMoEStage, 10 * s + rank, 1, group, cfg, ep) for s in (1, 2))
    x0, x1, t = _data(30 + rank), _data(40 + rank).requires_grad_(), _data(50 + rank)
    reports = {}
    with HostReadCounter() as reads:
        out1 = st1(x1)
    reports["two-batch forward"] = reads.report()
    loss1 = criterion(out1, t)
    with HostReadCounter() as reads:
        out0, _ = OverlappedMoEStage.overlapped_forward_backward(st0, [x0], None, [], st1, loss1, [], [])
    reports["pair"] = reads.report()
    with HostReadCounter() as reads:
        criterion(out0, t).backward()
    reports["two-batch backward"] = reads.report()
    ep.close()
    return reports
