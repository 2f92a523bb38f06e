"""Per-rank bodies of the runtime tests (run in spawned processes by dist_harness.run_ranks)."""
from __future__ import annotations

import copy
import dataclasses
from typing import Dict, List

import torch

from dualpipe_ext import DualPipe, DualPipeV, PipelineSchedule, RuntimeConfig, set_p2p_tensor_dtype, set_p2p_tensor_shapes
from dualpipe_ext.demo.reference import grad_cos_diff, sequential_step
from dualpipe_ext.schedules import get_plan

from rt_models import OverlapStage, Stage, criterion, make_stages

CFG = RuntimeConfig(comm_timeout_s=20.0)
CFG_RECORD = RuntimeConfig(comm_timeout_s=20.0, record=True)


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
            failures.append(f"{what}.{name}: grad_cos_diff (1 - 2xy/(x²+y²)) = {d:.3g}")


def _expect_equal(a, b, what: str, failures: List[str]) -> None:
    a = a if isinstance(a, (tuple, list)) else (a,)
    b = b if isinstance(b, (tuple, list)) else (b,)
    if len(a) != len(b) or any(x is None or not torch.equal(x, y) for x, y in zip(a, b)):
        failures.append(f"{what}: pipeline {a} != reference {b}")


def equivalence_cases(rank: int, world: int, cases: List[Dict]) -> List[Dict]:
    """Several equivalence checks on one process group."""
    return [equivalence(rank, world, **case) for case in cases]


def equivalence(rank: int, world: int, schedule: str, chunks: int, num_tensors: int = 1, overlap: bool = False,
                hidden: int = 8, mb_size: int = 2, record: bool = False, rank_mapping=None, given_plan: bool = False,
                own_p2p: bool = False, eager_comm: bool = True) -> Dict:
    """One training step and one forward-only step against the sequential reference.

    ``given_plan``: the pipeline gets the schedule's Plan instead of its name. ``own_p2p``: the
    pipeline gets its message shapes and dtype itself; the process-wide default is left wrong.
    ``eager_comm=False``: the plan's batches go to ``batch_isend_irecv`` as planned (the NCCL path).
    """
    if rank_mapping is not None:
        rank = rank_mapping[rank]  # from here on: the pipeline rank
    cls = OverlapStage if overlap else Stage
    shapes, dtype = [(mb_size, hidden)] * num_tensors, torch.float32
    if own_p2p:
        set_p2p_tensor_shapes([(mb_size + 1, hidden)])
        set_p2p_tensor_dtype(torch.float16)
        kw = dict(p2p_shapes=shapes, p2p_dtype=dtype)
    else:
        set_p2p_tensor_shapes(shapes)
        set_p2p_tensor_dtype(dtype)
        kw = {}
    R = world
    cfg = dataclasses.replace(CFG_RECORD if record else CFG, eager_comm=eager_comm)
    if given_plan:
        kw["schedule"] = get_plan(schedule, R, chunks)
    failures: List[str] = []
    # Pipelines: (reference stages, inputs, labels, number of micro-batches, feeding rank, loss rank).
    if schedule == "dualpipe":
        fwd = make_stages(R, hidden, num_tensors, seed=1, cls=cls)
        rev = make_stages(R, hidden, num_tensors, seed=2, cls=cls)
        local = [copy.deepcopy(fwd[rank]), copy.deepcopy(rev[R - 1 - rank])]
        refs = [(fwd, 0, R - 1), (rev, R - 1, 0)]
        mbs = chunks // 2
        pipe = DualPipe(local, rank_mapping=rank_mapping, config=cfg, **kw)
    elif schedule == "dualpipev":
        full = make_stages(2 * R, hidden, num_tensors, seed=1, cls=cls)
        local = [copy.deepcopy(full[rank]), copy.deepcopy(full[2 * R - 1 - rank])]
        refs = [(full, 0, 0)]
        mbs = chunks
        pipe = DualPipeV(local, rank_mapping=rank_mapping, config=cfg, **kw)
    else:
        full = make_stages(R, hidden, num_tensors, seed=1, cls=cls)
        local = [copy.deepcopy(full[rank])]
        refs = [(full, 0, R - 1)]
        mbs = chunks
        pipe = PipelineSchedule(local[0], kw.pop("schedule", schedule), rank_mapping=rank_mapping, config=cfg, **kw)
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
    if record:
        _check_timeline(pipe, schedule, world, rank, chunks, failures)
    return {"failures": failures, "overlapped_calls": OverlapStage.calls,
            "executor_overlapped_calls": pipe.executor.num_overlapped_calls}


