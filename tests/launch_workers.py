"""Per-rank bodies of the launcher's tests (module level, so that spawned processes import them)."""
import os
import time


def report(rank, world, extra):
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return {"rank": rank, "world": world, "extra": extra, "sum": t, "env": (os.environ["RANK"],
            os.environ["WORLD_SIZE"], os.environ["MASTER_ADDR"]), "pid": os.getpid()}


def raise_on_one(rank, world):
    if rank == 1:
        raise ValueError("rank one fails on purpose")
    return rank


def hang_on_last(rank, world, pid_dir):
    open(os.path.join(pid_dir, f"{rank}.pid"), "w").write(str(os.getpid()))
    if rank == world - 1:
        time.sleep(600)
    return rank


def exit_on_zero(rank, world):
    if rank == 0:
        os._exit(3)
    return rank


def own_group(rank, world):
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)  # env:// from the launcher
    size = dist.get_world_size()
    dist.destroy_process_group()
    return size


def environ(rank, world, names):
    return {"env": {n: os.environ.get(n) for n in names}}
