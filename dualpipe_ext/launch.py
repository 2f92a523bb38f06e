"""Run a function on several local processes that form one ``torch.distributed`` group.

``run_ranks(fn, world, *args)`` starts ``world`` processes, initialises the process group in
each on a free loopback port, calls ``fn(rank, world, *args)`` and returns the results by
rank. It is how the tests, benchmarks and examples start their ranks::

    from dualpipe_ext.launch import run_ranks

    def work(rank, world, n):          # a module-level function: spawned processes import it
        ...
        return {"loss": loss}

    results = run_ranks(work, 4, 10, timeout_s=120)

``timeout_s`` bounds ``fn``: it counts from the moment every rank has started (process up,
torch imported, process group initialised), so that a slow start on a busy machine does not
eat into it; start-up has its own bound (``start_timeout_s``). A failure names the ranks that
raised (with their tracebacks), that exited without a result, or that did not finish in time;
every process still running is killed before it is raised, so none outlives the call. The
group's key-value store lives in the calling process (as torchrun's agent holds it), so it
outlives any rank: ranks that lose a peer can still read who reported what (:mod:`dualpipe_ext.faults`).

The processes are forked from a fork server (``multiprocessing``'s ``forkserver``) that imported
torch once, so a launch costs milliseconds rather than an interpreter start and a torch import
per rank. The server starts at the first ``run_ranks`` of a process and runs nothing else, so
CUDA is first initialised in the ranks; each rank gets the caller's current environment,
working directory and ``sys.path`` before ``fn``'s module is imported. Ranks end without the
interpreter's finalization (``os._exit`` after ``fn``), as every forked process does.
"""
from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue as queue_mod
import socket
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, Dict, List, Optional, Sequence, Set

__all__ = ["LaunchError", "free_port", "run_ranks"]

# What the fork server imports once, before it forks any rank.
_PRELOAD = ("torch", "torch.distributed", "dualpipe_ext.launch")

_HOST = "127.0.0.1"
# After one rank fails, how long the others get to finish (or fail) before they are killed:
# peers of a failed rank usually wait on it until their own timeouts.
_GRACE_S = 5.0
# A process that exited without a result is reported after this long (its last message may
# still be in the pipe).
_EXIT_DRAIN_S = 1.0


class LaunchError(RuntimeError):
    """Some ranks raised, exited without a result or did not finish; raised after all are stopped."""

    def __init__(self, errors: Dict[int, str], exited: Dict[int, int], unfinished: List[int],
                 timeout_s: float, results: Optional[Dict[int, Any]] = None, grace_s: float = _GRACE_S,
                 not_started: Sequence[int] = (), start_timeout_s: float = 0.0) -> None:
        lines = []
        late = [r for r in unfinished if r not in not_started]
        early = [r for r in unfinished if r in not_started]
        if early:
            lines.append(f"ranks {early} did not start within {start_timeout_s:g} s (process start, imports, process "
                         f"group) and were killed")
        if late:
            limit = f"{timeout_s:g} s" + (f", or {grace_s:g} s after a failure" if errors or exited else "")
            lines.append(f"ranks {late} did not finish in time ({limit}) and were killed")
        lines += [f"rank {r} exited with code {code} without a result" for r, code in sorted(exited.items())]
        lines += [f"rank {r} raised:\n{tb}" for r, tb in sorted(errors.items())]
        super().__init__("\n".join(lines))
        self.errors = errors  # rank -> traceback of what it raised
        self.exited = exited  # rank -> exit code of a process that ended without a result
        self.unfinished = unfinished  # ranks killed before they finished
        self.results = results or {}  # rank -> result of the ranks that did finish


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((_HOST, 0))
        return s.getsockname()[1]


def _set_environ(env: Dict[str, str]) -> Dict[str, str]:
    os.environ.clear()
    os.environ.update(env)
    return env


class _Environ:
    """The caller's environment, first among a rank's arguments: it is in place as the rest are unpickled
    (which imports ``fn``'s module), since forked ranks otherwise inherit the fork server's."""

    def __init__(self) -> None:
        self.env = dict(os.environ)

    def __reduce__(self):
        return _set_environ, (self.env,)


def _context(preload: Sequence[str]):
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([*_PRELOAD, *preload])  # read when the server starts: the first launch
    return ctx