def _check_timeline(pipe, schedule: str, world: int, rank: int, chunks: int, failures: List[str]) -> None:
    import json
    import os
    import tempfile

    plan = get_plan(schedule, world, chunks)
    rec = pipe.timeline
    for step, p in ((0, plan), (1, plan.forward_only())):
        got = [e[0] for e in rec.compute_events(step)]
        if got != p.trace()[rank]:
            failures.append(f"timeline step {step}: {got} != plan trace {p.trace()[rank]}")
        if any(e[3] < e[2] for e in rec.compute_events(step)):
            failures.append("timeline: an event ends before it starts")
    with tempfile.TemporaryDirectory() as d:
        path = rec.save(os.path.join(d, "timeline_{rank}.json"))
        data = json.load(open(path))
    if data["rank"] != rank or len(data["steps"]) != 2 or len(data["events"]) != len(rec.events):
        failures.append(f"timeline JSON: rank {data['rank']}, {len(data['steps'])} steps")


class FaultyStage(Stage):
    """A stage that can return a wrongly shaped output or raise, on demand."""

    mode = None

    def forward(self, *xs):
        out = super().forward(*xs)
        if self.mode == "shape":
            return out[..., :-1]
        if self.mode == "raise":
            raise RuntimeError("stage exploded on purpose")
        return out


def _outcome(fn) -> Dict:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the test compares what every rank raised
        return {"type": type(e).__name__, "message": str(e)}
    return {"type": None, "message": ""}


def bad_inputs(rank: int, world: int, hidden: int = 8, mb_size: int = 2) -> Dict:
    """Every bad-input case on a DualPipe group; returns what this rank raised for each."""
    import torch.distributed as dist

    from dualpipe_ext import comm

    R, chunks = world, 2 * world
    mbs = chunks // 2
    stages = make_stages(2, hidden, 1, seed=5, cls=FaultyStage)
    pipe = DualPipe(stages, config=CFG)
    set_p2p_tensor_shapes([(mb_size, hidden)])
    set_p2p_tensor_dtype(torch.float32)
    x = _batch(mbs * mb_size, hidden, 1, 7)
    y = _batch(mbs * mb_size, hidden, 1, 8)
    end = rank in (0, R - 1)

    def step(inputs=None, num_chunks=chunks, crit=criterion, labels=None):
        inputs = (x if end else []) if inputs is None else inputs
        labels = (y if end else []) if labels is None else labels
        return pipe.step(*inputs, num_chunks=num_chunks, criterion=crit if end else None, labels=labels)

    out = {}
    out["ok_before"] = _outcome(step)

    def unset_shapes():
        saved = comm.TENSOR_SHAPES
        if rank == 1:
            comm.TENSOR_SHAPES = None
        try:
            step()
        finally:
            comm.TENSOR_SHAPES = saved
    out["shapes_unset"] = _outcome(unset_shapes)
    out["odd_chunks"] = _outcome(lambda: step(num_chunks=chunks + 1))
    out["few_chunks"] = _outcome(lambda: step(num_chunks=chunks - 2))
    out["ranks_disagree"] = _outcome(lambda: step(num_chunks=chunks + 2 * (rank == 2)))
    out["batch_split"] = _outcome(lambda: step(inputs=[x[0][:-1]] if rank == 0 else None))
    out["no_criterion"] = _outcome(lambda: step(crit=None) if rank == R - 1 else step())
    out["no_labels"] = _outcome(lambda: step(labels=[] if rank == 0 else None))

    def misbehaving(stage, mode: str, on_rank: int):
        def run():
            stage.mode = mode if rank == on_rank else None
            try:
                step()
            finally:
                stage.mode = None
        return run
    out["output_shape"] = _outcome(misbehaving(stages[0], "shape", 1))
    out["stage_raises"] = _outcome(misbehaving(stages[1], "raise", 2))
    out["ok_after"] = _outcome(step)

    out["not_permutation"] = _outcome(lambda: DualPipe(stages, rank_mapping=[0, 1, 1, 3][:R], config=CFG))
    out["invalid_plan"] = _outcome(lambda: DualPipe(stages, config=CFG, schedule=_plan_without_a_receive(R, chunks)))
    out["plan_ranks"] = _outcome(lambda: DualPipe(stages, config=CFG, schedule=get_plan("dualpipe", 2, 4)))
    given = DualPipe(stages, config=CFG, schedule=get_plan("dualpipe", R, chunks))
    out["plan_chunks"] = _outcome(lambda: given.step(*(x if end else []), num_chunks=chunks + 2,
                                                     criterion=criterion if end else None, labels=y if end else []))
    odd = dist.new_group(list(range(R - 1)))
    out["odd_ranks"] = _outcome(lambda: DualPipe(stages, process_group=odd, config=CFG)) if rank < R - 1 else None
    return out


