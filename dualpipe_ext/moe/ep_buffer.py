"""``EPBuffer``: device-side expert parallelism, kernels that move the tokens themselves.

    ep = moe.EPBuffer(group, max_tokens=4096, hidden=7168, dtype=torch.bfloat16, num_sms=20)
    recv_x, recv_idx, recv_weights, handle = ep.dispatch(x, topk_idx, topk_weights, num_experts)
    y = experts(recv_x, recv_idx, recv_weights)     # [ep.recv_capacity, hidden]
    out = ep.combine(y, handle)                      # [num_tokens, hidden]
    ep.dispatch(x, topk_idx, topk_weights, num_experts, fp8=True)   # rows cross as FP8 (docs/fp8.md)

The same meaning as ``moe.dispatch``/``moe.combine``, with fixed shapes: every rank receives
``recv_capacity = max_tokens * world`` rows, segment ``s`` (rows ``[s * max_tokens, (s + 1) *
max_tokens)``) holding the tokens rank ``s`` sent, in token order, then padding rows
(``recv_idx == -1``, zero weights, rows of ``recv_x`` not written: the receiver copies only
received rows). How many rows each rank received stays on the device in
the handle. No collective and no host read of a tensor value per exchange: Triton kernels
write into the peers' symmetric buffers and signal them (``kernels/ep_exchange.py``), a
persistent grid of ``num_sms`` programs being the SM budget; on CUDA on the communication
stream. The one collective is the construction.

The buffer is the public face of parts with one job each: ``ep_memory`` (the symmetric buffers,
allocated collectively once), ``ep_exchanges`` (slots, epochs, launching the kernels and waiting),
``ep_board`` (bad input agreed on every rank, missing peers named, the buffer broken after a
timeout) and ``ep_ops`` (``dispatch`` and ``combine`` with their autograd, over this class's public
exchanges: ``exchange``, ``combine_shaped`` and the backward exchanges).

Up to ``num_slots`` exchanges of each shape can be in flight (``async_op=True``) and waited on
in any order; every use of a slot launches the same kernels with the same arguments (CUDA graphs
can replay them). Bad input (too many tokens, wrong hidden size, dtype, device, top-k) is decided
from shapes on the host and raises the same ``ValueError`` on every rank at the exchange's wait
(no device read); a wait that expires (``timeout_s``) raises ``EPBufferError`` naming the missing
ranks, and the buffer is unusable afterwards. ``DUALPIPE_EXT_CHECKS=1`` synchronises at every
wait on CUDA.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

import torch
import torch.distributed as dist

from dualpipe_ext.kernels._common import WIRE_DTYPES, new_output

from .ep_board import EPBufferError, ExchangeBoard, board_rows
from .ep_errors import EPError
from .ep_exchanges import Exchanges
from .ep_memory import allocate

__all__ = ["EPBuffer", "EPHandle", "EPBufferError"]


@dataclass(frozen=True)
class EPHandle:
    """What ``combine`` and the backward exchanges need of one ``dispatch``; tensors stay on the device."""

    pos: torch.Tensor  # [num_tokens, world] int64: row of token t in rank r's segment, -1 if not sent there
    send_counts: torch.Tensor  # [world] int64: tokens sent to each rank
    topk_idx: torch.Tensor  # [num_tokens, num_topk] int64: the dispatched global expert ids
    recv_src: torch.Tensor  # [recv_capacity] int64: source token of each received row, -1 for padding
    recv_count: torch.Tensor  # [world] int64: rows received from each rank
    num_experts: int
    buffer: "EPBuffer"

    @property
    def num_tokens(self) -> int:
        return self.pos.shape[0]

    @property
    def num_topk(self) -> int:
        return self.topk_idx.shape[1]


class EPBuffer:
    """Symmetric buffers of one expert-parallel group and the exchanges that use them.

    Args:
        group: the expert-parallel process group (None: the default group); all on one host.
        max_tokens: most tokens any rank dispatches in one call.
        hidden: row width of dispatched tokens and combined outputs.
        dtype: dtype of the rows.
        num_sms: programs of every exchange kernel (the SM budget on CUDA; default 20 there, 1 on CPU).
        max_topk: most experts a token may choose.
        num_slots: exchanges of each shape that may be in flight at once.
        timeout_s: how long a wait for a peer lasts before it raises.
        device: where the buffers live (default: the current CUDA device for an NCCL group, else CPU).
    """

    def __init__(self, group=None, max_tokens: int = 0, hidden: int = 0, dtype: torch.dtype = torch.bfloat16,
                 num_sms: Optional[int] = None, *, max_topk: int = 8, num_slots: int = 2, timeout_s: float = 120.0,
                 device: Optional[torch.device] = None) -> None:
        for name, value in (("max_tokens", max_tokens), ("hidden", hidden), ("max_topk", max_topk),
                            ("num_slots", num_slots)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"EPBuffer: {name} must be a positive int, got {value!r}")
        if dtype not in WIRE_DTYPES:
            raise ValueError(f"EPBuffer: dtype must be one of {WIRE_DTYPES}, got {dtype!r}")
        if num_sms is not None and (not isinstance(num_sms, int) or isinstance(num_sms, bool) or num_sms < 1):
            raise ValueError(f"EPBuffer: num_sms must be a positive int or None, got {num_sms!r}")
        if not timeout_s > 0:
            raise ValueError(f"EPBuffer: timeout_s must be positive, got {timeout_s!r}")
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("EPBuffer needs torch.distributed initialised (its group exchanges buffer handles once)")
        self.group = group if group is not None else dist.distributed_c10d._get_default_group()
        self.world, self.rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        if device is None:
            device = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(self.group) == "nccl"
                      else torch.device("cpu"))
        self.device = torch.device(device)
        _check_kernels_available(self.device)
        from dualpipe_ext.kernels import ep_exchange as kx

        self._kx = kx
        self.max_tokens, self.hidden, self.dtype, self.max_topk = max_tokens, hidden, dtype, max_topk
        self.num_slots, self.timeout_s = num_slots, float(timeout_s)
        self.num_sms = num_sms if num_sms is not None else (20 if self.device.type == "cuda" else 1)
        self.layout = kx.ExchangeLayout.build(self.world, max_tokens, hidden, max_topk, num_slots,
                                              torch.empty(0, dtype=dtype).element_size())
        request = (max_tokens, hidden, str(dtype), self.num_sms, max_topk, num_slots, self.device.type)
        self._mem = allocate(self.group, self.layout.nbytes, 2 * self.world + 1, self.device, request,
                             board_rows(num_slots))
        global_ranks = [dist.get_global_rank(self.group, p) for p in range(self.world)]
        self._board = ExchangeBoard(self._mem, self.rank, self.world, global_ranks, self.timeout_s)
        self._exchanges = Exchanges(kx, self._mem, self.layout, self._board, self.rank, num_slots, self.num_sms,
                                    self.timeout_s, self.device)

    # Properties and lifecycle -----------------------------------------------------------

    @property
    def recv_capacity(self) -> int:
        """Rows every dispatch delivers (and every combine takes): ``max_tokens * world``."""
        return self.max_tokens * self.world

    def close(self) -> None:
        """Release the buffers (and any shared-memory file left); the buffer is unusable afterwards."""
        if self._mem is not None:
            self._mem.close()
            self._mem = None
        self._board.broken = self._board.broken or "it was closed"

    def __enter__(self) -> "EPBuffer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"EPBuffer(rank {self.rank} of {self.world}, max_tokens={self.max_tokens}, hidden={self.hidden}, "
                f"dtype={self.dtype}, num_sms={self.num_sms}, device={self.device})")

    # Exchanges --------------------------------------------------------------------------

    @property
    def kernels(self):
        """The exchange kernels' module (``dualpipe_ext.kernels.ep_exchange``) the buffer launches."""
        return self._kx

    @property
    def fp8_row_bytes(self) -> int:
        """Bytes an FP8-dispatched row moves: ``hidden`` e4m3 bytes and ``4 * ceil(hidden / 128)`` bytes of
        float32 scales, padded with zeros to a multiple of 16 (the kernels move 128-bit vectors)."""
        return -(-(self.hidden + 4 * -(-self.hidden // 128)) // 16) * 16

    def combine_backward(self, grad_out: torch.Tensor, handle: EPHandle, async_op: bool = False):
        """Gradient of ``combine``: each token's ``grad_out`` row [num_tokens, hidden] copied to the ranks
        it was dispatched to. Returns [recv_capacity, hidden] (zero padding rows), or an ``InFlight``."""
        code, detail = self.check_rows(grad_out, getattr(handle, "num_tokens", -1), "grad_out", handle)
        kx = self._kx
        out = new_output((self.recv_capacity, self.hidden), self.dtype, self.device)
        count = new_output((self.world,), torch.int64, self.device)
        if code == 0:
            x, pos, counts = grad_out.contiguous(), handle.pos, handle.send_counts
        else:
            x, pos, counts = self.placeholder_rows(), self.placeholder_pos(), count.zero_()

        def put(ch):
            kx.launch_put_dispatch(ch, x, pos, counts, None, 0, 0, int(code))

        def recv(ch):
            kx.launch_recv_dispatch(ch, out, None, count, 0)

        agree = (handle.num_experts, handle.num_topk) if code == 0 else (0, 0)
        return self.exchange(kx.DISPATCH, "combine backward", code, detail, agree, put, recv, lambda: out,
                             (x, pos, counts, out, count), async_op)

    def dispatch_backward(self, grad_recv_x: torch.Tensor, grad_recv_weights: torch.Tensor, handle: EPHandle,
                          async_op: bool = False):
        """Gradient of ``dispatch``: [recv_capacity, hidden] row gradients and [recv_capacity, num_topk] weight
        gradients back to the tokens' owners. Returns ``(grad_x [num_tokens, hidden], grad_topk_weights
        [num_tokens, num_topk] float32)``, or an ``InFlight``."""
        code, detail = self.check_rows(grad_recv_x, self.recv_capacity, "grad_recv_x", handle)
        if code == 0 and (not isinstance(grad_recv_weights, torch.Tensor) or grad_recv_weights.dtype != torch.float32
                          or tuple(grad_recv_weights.shape) != (self.recv_capacity, handle.num_topk)):
            code, detail = EPError.TOPK_WEIGHTS, (
                f"grad_recv_weights must be [{self.recv_capacity}, {handle.num_topk}] float32, got "
                f"{getattr(grad_recv_weights, 'dtype', None)} "
                f"{tuple(getattr(grad_recv_weights, 'shape', ()))}")
        return self.combine_shaped("dispatch backward", grad_recv_x, grad_recv_weights, handle, code, detail,
                                   async_op)

    # The raw exchanges' pieces, on which ``ep_ops`` builds dispatch and combine ----------

    def combine_shaped(self, what: str, y: torch.Tensor, grad_w: Optional[torch.Tensor], handle: EPHandle,
                       code: int, detail: Optional[str], async_op: bool, wrap: Optional[Callable] = None):
        """One combine-shaped exchange of ``y`` [recv_capacity, hidden] (and ``grad_w`` [recv_capacity, num_topk]
        float32) back to the tokens' owners; ``wrap`` turns the [num_tokens, hidden] sum into the result."""
        kx = self._kx
        dev = self.device
        if code == 0:
            rows, src, pos, idx = y.contiguous(), handle.recv_src, handle.pos, handle.topk_idx
            recv_count, num_experts, num_topk = handle.recv_count, handle.num_experts, handle.num_topk
            gw = grad_w.contiguous() if grad_w is not None else None
        else:  # take part with no rows, so that every rank's slots stay in step
            rows, pos = self.placeholder_rows(self.recv_capacity), self.placeholder_pos()
            src = torch.full((self.recv_capacity,), -1, dtype=torch.int64, device=dev)
            idx, num_experts, num_topk, gw = torch.zeros(0, 1, dtype=torch.int64, device=dev), 0, 0, None
            recv_count = torch.zeros(self.world, dtype=torch.int64, device=dev)
        out = new_output((pos.shape[0], self.hidden), self.dtype, dev)
        gw_out = new_output(idx.shape, torch.float32, dev) if gw is not None else None
        count = new_output((self.world,), torch.int64, dev)

        def put(ch):
            kx.launch_put_combine(ch, rows, src, recv_count, gw, num_experts, num_topk, int(code))

        def recv(ch):
            kx.launch_recv_combine(ch, out, pos, (idx, gw_out) if gw_out is not None else None, count,
                                   num_experts if code == 0 else -1, num_topk)

        if wrap is not None:
            result = lambda: wrap(out)  # noqa: E731
        else:
            result = (lambda: (out, gw_out)) if grad_w is not None else (lambda: out)
        return self.exchange(kx.COMBINE, what, code, detail, (num_experts, num_topk), put, recv, result,
                             (rows, gw, src, recv_count, pos, idx, out, gw_out, count), async_op)

    def placeholder_rows(self, n: int = 0) -> torch.Tensor:
        """[n, hidden] zeros: the rows of a rank that takes part in an exchange without data."""
        return torch.zeros(n, self.hidden, dtype=self.dtype, device=self.device)

    def placeholder_pos(self) -> torch.Tensor:
        """[0, world] int64: the positions of a rank that takes part in an exchange without data."""
        return torch.full((0, self.world), -1, dtype=torch.int64, device=self.device)

    def check_rows(self, t: Any, rows: int, name: str, handle: Any) -> Tuple[EPError, Optional[str]]:
        """Host check of a row tensor and a handle (shapes only): (error code, detail)."""
        if not isinstance(handle, EPHandle) or handle.buffer is not self:
            return EPError.HANDLE, f"the handle must come from this buffer's dispatch, got {type(handle).__name__}"
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] != rows:
            return EPError.ROWS, f"{name} must be [{rows}, {self.hidden}], got {tuple(getattr(t, 'shape', ()))}"
        return self.check_payload(t, name)

    def check_payload(self, t: torch.Tensor, name: str) -> Tuple[EPError, Optional[str]]:
        """Host check that a 2-d tensor of rows fits the buffer's hidden size, dtype and device."""
        if t.shape[1] != self.hidden:
            return EPError.HIDDEN, f"{name} has hidden size {t.shape[1]}, the buffer {self.hidden}"
        if t.dtype != self.dtype:
            return EPError.DTYPE, f"{name} has dtype {t.dtype}, the buffer {self.dtype}"
        if t.device != self.device:
            return EPError.DEVICE, f"{name} is on {t.device}, the buffer on {self.device}"
        return EPError.OK, None

    def exchange(self, shape: int, what: str, code: int, detail: Optional[str], agree: Tuple[int, int],
                 put: Callable, recv: Callable, result: Callable, keep_alive: tuple, async_op: bool):
        """Run one raw exchange (``ep_exchanges.Exchanges.run``): ``put(channel)`` now, ``recv(channel)`` now
        (CUDA: on the communication stream) or at ``wait()``, then ``result()``.

        ``shape``: ``kernels.DISPATCH`` or ``kernels.COMBINE``; ``code``: this rank's error code (0: good
        input); ``agree``: (num_experts, num_topk), which every rank must have passed alike."""
        return self._exchanges.run(shape, what, code, detail, agree, put, recv, result, keep_alive, async_op)


def _check_kernels_available(device: torch.device) -> None:
    from dualpipe_ext.kernels._common import _interpreting, triton_available

    if not triton_available():
        raise ImportError("EPBuffer needs the 'triton' package, which is not installed: pip install -e \".[triton]\"")
    if device.type == "cpu" and not _interpreting():
        raise ValueError("EPBuffer on CPU runs its Triton kernels in the interpreter: set TRITON_INTERPRET=1 before "
                         "triton is first imported")
