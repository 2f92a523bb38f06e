"""Device-side expert-parallel exchanges: kernels that write rows into the peers' buffers.

Every rank of an expert-parallel group owns one symmetric buffer (the same layout on every
rank, see ``ExchangeLayout``); a kernel reaches a peer's buffer through ``table``, an int64
tensor of every rank's base address. Two exchange shapes, each with ``num_slots`` slots so
that several exchanges can be in flight:

- **dispatch-shaped** (token owner -> expert ranks): source ``s`` writes token ``t``'s row
  into rank ``r``'s ``dispatch`` region at ``[slot, s, j]``, ``j`` = the rank of ``t``
  among the tokens ``s`` sends to ``r`` (each token once per rank). With routes, the local
  expert indices and weights of the token on ``r`` and ``t`` itself travel beside the row.
  The receiver copies the received rows out into capacity-sized outputs (``world * max_tokens``
  rows, segment ``s`` holding what ``s`` sent; rows past a segment's count are padding: not
  written, index -1, weight 0, source -1).
- **combine-shaped** (expert ranks -> token owner): expert rank ``r`` writes the row of
  received row ``(s, j)`` into ``s``'s ``combine`` region at ``[slot, r, t]``; the owner
  sums, for every token, the rows of the ranks it went to (fp32, rank order), and with
  weight gradients picks each slot's value from the rank holding its expert.

Loads of what peers wrote bypass L1 (``.cg``), which is not coherent with their writes.

Signals instead of collectives: after its puts every program of a sender adds 1 to the
receiver's data counter for ``(shape, slot, sender)`` (release); the receiver waits until
the counter equals ``(uses + 1) * num_programs`` (acquire), copies the rows out, and adds 1
to every sender's ack counter, which the sender waits on (``uses * num_programs``) before it
reuses the slot. ``uses``, the completed uses of ``(shape, slot)``, is a device word that
the kernels read and that is advanced after each receive, in stream order: no launch
argument changes from one use of a slot to the next, so a captured CUDA graph replays, and
no argument that changes between exchanges is specialised on, so nothing recompiles.
Counters only grow, so a stale signal is never taken for a new one. A row count travels in
the metadata words before the signal. Every wait is bounded by ``timeout_ns``; a wait that
expires writes which peers are missing into the host-visible ``status`` words.

Bandwidth: rows move as 128-bit accesses (addresses read from ``table`` are declared
16-byte aligned, row starts multiples of ``VEC`` elements); receivers touch only the
blocks that hold received rows; ``NUM_WARPS_*`` say how wide a program is. Dispatch-shaped
exchanges may move narrower rows of another element type in the same slots (FP8 dispatch:
packed e4m3 bytes and scales as int32 words, padded to 16 bytes; see ``row_geometry``), which
the receive kernel dequantizes on the way out of the slot (``fp8_row_geometry``).

Under ``TRITON_INTERPRET=1`` the programs of one launch run one after another, so puts
and waits on the receiving side are separate launches; no program waits for a later
program of its own launch. ``*_reference`` functions at the end define what a whole
group's exchange computes, in plain PyTorch.
"""
from __future__ import annotations

from .ep_combine import combine_exchange_reference, launch_put_combine, launch_recv_combine
from .ep_common import (ACK, COMBINE, DATA, DISPATCH, DO_NOT_SPECIALIZE, HAS_POLL, META_FIELDS, NUM_WARPS_PUT,
                        NUM_WARPS_RECV, NUM_WARPS_WAIT, Channel, ExchangeLayout, advance_epoch, compact_positions,
                        launch_wait, row_vec)
from .ep_dispatch import dispatch_exchange_reference, fp8_row_geometry, launch_put_dispatch, launch_recv_dispatch

try:  # the kernels themselves, for the compile check
    from .ep_combine import _put_combine_kernel, _recv_combine_kernel  # noqa: F401
    from .ep_dispatch import _put_dispatch_kernel, _recv_dispatch_kernel  # noqa: F401
except ImportError:  # no Triton: the references only
    pass

__all__ = ["ExchangeLayout", "Channel", "DISPATCH", "COMBINE", "DATA", "ACK", "META_FIELDS", "HAS_POLL",
           "NUM_WARPS_PUT", "NUM_WARPS_RECV", "NUM_WARPS_WAIT", "DO_NOT_SPECIALIZE", "row_vec", "advance_epoch",
           "launch_wait", "launch_put_dispatch", "launch_recv_dispatch", "fp8_row_geometry", "launch_put_combine", "launch_recv_combine",
           "compact_positions", "dispatch_exchange_reference", "combine_exchange_reference"]
