"""The communication SM budget ``num_comm_sms``: one value, one name, one validator.

``num_comm_sms`` is set once (``OverlapConfig.num_comm_sms``, or ``MoE(num_comm_sms=...)``)
and passed explicitly, as an argument, to everything it limits:

- the communication kernels (token packing, combining, expanding; an ``EPBuffer``'s exchange)
  run ``num_comm_sms`` programs: it is their grid (the kernels' ``num_sms`` argument);
- the grouped GEMMs of the experts, forward and backward (the autograd functions keep it in
  their context), size their persistent grids by ``compute_sms(device, num_comm_sms)``, the
  device's SMs minus the communication's (the Triton kernels' ``num_sms``, the CUTLASS
  kernel's ``sm_count``);
- cuBLAS leaves ``num_comm_sms`` SMs free inside ``sm_partition(device, num_comm_sms)`` (the
  overlapped steps of a stage), through ``torch._C._set_sm_carveout_experimental`` where the
  installed torch has it (restored on exit).

NCCL's blocks are bounded where the process group is made: ``nccl_options(num_comm_sms)``
gives options for ``torch.distributed.new_group(..., pg_options=...)``. On CPU there are no
SMs: the GEMMs' budget is None (the whole device).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch

__all__ = ["check_num_comm_sms", "sm_partition", "compute_sms", "nccl_options", "device_sms"]


def check_num_comm_sms(value: Any, name: str = "num_comm_sms") -> None:
    """Raise ValueError unless ``value`` is None or a positive int (not a bool); ``name`` says whose."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be None or a positive int, got {value!r}")


def device_sms(device: torch.device) -> Optional[int]:
    """Streaming multiprocessors of a CUDA device (None elsewhere)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


def compute_sms(device: torch.device, num_comm_sms: Optional[int]) -> Optional[int]:
    """SMs the compute kernels on ``device`` may use beside ``num_comm_sms`` of communication
    (None: the whole device, when ``num_comm_sms`` is None or the device has no SMs)."""
    if num_comm_sms is None:
        return None
    total = device_sms(device)
    return max(1, total - num_comm_sms) if total is not None else None


@contextlib.contextmanager
def sm_partition(device: torch.device, num_comm_sms: Optional[int]) -> Iterator[Optional[int]]:
    """Within the block, cuBLAS leaves ``num_comm_sms`` SMs to communication.

    Yields ``compute_sms(device, num_comm_sms)``. The package's own kernels do not read it
    from here: they take the budget as an argument.
    """
    budget = compute_sms(device, num_comm_sms)
    if budget is None:
        yield None
        return
    carveout = getattr(torch._C, "_set_sm_carveout_experimental", None)
    previous = getattr(torch._C, "_get_sm_carveout_experimental", lambda: None)() if carveout else None
    if carveout is not None:
        carveout(num_comm_sms)
    try:
        yield budget
    finally:
        if carveout is not None:
            carveout(previous)


def nccl_options(num_comm_sms: int) -> Any:
    """``ProcessGroupNCCL.Options`` whose communicators use at most ``num_comm_sms`` CTAs."""
    import torch.distributed as dist

    check_num_comm_sms(num_comm_sms)
    options = dist.ProcessGroupNCCL.Options()
    options.config.max_ctas = num_comm_sms
    options.config.min_ctas = min(num_comm_sms, getattr(options.config, "min_ctas", 1) or 1)
    return options