def _plan_without_a_receive(ranks: int, chunks: int):
    """DualPipe's plan with rank 1's first forward receive removed: unsound."""
    from dualpipe_ext import _C

    plan = _C.make_plan("dualpipe", ranks, chunks)
    rows = [[str(a) for a in row] for row in plan.actions]
    rows[1].remove(next(t for t in rows[1] if t.startswith("recvF")))
    plan.actions = [[_C.Action.parse(t) for t in row] for row in rows]
    return plan


def stuck_peer(rank: int, world: int, hidden: int = 8) -> Dict:
    """The last rank never runs its step: the others must time out naming what they miss."""
    set_p2p_tensor_shapes([(2, hidden)])
    set_p2p_tensor_dtype(torch.float32)
    cfg = RuntimeConfig(comm_timeout_s=3.0, check_errors=False)
    pipe = DualPipeV(make_stages(2, hidden, 1, seed=3), config=cfg)
    if rank == world - 1:
        import time
        time.sleep(cfg.comm_timeout_s + 3)  # alive but silent: the others must time out, not see a closed pair
        return {"type": None, "message": "skipped"}
    x, y = _batch(2 * world * 2, hidden, 1, 1), _batch(2 * world * 2, hidden, 1, 2)
    return _outcome(lambda: pipe.step(*(x if rank == 0 else []), num_chunks=2 * world,
                                      criterion=criterion if rank == 0 else None, labels=y if rank == 0 else []))


class SpanStage(Stage):
    def forward(self, *xs):
        from dualpipe_ext.runtime.timeline import span

        with span("inner"):
            return super().forward(*xs)


def profiled(rank: int, world: int, hidden: int = 8) -> Dict:
    """Action names reach the PyTorch profiler; spans inside actions reach the recorder."""
    from torch.profiler import ProfilerActivity, profile

    set_p2p_tensor_shapes([(2, hidden)])
    set_p2p_tensor_dtype(torch.float32)
    pipe = DualPipeV(make_stages(2, hidden, 1, seed=4, cls=SpanStage), config=CFG_RECORD)
    x, y = _batch(2 * 2 * world, hidden, 1, 1), _batch(2 * 2 * world, hidden, 1, 2)
    args = (x if rank == 0 else [])
    kw = dict(num_chunks=2 * world, criterion=criterion if rank == 0 else None, labels=y if rank == 0 else [])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        pipe.step(*args, **kw)
    names = sorted({e.name for e in prof.events()})
    recorded = [(e[0], e[1]) for e in pipe.timeline.events]
    pipe.timeline.enabled = False
    pipe.step(*args, **kw)  # recording off: nothing added
    return {"profiler_names": names, "recorded": recorded, "after_off": len(pipe.timeline.events)}


def side_agreement(rank: int, world: int) -> Dict:
    """The error agreement of a pipeline whose group is not gloo runs on a gloo group of the same
    processes (made here for a group that claims another backend), and still makes every rank raise
    the same error."""
    import torch.distributed as dist

    from dualpipe_ext.runtime import pipeline
    from dualpipe_ext.runtime.agreement import agree

    group = dist.new_group([0, 1])
    real = dist.get_backend
    dist.get_backend = lambda g=None: "nccl" if g is group else real(g)
    try:
        side = pipeline.agreement_group(group)
    finally:
        dist.get_backend = real
    same = pipeline.agreement_group(dist.group.WORLD)
    out = {"new": side is not group, "side_backend": dist.get_backend(side),
           "side_ranks": dist.get_process_group_ranks(side), "same_on_gloo": same is dist.group.WORLD}
    try:
        agree(side, torch.device("cpu"), rank, 0, None, values=(("num_chunks", 4 + rank),), timeout_s=20)
        out["error"] = None
    except ValueError as e:
        out["error"] = str(e)
    return out
