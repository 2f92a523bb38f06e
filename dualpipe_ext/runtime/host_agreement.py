"""The error agreement of ranks on one host, through shared memory.

A step agrees twice (``agreement.agree``). Over gloo each agreement is a round of messages,
each woken through gloo's threads: on 2 CPU cores a median 0.11 ms for 2 ranks and 3.7 ms for
4, a tenth to a quarter of a small step. Ranks that share a host instead write their values
into their own slot of one small shared file and read everyone's slot: microseconds. Only the
common case runs here, the elementwise maximum of a few integers; when it says that something
failed, the messages travel over the group as before.

A slot is ``[seq, checksum, n, values...]`` (int64). A reader takes a slot as written for
agreement ``seq`` only when the CRC of what it read matches, so neither a torn read nor stores
seen out of order (memory models weaker than x86's) pass a stale value. A peer that does not
come is named: at once when its process has exited or it reported a failure on the fault board,
after ``timeout_s`` when it is alive and silent.
"""
from __future__ import annotations

import hashlib
import mmap
import os
import socket
import struct
import time
import uuid
import zlib
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

from dualpipe_ext import faults
from dualpipe_ext.runtime.agreement import PipelineError, Wait, wait_for

__all__ = ["HostAgreement", "file_size", "open_on_host", "slot_bytes", "slot_offset"]

_DIR = "/dev/shm"
_WORDS = 32  # int64 per slot: seq, checksum, n, then up to 29 values
MAX_VALUES = _WORDS - 3
_SLOT = struct.Struct(f"<{_WORDS}q")
_SLOT_BYTES = _SLOT.size
_MAX_RANKS = 256
_SPIN_S = 0.002  # yield the CPU in a loop this long, then sleep in growing steps (at most 1 ms)
_CHECK_S = 0.05  # how often a wait looks for peers that exited or failed


def host_identity() -> int:
    """A number equal on processes of one host and pid namespace (63 bits), 0 where that cannot be told."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        ns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0
    digest = hashlib.blake2b(f"{socket.gethostname()} {boot} {ns}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1 or 1


def _crc(raw: bytes, n: int) -> int:
    """Checksum of a slot's seq, n and values, as the writer stores it."""
    return zlib.crc32(raw[24:24 + 8 * n], zlib.crc32(raw[:8] + raw[16:24]))


def slot_bytes(seq: int, flags: Sequence[int]) -> bytes:
    """What a rank writes into its slot for agreement ``seq``: [seq, checksum, n, flags..., 0...]."""
    n = len(flags)
    raw = bytearray(_SLOT.pack(seq, 0, n, *flags, *([0] * (MAX_VALUES - n))))
    struct.pack_into("<q", raw, 8, _crc(bytes(raw), n))
    return bytes(raw)


def slot_offset(rank: int, seq: int) -> int:
    """Where group rank ``rank`` writes agreement ``seq`` in the shared file."""
    return (2 * rank + (seq & 1)) * _SLOT_BYTES


def file_size(size: int) -> int:
    """Bytes of the shared file of ``size`` ranks."""
    return 2 * size * _SLOT_BYTES


