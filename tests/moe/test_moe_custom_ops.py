"""permute, unpermute and combine as torch.library custom ops: opcheck, and torch.compile
(aot_eager, fullgraph) gives the values and gradients of eager on the CPU reference path."""
from __future__ import annotations

import pytest
import torch

from dualpipe_ext.kernels.combine import combine, combine_backward_op, combine_op
from dualpipe_ext.kernels.dispatch_layout import dispatch_layout_reference
from dualpipe_ext.kernels.permute import permute, permute_op, unpermute, unpermute_op


def _layout(num_tokens=13, num_topk=3, num_experts=8, world=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(num_tokens, num_experts, generator=g).argsort(1)[:, :num_topk].contiguous()
    idx[::3, -1] = -1  # unused slots
    layout = dispatch_layout_reference(idx, num_experts, world)
    return layout.send_pos, int(layout.num_tokens_per_rank.sum())


def test_ops_are_registered_under_the_project_namespace():
    for name in ("permute", "unpermute", "combine", "combine_backward"):
        assert hasattr(torch.ops.dualpipe_ext, name), name


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_opcheck(dtype):
    send_pos, num_rows = _layout()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(send_pos.shape[0], 6, generator=g, dtype=dtype, requires_grad=True)
    rows = torch.randn(num_rows, 6, generator=g, dtype=dtype, requires_grad=True)
    w = torch.rand(send_pos.shape, generator=g, requires_grad=True)
    grad = torch.randn(send_pos.shape[0], 6, generator=g, dtype=dtype)
    cases = [
        (permute_op, (x, send_pos, num_rows, None, True, False)),
        (unpermute_op, (rows, send_pos, None, True, False)),
        (combine_op, (rows, send_pos, w, None, True, False)),
        (combine_op, (rows, send_pos, None, 2, False, False)),
        (combine_backward_op, (grad, rows.detach(), send_pos, w.detach(), num_rows, None, False, True, True)),
        (combine_backward_op, (grad, None, send_pos, None, num_rows, None, False, True, False)),
    ]
    for op, args in cases:
        result = torch.library.opcheck(op, args)
        assert set(result.values()) == {"SUCCESS"}, (op, result)


def _block(x, rows, w, send_pos, num_rows):
    """Uses every op: permute to send buffer, some math, unpermute back, weighted combine."""
    buf = permute(x, send_pos, num_rows)
    h = torch.tanh(buf) * 1.5 + rows
    return unpermute(h, send_pos) + combine(h * rows, send_pos, w) * x


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_compile_fullgraph_matches_eager(dtype):
    send_pos, num_rows = _layout(num_tokens=29)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(send_pos.shape[0], 7, generator=g, dtype=dtype)
    rows = torch.randn(num_rows, 7, generator=g, dtype=dtype)
    w = torch.rand(send_pos.shape, generator=g)
    grad = torch.randn(send_pos.shape[0], 7, generator=g, dtype=dtype)

    def run(fn):
        leaves = [t.clone().requires_grad_(True) for t in (x, rows, w)]
        out = fn(*leaves, send_pos, num_rows)
        grads = torch.autograd.grad(out, leaves, grad)
        return out.detach(), grads

    torch._dynamo.reset()
    compiled = torch.compile(_block, backend="aot_eager", fullgraph=True)
    want_out, want_grads = run(_block)
    got_out, got_grads = run(compiled)
    # the same operations in the same order: equal bit for bit
    assert torch.equal(got_out, want_out)
    for got, want in zip(got_grads, want_grads):
        assert got is not None and torch.equal(got, want)
    # and the eager custom-op path agrees with the plain reference functions
    from dualpipe_ext.kernels.combine import combine_reference
    from dualpipe_ext.kernels.permute import permute_reference, unpermute_reference

    def reference(x, rows, w, send_pos, num_rows):
        buf = permute_reference(x, send_pos, num_rows)
        h = torch.tanh(buf) * 1.5 + rows
        return unpermute_reference(h, send_pos) + combine_reference(h * rows, send_pos, w) * x

    ref_out, ref_grads = run(reference)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(want_out, ref_out, **tol)
    for got, want in zip(want_grads, ref_grads):
        torch.testing.assert_close(got, want, **tol)


def test_bad_positions_raise_inside_compiled_code(monkeypatch):
    monkeypatch.setenv("DUALPIPE_EXT_CHECKS", "1")  # value checks read the host: debug mode
    send_pos, num_rows = _layout()
    x = torch.randn(send_pos.shape[0], 4)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, p: permute(x, p, num_rows), backend="aot_eager", fullgraph=True)
    bad = send_pos.clone()
    bad[0, bad[0].argmax()] = num_rows
    with pytest.raises(ValueError, match=rf"send_pos entries must be -1 or in \[0, {num_rows}\)"):
        compiled(x, bad)
