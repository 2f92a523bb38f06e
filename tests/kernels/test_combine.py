import pytest
import torch
from moe_kernel_inputs import error, random_topk_idx

from dualpipe_ext.kernels._common import poison_outputs
from dualpipe_ext.kernels.combine import combine, combine_reference
from dualpipe_ext.kernels.dispatch_layout import dispatch_layout_reference


def _layout(num_tokens, num_topk, num_experts, world, skew=None, drop=0.0):
    topk_idx = random_topk_idx(num_tokens, num_topk, num_experts, skew=skew, drop=drop)
    layout = dispatch_layout_reference(topk_idx, num_experts, world)
    return layout.send_pos, int(layout.num_tokens_per_rank.sum())


def _same_precision_combine(rows, pos, weights):
    """Combine computed entirely in the dtype of rows (the precision peer)."""
    valid = pos >= 0
    picked = rows[pos.clamp(min=0)] * torch.where(valid, weights, 0).to(rows.dtype).unsqueeze(-1)
    out = torch.zeros(pos.shape[0], rows.shape[1], dtype=rows.dtype)
    for c in range(pos.shape[1]):
        out = out + picked[:, c]
    return out


SHAPES = [
    # num_tokens, hidden, num_topk, num_experts, world, drop, skew
    (0, 16, 2, 8, 2, 0.0, None),
    (1, 97, 1, 4, 4, 0.0, None),
    (97, 123, 8, 64, 8, 0.1, None),
    (300, 16, 3, 12, 3, 0.0, "expert"),
    (1025, 3, 2, 32, 8, 0.0, None),  # many tokens, tiny rows
    (33, 1100, 2, 8, 4, 0.3, None),
]


@pytest.mark.parametrize("num_tokens,hidden,num_topk,num_experts,world,drop,skew", SHAPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_combine_fp32(num_tokens, hidden, num_topk, num_experts, world, drop, skew, weighted):
    pos, num_rows = _layout(num_tokens, num_topk, num_experts, world, skew, drop)
    rows = torch.randn(num_rows, hidden)
    weights = torch.rand(pos.shape) if weighted else None
    with poison_outputs():
        out = combine(rows, pos, weights)
    ref = combine_reference(rows, pos, weights)
    assert out.dtype == torch.float32 and out.shape == (num_tokens, hidden)
    single = (pos >= 0).sum(1) <= 1  # sums of at most one term are exact
    assert torch.equal(out[single], ref[single])
    assert torch.allclose(out, ref, rtol=1e-6, atol=1e-6)
    assert torch.all(out[(pos < 0).all(1)] == 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_combine_low_precision(dtype):
    # expand-shaped: 8 columns, all weighted; error at most twice the same-precision peer's
    pos, num_rows = _layout(257, 8, 8, 8, drop=0.1)
    rows = torch.randn(num_rows, 97).to(dtype)
    weights = torch.rand(pos.shape)
    ref64 = combine_reference(rows.double(), pos, weights)
    with poison_outputs():
        out = combine(rows, pos, weights)
    assert out.dtype == dtype
    peer = _same_precision_combine(rows, pos, weights)
    assert error(out, ref64) <= 2 * error(peer, ref64)
    # one rounding of an fp32 sum: within half a unit in the last place of the result
    half_ulp = 2.0 ** -({torch.bfloat16: 8, torch.float16: 11}[dtype])
    assert torch.all((out.double() - ref64).abs() <= half_ulp * ref64.abs() * 1.01 + 1e-6)


@pytest.mark.parametrize("num_sms", [1, 3, None])
def test_combine_num_sms(num_sms):
    pos, num_rows = _layout(77, 4, 16, 4)
    rows = torch.randn(num_rows, 33)
    weights = torch.rand(pos.shape)
    with poison_outputs():
        out = combine(rows, pos, weights, num_sms=num_sms)
    assert torch.equal(out, combine(rows, pos, weights, num_sms=None))
    assert torch.allclose(out, combine_reference(rows, pos, weights), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("num_sms", [None, 3])
def test_combine_backward_fp64(weighted, num_sms):
    pos, num_rows = _layout(123, 3, 12, 3, drop=0.2)
    num_rows += 5  # rows no position names get a zero gradient
    rows = torch.randn(num_rows, 45, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(pos.shape, requires_grad=True) if weighted else None
    inputs = (rows, weights) if weighted else (rows,)
    grad = torch.randn(123, 45, dtype=torch.float64)
    got = torch.autograd.grad(combine(rows, pos, weights, num_sms=num_sms), inputs, grad)
    want = torch.autograd.grad(combine_reference(rows, pos, weights), inputs, grad)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        assert torch.allclose(g, w, rtol=1e-10, atol=1e-6 if g.dtype == torch.float32 else 1e-12)
    assert torch.all(got[0][-5:] == 0)


def test_combine_backward_fp32_weights_only():
    pos, num_rows = _layout(60, 2, 8, 2)
    rows = torch.randn(num_rows, 200)
    weights = torch.rand(pos.shape, requires_grad=True)
    grad = torch.randn(60, 200)
    with poison_outputs():
        (got,) = torch.autograd.grad(combine(rows, pos, weights), weights, grad)
    (want,) = torch.autograd.grad(combine_reference(rows, pos, weights), weights, grad)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-4)
    assert torch.all(got[pos < 0] == 0)


def test_combine_gradcheck():
    pos, num_rows = _layout(4, 2, 8, 4, drop=0.2)
    rows = torch.randn(num_rows, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda r: combine(r, pos), (rows,))


def test_combine_bad_input(monkeypatch):
    monkeypatch.setenv("DUALPIPE_EXT_CHECKS", "1")  # position checks read the host: debug mode
    rows = torch.randn(3, 4)
    pos = torch.tensor([[0, 1], [2, -1]])
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        combine(rows, pos + 1)
    with pytest.raises(ValueError, match="shape of pos"):
        combine(rows, pos, torch.rand(2, 3))
    with pytest.raises(ValueError, match="float32"):
        combine(rows, pos, torch.rand(2, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="int64"):
        combine(rows, pos.int())
