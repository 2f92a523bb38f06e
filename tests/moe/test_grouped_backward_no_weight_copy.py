"""The grouped experts' backward takes the weights as a transposed view for the input gradient's GEMM:
no copy of every expert's weights per backward, and the same gradients as the per-expert loop."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dualpipe_ext.moe.experts import grouped_linear


class _Copies(TorchDispatchMode):
    """Records the copying operations whose result has ``numel`` elements."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.copies = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        if any(k in name for k in ("clone", "copy", "contiguous")) and isinstance(out, torch.Tensor) \
                and out.numel() == self.numel:
            self.copies.append(name)
        return out


def _run(backend: str, weight: torch.Tensor, x: torch.Tensor, ends: torch.Tensor, grad: torch.Tensor):
    w = weight.clone().requires_grad_(True)
    xi = x.clone().requires_grad_(True)
    out = grouped_linear(xi, w, ends, backend)
    with _Copies(weight.numel()) as mode:
        out.backward(grad)
    return xi.grad, w.grad, mode.copies


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no _grouped_mm")
def test_input_gradient_reads_the_weights_in_place():
    g = torch.Generator().manual_seed(0)
    groups, n, k, rows = 4, 48, 32, 40
    weight = torch.randn(groups, n, k, generator=g)
    x, grad = torch.randn(rows, k, generator=g), torch.randn(rows, n, generator=g)
    ends = torch.tensor([8, 8, 30, 40])
    gx, gw, copies = _run("torch", weight, x, ends, grad)
    assert copies == [], copies
    lx, lw, _ = _run("loop", weight, x, ends, grad)
    torch.testing.assert_close(gx, lx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, lw, rtol=1e-5, atol=1e-5)