class HostAgreement:
    """One pipeline's slots in a shared file (two per rank): ``size`` ranks of one host, this one ``me``
    (group ranks); ``pids[r]``: the process of group rank ``r``; ``members[r]``: its global rank."""

    def __init__(self, mm: mmap.mmap, me: int, size: int, pids: Sequence[int], members: Sequence[int]) -> None:
        self._mm, self.me, self.size = mm, me, size
        self.pids, self.members = list(pids), list(members)
        self._seq = 0
        self._others = [r for r in range(size) if r != me]

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._mm = None

    def max_over_ranks(self, flags: Sequence[int], wait: Wait) -> List[int]:
        """Elementwise maximum of ``flags`` (ints) over the ranks; the same list on every rank."""
        n = len(flags)
        if n > MAX_VALUES:
            raise ValueError(f"the agreement carries at most {MAX_VALUES} values, got {n}")
        mm = self._mm
        self._seq = s = self._seq + 1
        at = slot_offset(self.me, s)
        mm[at:at + _SLOT_BYTES] = slot_bytes(s, flags)
        acc = list(flags)
        counts = {}  # ranks that passed a different number of values
        pending = self._others
        begin = None
        next_check = _CHECK_S
        while True:
            left = []
            for r in pending:
                at = slot_offset(r, s)
                got = mm[at:at + _SLOT_BYTES]
                seq, check, m = struct.unpack_from("<3q", got)
                whole = 0 <= m <= MAX_VALUES and check == _crc(got, m)
                if seq == s and whole:
                    if m == n:
                        acc = list(map(max, acc, struct.unpack_from(f"<{n}q", got, 24)))
                    else:
                        counts[r] = m
                    continue
                if seq > s and whole:
                    raise PipelineError(f"pipeline rank {wait.rank}: {wait.what}: {wait.name(self.members[r])} is at "
                                        f"agreement {seq}, this rank at {s}: the ranks are out of step (a rank went "
                                        f"on after an earlier step failed on it alone)")
                left.append(r)
            if not left:
                break
            pending = left
            now = time.monotonic()
            if begin is None:
                begin = now
            waited = now - begin
            if waited < _SPIN_S:
                os.sched_yield()
            else:
                time.sleep(min(1e-3, waited * 0.05))
            if waited >= next_check:
                next_check = waited + _CHECK_S
                self._raise_if_missing(pending, waited, wait)
        if counts:
            counts[self.me] = n
            listed = ", ".join(f"{wait.name(self.members[r])}: {c}" for r, c in sorted(counts.items()))
            raise ValueError(f"the ranks of the pipeline passed different numbers of values to the {wait.what} "
                             f"({listed} of them); every rank must pass the same (a plan given on some ranks only?)")
        return acc

    def _raise_if_missing(self, pending: List[int], waited: float, wait: Wait) -> None:
        """Raise PipelineError naming the ``pending`` ranks that will not come: exited, stopped at a failed
        communication (the fault board says so), or silent for ``timeout_s``."""
        dead = [r for r in pending if not faults.pid_alive(self.pids[r])]
        stopped = faults.stopped([self.members[r] for r in pending if r not in dead], wait.since)
        if dead or stopped:
            name = wait.name
            where = wait.what[4:] if wait.what.startswith("the ") else wait.what
            gone = [self.members[r] for r in dead] + stopped
            for g in gone:
                faults.report(g, "missed agreement", where)
            parts = [f"{name(self.members[r])} is gone: its process (pid {self.pids[r]}) has exited" for r in dead]
            if stopped:
                parts.append(faults.diagnose(stopped, wait.since, name, self.members).text)
            raise PipelineError(f"pipeline rank {wait.rank}: {wait.what} failed after {faults.duration(waited)}: "
                                f"{', '.join(name(g) for g in gone)} did not reach it; {'; '.join(parts)}")
        if waited >= wait.timeout_s:
            listed = ", ".join(wait.name(self.members[r]) for r in pending)
            raise PipelineError(f"pipeline rank {wait.rank}: {wait.what} did not complete within {wait.timeout_s:g} s: "
                                f"{listed} did not reach it (alive, but hung or in a different step)")


def open_on_host(group: dist.ProcessGroup, wait: Wait) -> Optional[HostAgreement]:
    """Collectively map one shared file for the ranks of ``group`` (a gloo group) when they all run on
    this host; None, on every rank alike, when they do not or the file cannot be shared. Two small
    collectives, once per pipeline."""
    size, me = group.size(), group.rank()
    if size < 2 or size > _MAX_RANKS:
        return None
    path, created, nonce = None, 0, 0
    if me == 0 and os.path.isdir(_DIR):
        nonce = uuid.uuid4().int >> 65
        path = os.path.join(_DIR, f"dualpipe_ext_agree_{os.getpid()}_{nonce:x}")
        try:
            with open(path, "wb") as f:
                f.truncate(file_size(size))
            created = 1
        except OSError:
            path = None
    mine = torch.tensor([host_identity(), os.getpid(), nonce, created], dtype=torch.int64)
    rows = [torch.empty_like(mine) for _ in range(size)]
    try:
        wait_for(dist.all_gather(rows, mine, group=group, async_op=True), wait)
        ids = {int(r[0]) for r in rows}
        if len(ids) != 1 or 0 in ids or int(rows[0][3]) != 1:
            return None
        pid0, nonce0 = int(rows[0][1]), int(rows[0][2])
        mm, failed = None, 0
        try:
            fd = os.open(os.path.join(_DIR, f"dualpipe_ext_agree_{pid0}_{nonce0:x}"), os.O_RDWR)
            try:
                mm = mmap.mmap(fd, file_size(size))
            finally:
                os.close(fd)
        except OSError:
            failed = 1
        flag = torch.tensor([failed], dtype=torch.int64)
        wait_for(dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group, async_op=True), wait)
    finally:
        if path is not None:  # every rank has mapped it, or none will
            os.unlink(path)
    if int(flag[0]):
        if mm is not None:
            mm.close()
        return None
    members = [dist.get_global_rank(group, r) for r in range(size)]
    return HostAgreement(mm, me, size, [int(r[1]) for r in rows], members)
