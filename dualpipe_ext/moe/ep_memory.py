"""Symmetric buffers for device-side expert parallelism: one byte buffer per rank of a group,
and every rank's base address in a table the kernels index.

- CPU: a file per rank in ``/dev/shm`` that every process of the group maps. The files are
  removed as soon as every rank has mapped them (the mappings stay valid), so nothing is
  left behind even when a process is killed later; ``close()``, the context manager and
  interpreter exit remove them too if construction stopped half way.
- CUDA: ``torch.distributed._symmetric_memory`` (``empty`` + ``rendezvous``), within a node.

Both: a small ``board`` of host words per rank, a ``/dev/shm`` file every process maps, where
each rank's host says what it passed to each exchange (``EPBuffer`` agrees on errors there,
at the exchange's own wait, without reading the device).

Construction is collective over the group (the only collectives of the buffer's life): the
ranks check that they asked for the same buffer and live on one host, then exchange handles.
"""
from __future__ import annotations

import atexit
import os
import socket
import uuid
import warnings
import weakref
from typing import Any, List, Optional

import torch
import torch.distributed as dist

__all__ = ["SymmetricBuffer", "allocate"]

_SHM_DIR = "/dev/shm"
_live_files: "weakref.WeakSet[SymmetricBuffer]" = weakref.WeakSet()


class SymmetricBuffer:
    """This rank's buffer, the peers' base addresses and the host-visible status words.

    ``local``: [nbytes] uint8, this rank's buffer. ``table``: [world] int64 on the kernels'
    device, every rank's base address. ``status``: [num_status] int64 words in host memory
    that kernels write and the host reads without synchronising (``status_np`` views them);
    ``status_addr``: [1] int64 on the kernels' device, their address. ``board``: every rank's
    [board_rows, 4] int64 host words (numpy views of shared files); this rank writes ``board[rank]``.
    """

    def __init__(self, local: torch.Tensor, table: torch.Tensor, peers: List[Any], status: torch.Tensor,
                 device: torch.device, pids: List[int], files: List[str], handle: Any = None) -> None:
        self.local, self.table, self.peers, self.status = local, table, peers, status
        self.status_np = status.numpy()
        self.status_addr = torch.tensor([status.data_ptr()], dtype=torch.int64, device=device)
        self.device, self.pids, self._files, self._handle = device, pids, list(files), handle
        self.board: List[Any] = []
        self._board_maps: List[torch.Tensor] = []
        _live_files.add(self)

    def unlink(self) -> None:
        """Remove this rank's backing files, if any are left."""
        for path in self._files:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self._files = []

    def close(self) -> None:
        self.unlink()
        self.local = self.table = self.peers = self._handle = None
        self.board, self._board_maps = [], []


@atexit.register
def _unlink_at_exit() -> None:
    for buf in list(_live_files):
        buf.unlink()


def _agree(group, world: int, request: tuple) -> List[tuple]:
    """Every rank's (host, pid, request); raise the same error on every rank if they differ."""
    mine = (socket.gethostname(), os.getpid(), request)
    everyone: List[Optional[tuple]] = [None] * world
    dist.all_gather_object(everyone, mine, group=group)
    hosts = sorted({e[0] for e in everyone})
    if len(hosts) > 1:
        raise ValueError(f"EPBuffer: the group spans {len(hosts)} hosts ({', '.join(hosts)}); device-side expert "
                         f"parallelism works within one host (shared memory, NVLink). Use the collective path, "
                         f"moe.dispatch/moe.combine, for groups across hosts")
    requests = [e[2] for e in everyone]
    if any(r != requests[0] for r in requests):
        listed = "; ".join(f"rank {r}: {req}" for r, req in enumerate(requests))
        raise ValueError(f"EPBuffer: the ranks of the group asked for different buffers (max_tokens, hidden, dtype, "
                         f"num_sms, max_topk, num_slots, device type): {listed}")
    return everyone


