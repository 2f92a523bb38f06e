"""Combine: the weighted sum of each token's rows, gathered back from a buffer.

``out[t] = sum_c w[t, c] * rows[pos[t, c]]`` over ``pos[t, c] >= 0`` (w = 1 when no
weights are given), accumulated in fp32 and returned in the dtype of ``rows``. Used twice
in an MoE layer: on the sender (pos = ``send_pos``, no weights: sum what every rank sent
back) and on the expert side (pos = ``expand_pos``, weights = routing weights).

Backward: ``grad_rows[pos[t, c]] = w[t, c] * grad_out[t]`` (rows no entry names get 0) and
``grad_w[t, c] = <grad_out[t], rows[pos[t, c]]>`` (0 where pos < 0), one fused kernel.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._common import (
    FLOAT_DTYPES,
    check_num_sms,
    checks_enabled,
    check_positions,
    check_same_device,
    check_tensor,
    new_output,
    next_pow2,
    persistent_grid,
    row_tile,
    cdiv,
    use_triton,
)

from ._triton import block_range, tl, triton  # None without Triton: the references run without it

__all__ = ["combine", "combine_reference"]

def _check(rows, pos, weights):
    # metadata only (traceable by torch.compile); positions are checked inside the op
    check_tensor("rows", rows, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("pos", pos, ndim=2, dtypes=(torch.int64,))
    check_same_device(rows=rows, pos=pos, weights=weights)
    if weights is not None:
        check_tensor("weights", weights, ndim=2, dtypes=(torch.float32,))
        if weights.shape != pos.shape:
            raise ValueError(f"weights must have the shape of pos {tuple(pos.shape)}, got {tuple(weights.shape)}")


def combine(
    rows: torch.Tensor,
    pos: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    *,
    num_sms: Optional[int] = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Sum each token's rows (optionally weighted); differentiable in ``rows`` and ``weights``.

    Args:
        rows: [num_rows, hidden] float32/bfloat16/float16/float64.
        pos: [num_tokens, num_cols] int64, row of ``rows`` for token t and column c, or -1.
        weights: optional [num_tokens, num_cols] float32, aligned with ``pos``.
        num_sms: cap on the persistent grid (programs), None for one program per block of tokens.
        impl: "auto" | "triton" | "reference".
    Positions are range-checked (a host read) only in debug mode (``DUALPIPE_EXT_CHECKS=1``).
    Returns:
        [num_tokens, hidden] in the dtype of ``rows``; tokens with no valid position get 0.
    """
    _check(rows, pos, weights)
    check_num_sms(num_sms)
    return combine_op(rows, pos, weights, num_sms, checks_enabled(), use_triton(impl, rows, pos))


# Triton

if triton is not None:

    @triton.jit
    def _round_to(x, dtype: tl.constexpr):
        # Round-to-nearest-even cast from the accumulator. For bf16 it is done on the bits:
        # what the GPU cast does, while the interpreter's fp32->bf16 cast truncates.
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
            return tl.where(x != x, x.to(tl.bfloat16), rounded)
        else:
            return x.to(dtype)

    @triton.jit
    def _combine_kernel(rows_ptr, pos_ptr, w_ptr, out_ptr, num_tokens, num_cols, hidden, HAS_WEIGHTS: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, ACC: tl.constexpr):
        for tb in range(tl.program_id(0), tl.cdiv(num_tokens, BLOCK_T), tl.num_programs(0)):
            t, t_ok = block_range(tb * BLOCK_T, BLOCK_T, num_tokens)
            for h0 in range(0, hidden, BLOCK_H):
                h, h_ok = block_range(h0, BLOCK_H, hidden)
                acc = tl.zeros([BLOCK_T, BLOCK_H], dtype=ACC)
                for c in range(num_cols):
                    p = tl.load(pos_ptr + t * num_cols + c, mask=t_ok, other=-1)
                    valid = (p >= 0)[:, None] & h_ok[None, :]
                    row = tl.load(rows_ptr + p[:, None] * hidden + h[None, :], mask=valid, other=0.0).to(ACC)
                    if HAS_WEIGHTS:
                        w = tl.load(w_ptr + t * num_cols + c, mask=t_ok, other=0.0).to(ACC)
                        row = tl.where(valid, row * w[:, None], 0.0)
                    acc += row
                tl.store(out_ptr + t[:, None] * hidden + h[None, :], _round_to(acc, out_ptr.dtype.element_ty),
                         mask=t_ok[:, None] & h_ok[None, :])

    @triton.jit
    def _combine_bwd_kernel(grad_out_ptr, rows_ptr, pos_ptr, w_ptr, grad_rows_ptr, grad_w_ptr, num_tokens, num_cols,
                            hidden, HAS_WEIGHTS: tl.constexpr, GRAD_ROWS: tl.constexpr, GRAD_WEIGHTS: tl.constexpr,
                            BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, C_PAD: tl.constexpr, ACC: tl.constexpr):
        cols = tl.arange(0, C_PAD)
        for tb in range(tl.program_id(0), tl.cdiv(num_tokens, BLOCK_T), tl.num_programs(0)):
            t, t_ok = block_range(tb * BLOCK_T, BLOCK_T, num_tokens)
            grad_w = tl.zeros([BLOCK_T, C_PAD], dtype=ACC)
            for h0 in range(0, hidden, BLOCK_H):
                h, h_ok = block_range(h0, BLOCK_H, hidden)
                g = tl.load(grad_out_ptr + t[:, None] * hidden + h[None, :], mask=t_ok[:, None] & h_ok[None, :],
                            other=0.0).to(ACC)
                for c in range(num_cols):
                    p = tl.load(pos_ptr + t * num_cols + c, mask=t_ok, other=-1)
                    valid = (p >= 0)[:, None] & h_ok[None, :]
                    if GRAD_ROWS:
                        if HAS_WEIGHTS:
                            w = tl.load(w_ptr + t * num_cols + c, mask=t_ok, other=0.0).to(ACC)
                            grad_row = g * w[:, None]
                        else:
                            grad_row = g
                        tl.store(grad_rows_ptr + p[:, None] * hidden + h[None, :],
                                 _round_to(grad_row, grad_rows_ptr.dtype.element_ty), mask=valid)
                    if GRAD_WEIGHTS:
                        row = tl.load(rows_ptr + p[:, None] * hidden + h[None, :], mask=valid, other=0.0).to(ACC)
                        dot = tl.sum(g * row, axis=1)
                        grad_w = tl.where(cols[None, :] == c, grad_w + dot[:, None], grad_w)
            if GRAD_WEIGHTS:
                tl.store(grad_w_ptr + t[:, None] * num_cols + cols[None, :], grad_w.to(tl.float32),
                         mask=t_ok[:, None] & (cols < num_cols)[None, :])


