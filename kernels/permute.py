"""Permute: copy token rows into a buffer at given rows (send buffer, or expert-grouped buffer).

``out[send_pos[t, c]] = x[t]`` for every ``send_pos[t, c] >= 0``. With ``send_pos`` from
``dispatch_layout`` (``num_cols`` = ranks) this fills the per-destination send buffer,
each token at most once per rank; with ``expand_pos`` (``num_cols`` = top-k) it fills the
buffer grouped by local expert. Its gradient is ``unpermute``:
``grad_x[t] = sum_c grad_out[send_pos[t, c]]``, a combine-shaped reduction.

Rows of ``out`` that no entry of ``send_pos`` names are left unspecified (the Triton path
does not write them; the reference zero-fills them). Layouts from ``dispatch_layout`` name
every row.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._common import (
    FLOAT_DTYPES,
    check_num_sms,
    checks_enabled,
    check_positions,
    check_same_device,
    check_tensor,
    new_output,
    persistent_grid,
    row_tile,
    cdiv,
    use_triton,
)
from .combine import combine_backward_op, combine_op, combine_reference

from ._triton import block_range, tl, triton  # None without Triton: the references run without it

__all__ = ["permute", "permute_reference", "unpermute", "unpermute_reference"]

def _check(x: torch.Tensor, send_pos: torch.Tensor, num_rows: int) -> None:
    # metadata only (traceable by torch.compile); positions are checked inside the op
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("send_pos", send_pos, ndim=2, dtypes=(torch.int64,))
    check_same_device(x=x, send_pos=send_pos)
    if send_pos.shape[0] != x.shape[0]:
        raise ValueError(f"send_pos must have one row per token of x ({x.shape[0]}), got shape {tuple(send_pos.shape)}")
    if not isinstance(num_rows, int) or num_rows < 0:
        raise ValueError(f"num_rows must be a non-negative int, got {num_rows!r}")


def permute(
    x: torch.Tensor,
    send_pos: torch.Tensor,
    num_rows: int,
    *,
    num_sms: Optional[int] = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Scatter token rows into a ``[num_rows, hidden]`` buffer; differentiable in ``x``.

    Args:
        x: [num_tokens, hidden] float32/bfloat16/float16/float64.
        send_pos: [num_tokens, num_cols] int64, destination row of token t for column c, or -1.
        num_rows: rows of the output buffer.
        num_sms: cap on the persistent grid (programs), None for one program per block of tokens.
        impl: "auto" | "triton" | "reference".
    Positions are range-checked (a host read) only in debug mode (``DUALPIPE_EXT_CHECKS=1``).
    Returns:
        [num_rows, hidden] in the dtype of ``x``.
    """
    _check(x, send_pos, num_rows)
    check_num_sms(num_sms)
    return permute_op(x, send_pos, num_rows, num_sms, checks_enabled(), use_triton(impl, x, send_pos))