def allocate(group, nbytes: int, num_status: int, device: torch.device, request: tuple,
             board_rows: int = 64) -> SymmetricBuffer:
    """Collectively allocate a ``nbytes`` symmetric buffer on every rank of ``group``, and the host board."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    everyone = _agree(group, world, request)
    pids = [e[1] for e in everyone]
    if device.type == "cuda":
        buf = _allocate_cuda(group, nbytes, num_status, device, pids)
    else:
        buf = _allocate_cpu(group, nbytes, num_status, device, pids)
    _map_board(buf, group, board_rows)
    return buf


def _shared_files(group, tag: str) -> List[str]:
    """One ``/dev/shm`` path per rank of ``group``, named alike on every rank (a collective)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    token = [uuid.uuid4().hex if rank == 0 else None]
    dist.broadcast_object_list(token, src=dist.get_global_rank(group, 0), group=group)
    return [os.path.join(_SHM_DIR, f"dualpipe_ext_ep_{tag}{token[0]}_{r}") for r in range(world)]


def _map_board(buf: SymmetricBuffer, group, rows: int) -> None:
    rank = dist.get_rank(group)
    paths = _shared_files(group, "board_")
    nbytes = rows * 4 * 8
    with open(paths[rank], "wb") as f:  # zero-filled
        f.truncate(nbytes)
    buf._files.append(paths[rank])
    try:
        dist.barrier(group=group)  # every file exists
        maps = [torch.from_file(p, shared=True, size=rows * 4, dtype=torch.int64) for p in paths]
        dist.barrier(group=group)  # every rank has mapped every file
    finally:
        buf.unlink()
    buf._board_maps = maps
    buf.board = [m.numpy().reshape(rows, 4) for m in maps]


def _allocate_cpu(group, nbytes: int, num_status: int, device: torch.device, pids: List[int]) -> SymmetricBuffer:
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if device.type != "cpu":
        raise ValueError(f"EPBuffer supports CUDA and CPU devices, got {device}")
    paths = _shared_files(group, "")
    with open(paths[rank], "wb") as f:  # zero-filled
        f.truncate(nbytes)
    status = torch.zeros(num_status, dtype=torch.int64)
    buf = SymmetricBuffer(torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.int64), [], status, device,
                          pids, [paths[rank]])
    try:
        dist.barrier(group=group)  # every file exists
        peers = [torch.from_file(p, shared=True, size=nbytes, dtype=torch.uint8) for p in paths]
        dist.barrier(group=group)  # every rank has mapped every file
    finally:
        buf.unlink()
    buf.peers = peers
    buf.local = peers[rank]
    _check_aligned([p.data_ptr() for p in peers])
    buf.table = torch.tensor([p.data_ptr() for p in peers], dtype=torch.int64)
    return buf


def _check_aligned(ptrs: List[int]) -> None:
    """The kernels declare every buffer 16-byte aligned (so that rows move as 128-bit accesses)."""
    if any(p % 16 for p in ptrs):
        raise RuntimeError(f"EPBuffer: symmetric buffers must start at 16-byte aligned addresses, got "
                           f"{[hex(p) for p in ptrs]}")


def _allocate_cuda(group, nbytes: int, num_status: int, device: torch.device, pids: List[int]) -> SymmetricBuffer:
    import torch.distributed._symmetric_memory as symm_mem

    local = symm_mem.empty(nbytes, dtype=torch.uint8, device=device)
    local.zero_()
    try:
        handle = symm_mem.rendezvous(local, group)
    except RuntimeError:  # torch releases that need the group registered first
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            symm_mem.enable_symm_mem_for_group(group.group_name)
        handle = symm_mem.rendezvous(local, group)
    _check_aligned(list(handle.buffer_ptrs))
    table = torch.tensor(list(handle.buffer_ptrs), dtype=torch.int64, device=device)
    status = torch.zeros(num_status, dtype=torch.int64, pin_memory=True)  # device-visible host memory
    torch.cuda.synchronize(device)
    dist.barrier(group=group)  # every rank's buffer is zeroed before any kernel writes into it
    return SymmetricBuffer(local, table, [], status, device, pids, [], handle)