def _acc_dtype(dtype: torch.dtype):
    # fp32 accumulation, fp64 for fp64 inputs (used to check gradients)
    return tl.float64 if dtype == torch.float64 else tl.float32


def combine_forward_kernel(rows: torch.Tensor, pos: torch.Tensor, weights: Optional[torch.Tensor],
                           num_sms: Optional[int]) -> torch.Tensor:
    """Run the Triton combine; returns a new ``[num_tokens, hidden]`` tensor in the dtype of ``rows``."""
    rows, pos = rows.contiguous(), pos.contiguous()
    weights = None if weights is None else weights.contiguous()
    num_tokens, num_cols = pos.shape
    hidden = rows.shape[1]
    out = new_output((num_tokens, hidden), rows.dtype, rows.device)
    if num_tokens and hidden:
        if num_cols == 0:
            out.zero_()
        else:
            block_t, block_h = row_tile(hidden)
            _combine_kernel[(persistent_grid(cdiv(num_tokens, block_t), num_sms),)](
                rows, pos, weights if weights is not None else pos, out, num_tokens, num_cols, hidden,
                HAS_WEIGHTS=weights is not None, BLOCK_T=block_t, BLOCK_H=block_h, ACC=_acc_dtype(rows.dtype),
            )
    return out


def combine_backward_kernel(grad_out, rows, pos, weights, num_rows, num_sms, want_rows, want_w):
    """Run the fused Triton backward: (grad_rows [num_rows, hidden] or None, grad_weights or None)."""
    grad_out, pos = grad_out.contiguous(), pos.contiguous()
    num_tokens, num_cols = pos.shape
    hidden = grad_out.shape[1]
    grad_rows = grad_out.new_zeros((num_rows, hidden)) if want_rows else None
    grad_w = new_output(pos.shape, torch.float32, pos.device) if want_w else None
    if want_w and (hidden == 0 or num_cols == 0):
        grad_w.zero_()
    if (want_rows or want_w) and num_tokens and hidden and num_cols:
        block_t, block_h = row_tile(hidden)
        rows_arg = rows.contiguous() if rows is not None else grad_out
        _combine_bwd_kernel[(persistent_grid(cdiv(num_tokens, block_t), num_sms),)](
            grad_out, rows_arg, pos, weights.contiguous() if weights is not None else pos,
            grad_rows if want_rows else rows_arg, grad_w if want_w else pos,
            num_tokens, num_cols, hidden, HAS_WEIGHTS=weights is not None, GRAD_ROWS=want_rows,
            GRAD_WEIGHTS=want_w, BLOCK_T=block_t, BLOCK_H=block_h, C_PAD=next_pow2(num_cols),
            ACC=_acc_dtype(grad_out.dtype),
        )
    return grad_rows, grad_w