def _rank_main(env: Dict[str, str], fn: Callable, rank: int, world: int, port: int, args: tuple, out: "mp.Queue",
               backend: str, init: bool, barrier: bool, init_timeout_s: float, store_port: int) -> None:
    """Body of one rank's process: environment, process group, ``fn``, result or traceback."""
    os.environ.update({"MASTER_ADDR": _HOST, "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        if init:
            if backend == "nccl":
                torch.cuda.set_device(rank % torch.cuda.device_count())
            store = dist.TCPStore(_HOST, store_port, world, is_master=False,
                                  timeout=timedelta(seconds=init_timeout_s))
            dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                                    timeout=timedelta(seconds=init_timeout_s))
        out.put((rank, "started", None))
        result = fn(rank, world, *args)
        if init and barrier:
            dist.barrier()
        buf = io.BytesIO()  # bytes, not shared-memory tensors, which die with this process
        torch.save(result, buf)
        out.put((rank, "ok", buf.getvalue()))
    except BaseException:  # noqa: BLE001 - reported to the parent
        out.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world: int, *args: Any, timeout_s: float = 120.0, backend: str = "gloo",
              init: bool = True, barrier: bool = True, init_timeout_s: float = 60.0,
              grace_s: float = _GRACE_S, start_timeout_s: Optional[float] = None,
              preload: Sequence[str] = ()) -> List[Any]:
    """Call ``fn(rank, world, *args)`` on ``world`` new processes; return the results by rank.

    ``fn`` and ``args`` must pickle (``fn`` a module-level function); results travel back
    through ``torch.save``, so tensors are fine. Each process sees ``MASTER_ADDR``,
    ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``, and runs one torch thread.

    ``init=False`` leaves ``init_process_group`` to ``fn`` (on the port in ``MASTER_PORT``).
    ``barrier=False`` skips the closing barrier, for groups that ``fn`` leaves broken on
    purpose. ``backend="nccl"`` gives rank ``r`` the GPU ``r % device_count``. ``init_timeout_s``
    is the process group's timeout (its collectives' and the store's). ``timeout_s`` counts from
    when every rank has started ``fn``; ``start_timeout_s`` (default: ``init_timeout_s`` plus a
    minute for imports) bounds the start-up before that. ``preload`` names modules the fork server
    imports once besides torch (slow imports every rank needs, e.g. transformers' model files); it
    takes effect when the server starts, at the first ``run_ranks`` of the calling process.

    Raises :class:`LaunchError` naming the ranks that raised, exited or did not finish
    within ``timeout_s`` (or ``grace_s`` after the first rank failed) or did not start within
    ``start_timeout_s``, after killing every
    process still running; its ``results`` holds what the other ranks returned.
    """
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"run_ranks needs a positive int number of ranks, got world={world!r}")
    if not callable(fn) or "<lambda>" in getattr(fn, "__qualname__", "") or "<locals>" in getattr(
            fn, "__qualname__", ""):
        raise ValueError(f"run_ranks runs a module-level function (the ranks import it by name), got "
                         f"{getattr(fn, '__qualname__', type(fn).__name__)}")
    if not isinstance(backend, str):
        raise ValueError(f"backend must be a torch.distributed backend name ('gloo', 'nccl'), got {backend!r}")
    import torch.distributed as dist

    if init and not dist.is_backend_available(backend):
        raise ValueError(f"backend {backend!r} is not available in this torch build (gloo: CPU; nccl: CUDA GPUs)")
    import torch

    if isinstance(preload, str) or not all(isinstance(m, str) for m in preload):
        raise ValueError(f"preload must be a sequence of module names, got {preload!r}")
    ctx = _context(preload)
    out = ctx.Queue()
    port = free_port()
    store, store_port = None, 0
    if init:  # the store in this process, so that it outlives the ranks
        store = dist.TCPStore(_HOST, 0, world, is_master=True, timeout=timedelta(seconds=init_timeout_s),
                              wait_for_workers=False)
        store_port = store.port
    procs = [ctx.Process(target=_rank_main, args=(_Environ(), fn, r, world, port, args, out, backend, init, barrier,
                                                  init_timeout_s, store_port), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    results: Dict[int, bytes] = {}
    errors: Dict[int, str] = {}
    exited: Dict[int, int] = {}
    started: Set[int] = set()
    if start_timeout_s is None:
        start_timeout_s = init_timeout_s + 60.0
    try:
        deadline = _collect(procs, out, results, errors, exited, started, timeout_s, grace_s, start_timeout_s)
        for p in procs:  # the results are in; let the processes wind down
            p.join(timeout=max(0.1, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        out.close()
        del store
    unfinished = [r for r in range(world) if r not in results and r not in errors and r not in exited]
    loaded = {r: torch.load(io.BytesIO(v), weights_only=False) for r, v in results.items()}
    if errors or exited or unfinished:
        raise LaunchError(errors, exited, unfinished, timeout_s, loaded, grace_s,
                          [r for r in range(world) if r not in started], start_timeout_s)
    return [loaded[r] for r in range(len(procs))]


def _collect(procs: List[Any], out: "mp.Queue", results: Dict[int, bytes], errors: Dict[int, str],
             exited: Dict[int, int], started: Set[int], timeout_s: float, grace_s: float,
             start_timeout_s: float) -> float:
    """Read the ranks' reports until all are in, the deadline passes or the failed ranks' grace ends.

    The deadline is ``start_timeout_s`` away until every rank has started ``fn``, then
    ``timeout_s`` from that moment. Returns the deadline that held when it stopped.
    """
    world = len(procs)
    deadline = time.monotonic() + start_timeout_s
    all_started = False
    exited_at: Dict[int, float] = {}
    while len(results) + len(errors) + len(exited) < world:
        now = time.monotonic()
        if now >= deadline:
            break
        try:
            rank, status, value = out.get(timeout=min(0.2, deadline - now))
        except queue_mod.Empty:
            pass
        else:
            if status == "started":
                started.add(rank)
                if not all_started and len(started) == world:
                    all_started = True
                    deadline = min(deadline, time.monotonic() + timeout_s) if errors or exited else \
                        time.monotonic() + timeout_s
                continue
            started.add(rank)
            (results if status == "ok" else errors)[rank] = value
            if status != "ok":
                deadline = min(deadline, time.monotonic() + grace_s)
            continue
        for r, p in enumerate(procs):
            if r in results or r in errors or r in exited or p.exitcode is None:
                continue
            exited_at.setdefault(r, now)
            if now - exited_at[r] >= _EXIT_DRAIN_S:
                exited[r] = p.exitcode
                deadline = min(deadline, time.monotonic() + grace_s)
    return deadline

