import pytest
import torch
from moe_kernel_inputs import error, random_topk_idx

from dualpipe_ext.kernels._common import poison_outputs
from dualpipe_ext.kernels.dispatch_layout import dispatch_layout_reference
from dualpipe_ext.kernels.permute import permute, permute_reference, unpermute, unpermute_reference

SHAPES = [
    # num_tokens, hidden, num_topk, num_experts, world, skew
    (0, 16, 2, 8, 2, None),
    (1, 97, 1, 4, 4, None),
    (97, 123, 8, 64, 8, None),
    (300, 16, 3, 12, 3, "expert"),
    (1025, 3, 2, 32, 8, None),  # many tokens, tiny rows
    (33, 1100, 2, 8, 4, None),  # rows longer than one chunk
]


def _layout(num_tokens, num_topk, num_experts, world, skew=None, drop=0.0):
    topk_idx = random_topk_idx(num_tokens, num_topk, num_experts, skew=skew, drop=drop)
    layout = dispatch_layout_reference(topk_idx, num_experts, world)
    return layout.send_pos, int(layout.num_tokens_per_rank.sum())


@pytest.mark.parametrize("num_tokens,hidden,num_topk,num_experts,world,skew", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_permute_bitwise(num_tokens, hidden, num_topk, num_experts, world, skew, dtype):
    send_pos, num_rows = _layout(num_tokens, num_topk, num_experts, world, skew)
    x = torch.randn(num_tokens, hidden).to(dtype)
    with poison_outputs():
        out = permute(x, send_pos, num_rows)
    assert out.dtype == dtype and out.shape == (num_rows, hidden)
    assert torch.equal(out, permute_reference(x, send_pos, num_rows))  # a copy: exact in any dtype


def test_permute_fp16_expand_layout():
    # expand-shaped positions: one column per top-k slot, some empty
    recv_idx = random_topk_idx(150, 4, 6, drop=0.3)
    layout = dispatch_layout_reference(recv_idx, 6, 6)
    expand_pos = torch.where(recv_idx >= 0, layout.send_pos.gather(1, recv_idx.clamp(min=0)), -1)
    x = torch.randn(150, 40, dtype=torch.float16)
    num_rows = int((recv_idx >= 0).sum())
    with poison_outputs():
        out = permute(x, expand_pos, num_rows)
    assert torch.equal(out, permute_reference(x, expand_pos, num_rows))


@pytest.mark.parametrize("num_sms", [1, 3, None])
def test_permute_num_sms(num_sms):
    send_pos, num_rows = _layout(77, 4, 16, 4)
    x = torch.randn(77, 33)
    with poison_outputs():
        out = permute(x, send_pos, num_rows, num_sms=num_sms)
    assert torch.equal(out, permute_reference(x, send_pos, num_rows))


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, None), (torch.float16, None)])
def test_unpermute_forward(dtype, atol):
    send_pos, num_rows = _layout(211, 4, 16, 4, drop=0.2)
    grad_out = torch.randn(num_rows, 97)
    ref64 = unpermute_reference(grad_out.double(), send_pos)
    with poison_outputs():
        got = unpermute(grad_out.to(dtype), send_pos)
    assert got.dtype == dtype
    if atol is not None:
        assert error(got, ref64) <= atol
    else:
        # at most twice the error of summing in the same precision with torch
        same_precision = torch.zeros(211, 97, dtype=dtype).index_add(
            0,
            torch.arange(211).unsqueeze(1).expand_as(send_pos)[send_pos >= 0],
            grad_out.to(dtype)[send_pos[send_pos >= 0]],
        )
        assert error(got, ref64) <= 2 * error(same_precision, ref64) + 1e-6


@pytest.mark.parametrize("num_sms", [None, 3])
def test_permute_backward_fp64(num_sms):
    send_pos, num_rows = _layout(123, 3, 12, 3, drop=0.2)
    x = torch.randn(123, 45, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(num_rows, 45, dtype=torch.float64)
    (got,) = torch.autograd.grad(permute(x, send_pos, num_rows, num_sms=num_sms), x, grad)
    (want,) = torch.autograd.grad(permute_reference(x, send_pos, num_rows), x, grad)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


def test_permute_gradcheck():
    send_pos, num_rows = _layout(4, 2, 8, 4)
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: permute(x, send_pos, num_rows), (x,))


def test_permute_bad_input(monkeypatch):
    monkeypatch.setenv("DUALPIPE_EXT_CHECKS", "1")  # position checks read the host: debug mode
    x = torch.randn(3, 4)
    pos = torch.tensor([[0], [1], [2]])
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        permute(x, pos, 2)
    with pytest.raises(ValueError, match="one row per token"):
        permute(x, pos[:2], 3)
    with pytest.raises(ValueError, match="int64"):
        permute(x, pos.int(), 3)
    with pytest.raises(ValueError, match="num_sms"):
        permute(x, pos, 3, num_sms=0)
    with pytest.raises(ValueError, match="dtype"):
        permute(x.int(), pos, 3)


@pytest.mark.parametrize("debug", [False, True])
def test_position_checks_follow_debug_mode_only(monkeypatch, debug):
    """The one switch: the position checks (host reads) of permute and combine run in debug mode only."""
    from dualpipe_ext.kernels import combine as combine_module
    from dualpipe_ext.kernels import permute as permute_module

    checked = []
    for module in (permute_module, combine_module):
        real = module.check_positions
        monkeypatch.setattr(module, "check_positions", lambda name, *a, _real=real: checked.append(name) or
                            _real(name, *a))
    monkeypatch.setenv("DUALPIPE_EXT_CHECKS", "1" if debug else "0")
    x, send_pos = torch.randn(2, 4), torch.tensor([[0, 2], [1, -1]])
    sent = permute(x, send_pos, 3, impl="reference")
    combine_module.combine(sent, send_pos, impl="reference")
    assert checked == (["send_pos", "pos"] if debug else [])