def combine_backward_reference(grad_out, rows, pos, weights, num_rows, want_rows, want_w):
    """The gradients of ``combine_reference``, written out (the same operations autograd runs on it)."""
    valid = pos >= 0
    token_idx = torch.arange(pos.shape[0], device=pos.device).unsqueeze(1).expand_as(pos)[valid]
    acc_dtype = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
    grad_picked = grad_out.to(acc_dtype).index_select(0, token_idx)
    grad_rows = grad_w = None
    if want_w:
        picked = rows.index_select(0, pos[valid]).to(acc_dtype)
        grad_w = torch.zeros(pos.shape, dtype=torch.float32, device=pos.device)
        grad_w[valid] = (grad_picked * picked).sum(1).to(torch.float32)
    if want_rows:
        if weights is not None:
            grad_picked = grad_picked * weights[valid].to(acc_dtype).unsqueeze(1)
        grad_rows = grad_out.new_zeros((num_rows, grad_out.shape[1])).index_add(
            0, pos[valid], grad_picked.to(grad_out.dtype))
    return grad_rows, grad_w


# torch.library registration: ``combine`` and its backward are custom ops, so torch.compile
# traces through them (fake implementations give the output shapes) without graph breaks.


@torch.library.custom_op("dualpipe_ext::combine", mutates_args=())
def combine_op(rows: torch.Tensor, pos: torch.Tensor, weights: Optional[torch.Tensor], num_sms: Optional[int],
               check_pos: bool, use_kernel: bool) -> torch.Tensor:
    """``combine`` as a custom op: Triton kernel (``use_kernel``) or the PyTorch reference."""
    if check_pos:
        check_positions("pos", pos, rows.shape[0])
    if use_kernel:
        return combine_forward_kernel(rows, pos, weights, num_sms)
    return combine_reference(rows, pos, weights)


@combine_op.register_fake
def _(rows, pos, weights, num_sms, check_pos, use_kernel):
    return rows.new_empty((pos.shape[0], rows.shape[1]))


@torch.library.custom_op("dualpipe_ext::combine_backward", mutates_args=())
def combine_backward_op(grad_out: torch.Tensor, rows: Optional[torch.Tensor], pos: torch.Tensor,
                        weights: Optional[torch.Tensor], num_rows: int, num_sms: Optional[int], use_kernel: bool,
                        want_rows: bool, want_weights: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(grad_rows [num_rows, hidden], grad_weights [num_tokens, num_cols] float32); a gradient
    not asked for comes back as an empty tensor. ``rows`` is needed only for grad_weights."""
    if use_kernel:
        grad_rows, grad_w = combine_backward_kernel(grad_out, rows, pos, weights, num_rows, num_sms, want_rows,
                                                    want_weights)
    else:
        grad_rows, grad_w = combine_backward_reference(grad_out, rows, pos, weights, num_rows, want_rows,
                                                       want_weights)
    if grad_rows is None:
        grad_rows = grad_out.new_empty((0,))
    if grad_w is None:
        grad_w = pos.new_empty((0,), dtype=torch.float32)
    return grad_rows, grad_w


@combine_backward_op.register_fake
def _(grad_out, rows, pos, weights, num_rows, num_sms, use_kernel, want_rows, want_weights):
    grad_rows = grad_out.new_empty((num_rows, grad_out.shape[1]) if want_rows else (0,))
    grad_w = pos.new_empty(tuple(pos.shape) if want_weights else (0,), dtype=torch.float32)
    return grad_rows, grad_w


def _combine_setup_context(ctx, inputs, output):
    rows, pos, weights, num_sms, _, use_kernel = inputs
    # rows are kept only when the weight gradient needs them
    ctx.save_for_backward(rows if weights is not None else None, pos, weights)
    ctx.num_rows, ctx.num_sms, ctx.use_kernel = rows.shape[0], num_sms, use_kernel


def _combine_backward(ctx, grad_out):
    rows, pos, weights = ctx.saved_tensors
    want_rows = ctx.needs_input_grad[0]
    want_w = weights is not None and ctx.needs_input_grad[2]
    if not (want_rows or want_w):
        return None, None, None, None, None, None
    grad_rows, grad_w = combine_backward_op(grad_out, rows, pos, weights, ctx.num_rows, ctx.num_sms, ctx.use_kernel,
                                            want_rows, want_w)
    return grad_rows if want_rows else None, None, grad_w if want_w else None, None, None, None


combine_op.register_autograd(_combine_backward, setup_context=_combine_setup_context)


# torch reference


def combine_reference(rows: torch.Tensor, pos: torch.Tensor, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Plain PyTorch definition of ``combine`` (fp32 accumulation in column order); differentiable."""
    valid = pos >= 0
    token_idx = torch.arange(pos.shape[0], device=pos.device).unsqueeze(1).expand_as(pos)[valid]
    acc_dtype = torch.float64 if rows.dtype == torch.float64 else torch.float32
    picked = rows.index_select(0, pos[valid]).to(acc_dtype)
    if weights is not None:
        picked = picked * weights[valid].to(acc_dtype).unsqueeze(1)
    out = torch.zeros((pos.shape[0], rows.shape[1]), dtype=acc_dtype, device=rows.device)
    return out.index_add(0, token_idx, picked).to(rows.dtype)
