"""Per-rank bodies of the fault tests: pipelines of every schedule whose stages fail on purpose
(run in spawned processes by dist_harness.run_ranks)."""
from __future__ import annotations

import os
import time
from typing import Dict, List, Optional, Tuple

import torch

import fault_models
from dualpipe_ext import DualPipe, DualPipeV, PipelineSchedule, RuntimeConfig
from fault_models import Fault, FaultyStage

from rt_models import criterion, make_stages

HIDDEN, MB = 8, 2
# Timeouts far above what any case should take: a case that waits for one is a failure.
CFG = RuntimeConfig(comm_timeout_s=60.0)
CHUNKS = {"dualpipe": 8, "dualpipev": 8, "1f1b": 4, "zb1p": 4, "gpipe": 4}
# Schedules with a separate weight step (W) run the weight site there, the others inside B.
WEIGHT_STEPS = ("dualpipe", "dualpipev", "zb1p")


def write_pid(pid_dir: Optional[str], rank: int) -> None:
    if pid_dir:
        with open(os.path.join(pid_dir, f"{rank}.pid"), "w") as f:
            f.write(str(os.getpid()))


def build(schedule: str, rank: int, world: int, seed: int = 1):
    """A pipeline of ``schedule`` over the default group with FaultyStage stages; and its step()."""
    fault_models.RANK = rank
    chunks = CHUNKS[schedule]
    kw = dict(p2p_shapes=[(MB, HIDDEN)], p2p_dtype=torch.float32, config=CFG)
    if schedule == "dualpipe":
        stages = make_stages(2, HIDDEN, 1, seed=seed + rank, cls=FaultyStage)
        pipe = DualPipe(stages, **kw)
        ends = (0, world - 1)
        n = chunks // 2
    elif schedule == "dualpipev":
        pipe = DualPipeV(make_stages(2, HIDDEN, 1, seed=seed + rank, cls=FaultyStage), **kw)
        ends = (0,)
        n = chunks
    else:
        pipe = PipelineSchedule(make_stages(1, HIDDEN, 1, seed=seed + rank, cls=FaultyStage)[0], schedule, **kw)
        ends = (0, world - 1)
        n = chunks
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n * MB, HIDDEN, generator=g), torch.randn(n * MB, HIDDEN, generator=g)
    two = schedule in ("dualpipe", "dualpipev")
    feeds = rank in ends if two else rank == 0
    loses = rank in ends if two else rank == world - 1

    def step():
        return pipe.step(*([x] if feeds else []), num_chunks=chunks, criterion=criterion if loses else None,
                         labels=[y] if loses else [])
    return pipe, step


def outcome(fn) -> Dict:
    """What ``fn`` raised (type, message) and how long it took."""
    start = time.monotonic()
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the test compares what every rank raised
        return {"type": type(e).__name__, "message": str(e), "elapsed": time.monotonic() - start}
    return {"type": None, "message": "", "elapsed": time.monotonic() - start}


def raise_matrix(rank: int, world: int, cases: List[Tuple[str, str, int]]) -> Dict[str, Dict]:
    """For each (schedule, site, failing rank): one step in which that rank raises at the site's
    second occurrence; then a clean step, which must work again."""
    fault_models.patch_communication()
    out = {}
    pipes = {}
    for schedule, site, bad in cases:
        if schedule not in pipes:
            pipes[schedule] = build(schedule, rank, world)
        _, step = pipes[schedule]
        fault_models.ACTIVE = Fault(site, bad)
        out[f"{schedule}/{site}/{bad}"] = outcome(step)
        fault_models.ACTIVE = None
        out[f"{schedule}/{site}/{bad}/after"] = outcome(step)
    return out


def killed_step(rank: int, world: int, schedule: str, site: str, victim: int, nth: int, pid_dir: str) -> Dict:
    """A clean step, then one in which ``victim``'s process exits at the ``nth`` ``site``."""
    write_pid(pid_dir, rank)
    fault_models.patch_communication()
    _, step = build(schedule, rank, world)
    first = outcome(step)
    if first["type"] is not None:
        return {"first": first}
    fault_models.ACTIVE = Fault(site, victim, nth=nth, exit_code=17)
    return outcome(step)


def late_to_the_agreement(rank: int, world: int, pid_dir: str) -> Dict:
    """Three ranks, an agreement between ranks 0 and 2. Rank 1's process exits; rank 0 sees its connection
    close, reports that on the fault board and ends a few seconds later without agreeing. Rank 2 reaches the
    agreement only after the report, and its wait fails when rank 0's process ends: the report, older than
    that wait, says that rank 1 is the one gone, not rank 0."""
    import torch.distributed as dist
    from dualpipe_ext import faults
    from dualpipe_ext.runtime.agreement import PipelineError, agree

    pair = dist.new_group([0, 2])
    write_pid(pid_dir, rank)
    faults.publish_process()
    dist.barrier()
    since = faults.begin_window()
    if rank == 1:
        os._exit(17)
    if rank == 0:
        try:
            dist.recv(torch.empty(1), src=1)
        except RuntimeError as e:
            faults.report(1, faults.cause_of(e) or "error", "its receive")
        time.sleep(5.0)
        return {"message": None}
    time.sleep(2.0)
    try:
        agree(pair, torch.device("cpu"), rank, 0, None, timeout_s=30, since=since)
    except PipelineError as e:
        return {"message": str(e)}
    return {"message": None}