def unpermute(
    grad_out: torch.Tensor,
    send_pos: torch.Tensor,
    *,
    num_sms: Optional[int] = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Gradient of ``permute``: ``grad_x[t] = sum_c grad_out[send_pos[t, c]]`` (fp32 accumulation).

    Args:
        grad_out: [num_rows, hidden] float.
        send_pos: [num_tokens, num_cols] int64, as given to ``permute``.
    Returns:
        [num_tokens, hidden] in the dtype of ``grad_out``; tokens with no valid position get 0.
    """
    check_tensor("grad_out", grad_out, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("send_pos", send_pos, ndim=2, dtypes=(torch.int64,))
    check_same_device(grad_out=grad_out, send_pos=send_pos)
    check_num_sms(num_sms)
    return unpermute_op(grad_out, send_pos, num_sms, checks_enabled(), use_triton(impl, grad_out, send_pos))


# Triton

if triton is not None:

    @triton.jit
    def _permute_kernel(x_ptr, pos_ptr, out_ptr, num_tokens, num_cols, hidden, BLOCK_T: tl.constexpr,
                        BLOCK_H: tl.constexpr):
        # Grid-stride over blocks of tokens: each row is read once and written to each destination.
        for tb in range(tl.program_id(0), tl.cdiv(num_tokens, BLOCK_T), tl.num_programs(0)):
            t, t_ok = block_range(tb * BLOCK_T, BLOCK_T, num_tokens)
            for h0 in range(0, hidden, BLOCK_H):
                h, h_ok = block_range(h0, BLOCK_H, hidden)
                row = tl.load(x_ptr + t[:, None] * hidden + h[None, :], mask=t_ok[:, None] & h_ok[None, :])
                for c in range(num_cols):
                    p = tl.load(pos_ptr + t * num_cols + c, mask=t_ok, other=-1)
                    tl.store(out_ptr + p[:, None] * hidden + h[None, :], row, mask=(p >= 0)[:, None] & h_ok[None, :])


def launch_permute(x: torch.Tensor, send_pos: torch.Tensor, out: torch.Tensor, num_sms: Optional[int]) -> None:
    """Run the Triton permute into ``out`` (contiguous ``[num_rows, hidden]``, dtype of ``x``)."""
    num_tokens, hidden = x.shape
    if num_tokens == 0 or hidden == 0 or send_pos.shape[1] == 0:
        return
    block_t, block_h = row_tile(hidden)
    grid = (persistent_grid(cdiv(num_tokens, block_t), num_sms),)
    _permute_kernel[grid](x, send_pos, out, num_tokens, send_pos.shape[1], hidden, BLOCK_T=block_t, BLOCK_H=block_h)


# torch.library registration: ``permute`` and ``unpermute`` are custom ops (each the other's
# gradient), so torch.compile traces through them without graph breaks.


@torch.library.custom_op("dualpipe_ext::permute", mutates_args=())
def permute_op(x: torch.Tensor, send_pos: torch.Tensor, num_rows: int, num_sms: Optional[int], check_pos: bool,
               use_kernel: bool) -> torch.Tensor:
    """``permute`` as a custom op: Triton kernel (``use_kernel``) or the PyTorch reference."""
    if check_pos:
        check_positions("send_pos", send_pos, num_rows)
    if not use_kernel:
        return permute_reference(x, send_pos, num_rows)
    x, send_pos = x.contiguous(), send_pos.contiguous()
    out = new_output((num_rows, x.shape[1]), x.dtype, x.device)
    launch_permute(x, send_pos, out, num_sms)
    return out


@permute_op.register_fake
def _(x, send_pos, num_rows, num_sms, check_pos, use_kernel):
    return x.new_empty((num_rows, x.shape[1]))


def _permute_setup_context(ctx, inputs, output):
    _, send_pos, _, num_sms, _, use_kernel = inputs
    ctx.save_for_backward(send_pos)
    ctx.num_sms, ctx.use_kernel = num_sms, use_kernel


def _permute_backward(ctx, grad_out):
    (send_pos,) = ctx.saved_tensors
    grad_x = unpermute_op(grad_out, send_pos, ctx.num_sms, False, ctx.use_kernel)
    return grad_x, None, None, None, None, None


permute_op.register_autograd(_permute_backward, setup_context=_permute_setup_context)


@torch.library.custom_op("dualpipe_ext::unpermute", mutates_args=())
def unpermute_op(grad_out: torch.Tensor, send_pos: torch.Tensor, num_sms: Optional[int], check_pos: bool,
                 use_kernel: bool) -> torch.Tensor:
    """``unpermute`` as a custom op: the unweighted ``combine`` of the rows ``send_pos`` names."""
    return combine_op(grad_out, send_pos, None, num_sms, check_pos, use_kernel)


@unpermute_op.register_fake
def _(grad_out, send_pos, num_sms, check_pos, use_kernel):
    return grad_out.new_empty((send_pos.shape[0], grad_out.shape[1]))


def _unpermute_setup_context(ctx, inputs, output):
    grad_out, send_pos, num_sms, _, use_kernel = inputs
    ctx.save_for_backward(send_pos)
    ctx.num_rows, ctx.num_sms, ctx.use_kernel = grad_out.shape[0], num_sms, use_kernel


def _unpermute_backward(ctx, grad):
    # rows that no position names get a zero gradient (permute would leave them unspecified)
    (send_pos,) = ctx.saved_tensors
    grad_rows, _ = combine_backward_op(grad, None, send_pos, None, ctx.num_rows, ctx.num_sms, ctx.use_kernel, True,
                                       False)
    return grad_rows, None, None, None, None


unpermute_op.register_autograd(_unpermute_backward, setup_context=_unpermute_setup_context)


# torch reference


def permute_reference(x: torch.Tensor, send_pos: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Plain PyTorch definition of ``permute`` (unnamed rows are zero); differentiable."""
    valid = send_pos >= 0
    token_idx = torch.arange(x.shape[0], device=x.device).unsqueeze(1).expand_as(send_pos)[valid]
    out = x.new_zeros((num_rows, x.shape[1]))
    return out.index_copy(0, send_pos[valid], x.index_select(0, token_idx))


def unpermute_reference(grad_out: torch.Tensor, send_pos: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch definition of ``unpermute``."""
    return combine_reference(grad_out, send_pos, None)
