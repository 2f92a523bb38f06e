"""Per-rank bodies of the runtime tests (run in spawned processes by rt_harness.run_ranks)."""
from __future__ import annotations

import copy
from typing import Dict, List

import torch

from dualpipe_ext import DualPipe, DualPipeV, PipelineSchedule, RuntimeConfig, set_p2p_tensor_dtype, set_p2p_tensor_shapes
from dualpipe_ext.runtime.reference import grad_cos_diff, sequential_step

from rt_models import OverlapStage, Stage, criterion, make_stages

CFG = RuntimeConfig(comm_timeout_s=20.0)


def _batch(size: int, hidden: int, num_tensors: int, seed: int) -> List[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, hidden, generator=g) for _ in range(num_tensors)]


def _compare_grads(local, ref, what: str, failures: List[str]) -> None:
    for (name, p), q in zip(local.named_parameters(), ref.parameters()):
        if p.grad is None or q.grad is None:
            failures.append(f"{what}.{name}: gradient missing (pipeline {p.grad is None}, reference {q.grad is None})")
            continue
        d = grad_cos_diff(p.grad, q.grad)
        if not d < 1e-12:
            failures.append(f"{what}.{name}: 1 - cos = {d:.3g}")


def _expect_equal(a, b, what: str, failures: List[str]) -> None:
    a = a if isinstance(a, (tuple, list)) else (a,)
    b = b if isinstance(b, (tuple, list)) else (b,)
    if len(a) != len(b) or any(x is None or not torch.equal(x, y) for x, y in zip(a, b)):
        failures.append(f"{what}: pipeline {a} != reference {b}")


def equivalence(rank: int, world: int, schedule: str, chunks: int, num_tensors: int = 1, overlap: bool = False,
                hidden: int = 8, mb_size: int = 2) -> Dict:
    """One training step and one forward-only step against the sequential reference."""
    cls = OverlapStage if overlap else Stage
    set_p2p_tensor_shapes([(mb_size, hidden)] * num_tensors)
    set_p2p_tensor_dtype(torch.float32)
    R = world
    failures: List[str] = []
    # Pipelines: (reference stages, inputs, labels, number of micro-batches, feeding rank, loss rank).
    if schedule == "dualpipe":
        fwd = make_stages(R, hidden, num_tensors, seed=1, cls=cls)
        rev = make_stages(R, hidden, num_tensors, seed=2, cls=cls)
        local = [copy.deepcopy(fwd[rank]), copy.deepcopy(rev[R - 1 - rank])]
        refs = [(fwd, 0, R - 1), (rev, R - 1, 0)]
        mbs = chunks // 2
        pipe = DualPipe(local, config=CFG)
    elif schedule == "dualpipev":
        full = make_stages(2 * R, hidden, num_tensors, seed=1, cls=cls)
        local = [copy.deepcopy(full[rank]), copy.deepcopy(full[2 * R - 1 - rank])]
        refs = [(full, 0, 0)]
        mbs = chunks
        pipe = DualPipeV(local, config=CFG)
    else:
        full = make_stages(R, hidden, num_tensors, seed=1, cls=cls)
        local = [copy.deepcopy(full[rank])]
        refs = [(full, 0, R - 1)]
        mbs = chunks
        pipe = PipelineSchedule(local[0], schedule, config=CFG)
    data = [(_batch(mbs * mb_size, hidden, num_tensors, 10 + i), _batch(mbs * mb_size, hidden, num_tensors, 20 + i))
            for i in range(len(refs))]
    inputs, labels = [], []
    for (stages, feed, loss_rank), (x, y) in zip(refs, data):
        if rank == feed:
            inputs = x
        if rank == loss_rank:
            labels = y
    crit = criterion if labels else None

    OverlapStage.calls = 0
    loss, outs = pipe.step(*inputs, num_chunks=chunks, criterion=crit, labels=labels, return_outputs=True)
    with torch.no_grad():
        f_loss, f_outs = pipe.step(*inputs, num_chunks=chunks, criterion=crit, labels=labels, return_outputs=True)

    for (stages, feed, loss_rank), (x, y) in zip(refs, data):
        ref_loss, ref_outs = sequential_step(stages, x, mbs, criterion, y)
        if rank == loss_rank:
            _expect_equal(loss, ref_loss, f"{schedule} loss", failures)
            _expect_equal(outs, ref_outs, f"{schedule} outputs", failures)
            _expect_equal(f_loss, ref_loss, f"{schedule} forward-only loss", failures)
            _expect_equal(f_outs, ref_outs, f"{schedule} forward-only outputs", failures)
    if not any(rank == lr for _, _, lr in refs) and (loss is not None or outs is not None):
        failures.append(f"rank {rank} holds no last stage but got loss/outputs")
    if schedule == "dualpipe":
        _compare_grads(local[0], fwd[rank], "module0", failures)
        _compare_grads(local[1], rev[R - 1 - rank], "module1", failures)
    elif schedule == "dualpipev":
        _compare_grads(local[0], full[rank], "module0", failures)
        _compare_grads(local[1], full[2 * R - 1 - rank], "module1", failures)
    else:
        _compare_grads(local[0], full[rank], "module0", failures)
    return {"failures": failures, "overlapped_calls": OverlapStage.calls,
            "executor_overlapped_calls": pipe.executor.num_overlapped_calls}
