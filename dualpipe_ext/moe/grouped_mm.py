"""Grouped GEMMs of the expert MLPs, on the fastest correct path of the device.

``grouped_mm(x, w, group_ends)``: ``out[rows of g] = x[rows of g] @ w[g]^T`` (forward and
input gradient); ``grouped_wgrad(grad, x, group_ends)``: ``dw[g] = grad[rows of g]^T @ x[rows of g]``
(weight gradient). Backends, "auto" trying them in this order:

- "torch": ``torch._grouped_mm`` (CUDA sm90+, bf16, 16-byte aligned sizes);
- "cutlass": the CUTLASS sm90 kernel of ``dualpipe_ext._cuda`` when it was built (bf16);
- "triton": ``kernels.grouped_mm`` (CUDA, or CPU tensors with ``DUALPIPE_EXT_TRITON=1`` under
  ``TRITON_INTERPRET=1``);
- "loop": one matmul per group (CPU, and anything else); it reads the group ends on the host.

Every backend but "loop" keeps the group ends on the device, so capacity-sized buffers
(rows past the last end are not computed) run without a host read. ``num_comm_sms``
(None: no budget) is the communication's SMs: the Triton kernels' persistent grids and
CUTLASS's ``sm_count`` take the rest, ``sm_budget.compute_sms(device, num_comm_sms)``
(``torch._grouped_mm`` runs on cuBLAS's carveout, ``sm_budget.sm_partition``).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from dualpipe_ext import sm_budget

__all__ = ["BACKENDS", "grouped_mm", "grouped_wgrad", "pick_backend", "cutlass_grouped_mm", "cuda_extension",
           "require_cuda_extension"]

BACKENDS = ("auto", "torch", "cutlass", "triton", "loop")


@functools.lru_cache(maxsize=None)
def cuda_extension():
    """The built ``dualpipe_ext._cuda`` module, or None."""
    try:
        from dualpipe_ext import _cuda  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _cuda


def require_cuda_extension():
    """``dualpipe_ext._cuda``, or an ImportError of one line saying how to build it."""
    ext = cuda_extension()
    if ext is None:
        raise ImportError("gemm backend 'cutlass' needs the CUDA extension dualpipe_ext._cuda, which is not built: "
                          "DUALPIPE_EXT_CUDA=1 pip install --no-build-isolation -e . (needs nvcc and a CUDA build "
                          "of torch; backend 'auto' picks another path without it)")
    return ext


def _sm90(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9


def _aligned(*sizes: int) -> bool:
    return all(s % 8 == 0 for s in sizes)  # 16 bytes of bf16


def pick_backend(x: torch.Tensor, w: torch.Tensor, backend: str = "auto") -> str:
    """Backend ``grouped_mm`` uses for these operands under ``backend``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if not x.is_cuda:  # the Triton kernels run on CPU tensors only when forced (interpreter)
        from dualpipe_ext.kernels._common import use_triton

        return "triton" if use_triton("auto", x) else "loop"
    fast_ok = x.dtype == torch.bfloat16 and _sm90(x.device) and _aligned(x.shape[1], w.shape[1])
    if fast_ok and hasattr(torch, "_grouped_mm"):
        return "torch"
    if fast_ok and cuda_extension() is not None:
        return "cutlass"
    from dualpipe_ext.kernels._common import triton_available

    return "triton" if triton_available() else "loop"


def _loop(x: torch.Tensor, w: torch.Tensor, group_ends: torch.Tensor) -> torch.Tensor:
    out = x.new_empty(x.shape[0], w.shape[1])
    begin = 0
    for g, end in enumerate(group_ends.tolist()):
        if end > begin:
            torch.matmul(x[begin:end], w[g].t(), out=out[begin:end])
        begin = end
    return out


def cutlass_grouped_mm(x: torch.Tensor, w: torch.Tensor, group_ends: torch.Tensor,
                       num_comm_sms: Optional[int] = None) -> torch.Tensor:
    """``out[rows of g] = x[rows of g] @ w[g]^T`` by the CUTLASS sm90 kernel (bf16, CUDA).

    CPU tensors run the PyTorch reference (``kernels.grouped_mm.grouped_mm_reference``),
    which defines what the kernel computes. x [rows, k], w [groups, n, k], group_ends [groups].
    The kernel's ``sm_count`` leaves ``num_comm_sms`` SMs free (0: the whole device).
    """
    from dualpipe_ext.kernels.grouped_mm import grouped_mm_reference

    if not x.is_cuda:
        return grouped_mm_reference(x, w, group_ends)
    ext = require_cuda_extension()
    with torch.cuda.device(x.device):
        return ext.grouped_mm_bf16(x, w, group_ends.to(torch.int32), torch.cuda.current_stream().cuda_stream,
                                   sm_budget.compute_sms(x.device, num_comm_sms) or 0)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, group_ends: torch.Tensor, backend: str = "auto",
               num_comm_sms: Optional[int] = None) -> torch.Tensor:
    """``out[rows of g] = x[rows of g] @ w[g]^T``, leaving ``num_comm_sms`` SMs to communication.

    x: [num_rows, k]; w: [num_groups, n, k] same dtype; group_ends: [num_groups] int
    cumulative row counts ending at num_rows. Returns [num_rows, n].
    """
    which = pick_backend(x, w, backend)
    if which == "torch":
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=group_ends.to(torch.int32))
    if which == "cutlass":
        return cutlass_grouped_mm(x, w.contiguous(), group_ends, num_comm_sms)
    if which == "triton":
        from dualpipe_ext.kernels.grouped_mm import grouped_mm

        return grouped_mm(x, w.contiguous(), group_ends, num_sms=sm_budget.compute_sms(x.device, num_comm_sms),
                          impl="triton")
    return _loop(x, w, group_ends)


def grouped_wgrad(grad: torch.Tensor, x: torch.Tensor, group_ends: torch.Tensor, backend: str = "auto",
                  num_comm_sms: Optional[int] = None) -> torch.Tensor:
    """``dw[g] = grad[rows of g]^T @ x[rows of g]``: [num_groups, n, k] from grad [rows, n], x [rows, k],
    leaving ``num_comm_sms`` SMs to communication."""
    num_groups = group_ends.shape[0]
    which = pick_backend(x, grad.new_empty(1, grad.shape[1]), backend)
    if which == "torch" and _aligned(grad.shape[1], x.shape[1]):
        return torch._grouped_mm(grad.t(), x, offs=group_ends.to(torch.int32))
    if which == "triton":
        from dualpipe_ext.kernels.grouped_mm import grouped_wgrad as triton_wgrad

        return triton_wgrad(grad.contiguous(), x.contiguous(), group_ends,
                            num_sms=sm_budget.compute_sms(x.device, num_comm_sms), impl="triton")
    dw = grad.new_zeros(num_groups, grad.shape[1], x.shape[1])
    begin = 0
    for g, end in enumerate(group_ends.tolist()):
        if end > begin:
            torch.matmul(grad[begin:end].t(), x[begin:end], out=dw[g])
        begin = end
    return dw
