"""The SM partition of an overlapped step: communication kernels keep ``num_comm_sms``
streaming multiprocessors, the computation runs on the rest.

Inside ``sm_partition(device, num_comm_sms)``:

- the package's compute kernels size their persistent grids by ``compute_sms(device)``
  (the Triton grouped GEMM, the CUTLASS grouped GEMM's ``sm_count``);
- cuBLAS leaves ``num_comm_sms`` SMs free through ``torch._C._set_sm_carveout_experimental``
  where the installed torch has it (restored on exit);
- the communication kernels themselves (``EPBuffer``) run ``num_comm_sms`` programs.

NCCL's blocks are bounded where the process group is made: ``nccl_options(num_comm_sms)``
gives options for ``torch.distributed.new_group(..., pg_options=...)``. On CPU there are no
SMs: the partition only sets the grid sizes (which the interpreter runs one after another).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator, Optional

import torch

__all__ = ["sm_partition", "compute_sms", "nccl_options", "device_sms"]

_COMPUTE_SMS: contextvars.ContextVar[Optional[int]] = contextvars.ContextVar("dualpipe_ext_compute_sms", default=None)


def device_sms(device: torch.device) -> Optional[int]:
    """Streaming multiprocessors of a CUDA device (None elsewhere)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


def compute_sms(device: torch.device) -> Optional[int]:
    """The SM budget of compute kernels now (None: the whole device)."""
    return _COMPUTE_SMS.get()


@contextlib.contextmanager
def sm_partition(device: torch.device, num_comm_sms: Optional[int]) -> Iterator[Optional[int]]:
    """Within the block, compute kernels leave ``num_comm_sms`` SMs to communication.

    Yields the compute budget (None when ``num_comm_sms`` is None or the device has no SMs).
    """
    if num_comm_sms is None:
        yield None
        return
    total = device_sms(device)
    budget = max(1, total - num_comm_sms) if total is not None else None
    token = _COMPUTE_SMS.set(budget)
    carveout = getattr(torch._C, "_set_sm_carveout_experimental", None) if total is not None else None
    previous = getattr(torch._C, "_get_sm_carveout_experimental", lambda: None)() if carveout else None
    if carveout is not None:
        carveout(num_comm_sms)
    try:
        yield budget
    finally:
        if carveout is not None:
            carveout(previous)
        _COMPUTE_SMS.reset(token)


def nccl_options(num_comm_sms: int) -> Any:
    """``ProcessGroupNCCL.Options`` whose communicators use at most ``num_comm_sms`` CTAs."""
    import torch.distributed as dist

    options = dist.ProcessGroupNCCL.Options()
    options.config.max_ctas = num_comm_sms
    options.config.min_ctas = min(num_comm_sms, getattr(options.config, "min_ctas", 1) or 1)
    return options
