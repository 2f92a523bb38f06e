"""No process aborts at exit: a drop-in script (spawn, step, no_grad step, gradient collectives,
destroy_process_group) ends with exit code 0 on every rank, run after run.

A gloo process group still referenced when the interpreter finalizes can abort the process
("terminate called without an active exception"), so nothing of the runtime may keep one alive
past ``destroy_process_group`` (no reference cycles through the pipeline) or to interpreter exit.
"""
import gc
import os
import weakref

import pytest
import torch
import torch.multiprocessing as tmp

from dualpipe_ext.launch import free_port
from rt_exit_workers import drop_in_rank

RUNS = 8


def _runs(schedule: str, world: int, chunks: int, tmp_path) -> list:
    aborted = []
    for i in range(RUNS):
        out = tmp_path / f"{schedule}-{i}"
        out.mkdir()
        try:
            tmp.spawn(drop_in_rank, args=(world, schedule, chunks, free_port(), str(out)), nprocs=world, daemon=True)
        except tmp.ProcessExitedException as e:  # a signal or non-zero exit after the work was done
            aborted.append((i, e.error_index, e.exit_code, e.signal_name))
        done = sorted(os.listdir(out))
        assert done == [str(r) for r in range(world)], (i, done)
        sums = {(out / r).read_text() for r in done}
        assert len(sums) == 1, sums  # all_reduce gave every rank the same gradient sum
    return aborted


@pytest.mark.slow
@pytest.mark.parametrize("schedule,world,chunks", [("dualpipe", 4, 10), ("dualpipev", 3, 9)])
def test_spawned_drop_in_runs_exit_cleanly(schedule, world, chunks, tmp_path):
    assert _runs(schedule, world, chunks, tmp_path) == []


def test_a_dropped_pipeline_frees_its_process_group():
    """Freed by reference counting alone (no cycle), so destroy_process_group really ends the group."""
    import torch.distributed as dist
    from dualpipe_ext import DualPipeV

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        was = gc.isenabled()
        gc.disable()
        try:
            pipe = DualPipeV((torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)), p2p_shapes=[(2, 4)],
                             p2p_dtype=torch.float32)
            x = torch.randn(8, 4)
            pipe.step(x, num_chunks=4, criterion=lambda y, t: ((y - t) ** 2).mean(), labels=(x,))
            with torch.no_grad():
                pipe.step(x, num_chunks=4, criterion=lambda y, t: ((y - t) ** 2).mean(), labels=(x,))
            alive_pipe, alive_group = weakref.ref(pipe), weakref.ref(pipe.group)
            del pipe
            assert alive_pipe() is None, "the pipeline sits in a reference cycle"
        finally:
            if was:
                gc.enable()
    finally:
        dist.destroy_process_group()
    assert alive_group() is None, "something of the runtime still holds the process group"
