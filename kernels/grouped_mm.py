"""Grouped GEMM for MoE experts: ``out[rows of g] = x[rows of g] @ w[g]^T`` for every group g.

Used on CUDA devices where ``torch._grouped_mm`` is not available (before sm90, or older
torch). Group g owns rows ``[group_ends[g-1], group_ends[g])`` of ``x``; ``group_ends`` stays
on the device, so a call never synchronises with the host: each program finds its group by
scanning a device-side prefix sum of the number of row tiles per group.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ._common import FLOAT_DTYPES, _interpreting, check_tensor, new_output, persistent_grid, use_triton

__all__ = ["Tiles", "grouped_mm", "grouped_mm_reference", "grouped_wgrad", "grouped_wgrad_reference"]


class Tiles(NamedTuple):
    """Block sizes of a grouped GEMM's tiles: ``m`` rows, ``n`` output columns, ``k`` reduced columns.

    Powers of two, at least 16 (what ``tl.dot`` takes)."""

    m: int
    n: int
    k: int

    def check(self) -> "Tiles":
        for name, v in zip(self._fields, self):
            if not isinstance(v, int) or v < 16 or v & (v - 1):
                raise ValueError(f"Tiles.{name} must be a power of two of at least 16, got {v!r}")
        return self

from ._triton import tl, triton  # None without Triton: the references run without it

if triton is not None:

    @triton.jit
    def _gemm_tile(x_ptr, w_ptr, out_ptr, group_ends_ptr, tile_ends_ptr, pid_m, pid_n, num_groups, N, K,
                   stride_xm, stride_xk, stride_wg, stride_wn, stride_wk, stride_om, stride_on,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
        # group of this row tile: number of groups whose tiles all come before it
        g = 0
        for i in range(num_groups):
            g += (tl.load(tile_ends_ptr + i) <= pid_m).to(tl.int32)
        prev = tl.maximum(g - 1, 0)
        tile_begin = tl.where(g > 0, tl.load(tile_ends_ptr + prev), 0)
        row_begin = tl.where(g > 0, tl.load(group_ends_ptr + prev), 0)
        row_end = tl.load(group_ends_ptr + g)

        rows = row_begin + (pid_m - tile_begin) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < row_end
        col_ok = cols < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        w_base = w_ptr + g.to(tl.int64) * stride_wg
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            a = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + ks[None, :] * stride_xk,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_base + cols[None, :] * stride_wn + ks[:, None] * stride_wk,
                        mask=col_ok[None, :] & k_ok[:, None], other=0.0)
            if UPCAST:  # the interpreter computes low-precision dots wrongly
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc += tl.dot(a, b)
        tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :] * stride_on,
                 acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def grouped_mm_kernel(
        x_ptr, w_ptr, out_ptr, group_ends_ptr, tile_ends_ptr,
        num_groups, N, K, max_row_tiles, num_col_tiles,
        stride_xm, stride_xk, stride_wg, stride_wn, stride_wk, stride_om, stride_on,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
    ):
        # persistent: the grid (the SM budget) strides over the output tiles
        num_tiles = tl.load(tile_ends_ptr + num_groups - 1)
        for tile in range(tl.program_id(0), max_row_tiles * num_col_tiles, tl.num_programs(0)):
            pid_m = tile // num_col_tiles
            if pid_m < num_tiles:
                _gemm_tile(x_ptr, w_ptr, out_ptr, group_ends_ptr, tile_ends_ptr, pid_m, tile % num_col_tiles,
                           num_groups, N, K, stride_xm, stride_xk, stride_wg, stride_wn, stride_wk, stride_om,
                           stride_on, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST)

    @triton.jit
    def _wgrad_tile(grad_ptr, x_ptr, dw_ptr, group_ends_ptr, g, pid_n, pid_k, N, K,
                    stride_gm, stride_gn, stride_xm, stride_xk, stride_dg, stride_dn, stride_dk,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
        cols_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cols_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        n_ok, k_ok = cols_n < N, cols_k < K
        begin = tl.where(g > 0, tl.load(group_ends_ptr + tl.maximum(g - 1, 0)), 0)
        end = tl.load(group_ends_ptr + g)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for m0 in range(begin, end, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            row_ok = rows < end
            a = tl.load(grad_ptr + rows[:, None].to(tl.int64) * stride_gm + cols_n[None, :] * stride_gn,
                        mask=row_ok[:, None] & n_ok[None, :], other=0.0)
            b = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + cols_k[None, :] * stride_xk,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc += tl.dot(tl.trans(a), b)
        tl.store(dw_ptr + g.to(tl.int64) * stride_dg + cols_n[:, None] * stride_dn + cols_k[None, :] * stride_dk,
                 acc.to(dw_ptr.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])

    @triton.jit
    def grouped_wgrad_kernel(
        grad_ptr, x_ptr, dw_ptr, group_ends_ptr, N, K, num_groups, num_n_tiles, num_k_tiles,
        stride_gm, stride_gn, stride_xm, stride_xk, stride_dg, stride_dn, stride_dk,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
    ):
        per_group = num_n_tiles * num_k_tiles
        for tile in range(tl.program_id(0), num_groups * per_group, tl.num_programs(0)):
            rest = tile % per_group
            _wgrad_tile(grad_ptr, x_ptr, dw_ptr, group_ends_ptr, tile // per_group, rest // num_k_tiles,
                        rest % num_k_tiles, N, K, stride_gm, stride_gn, stride_xm, stride_xk, stride_dg, stride_dn,
                        stride_dk, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST)


def _built():
    if triton is None:
        raise ImportError("the Triton grouped GEMM needs the 'triton' package: pip install -e \".[triton]\"")
    return grouped_mm_kernel, grouped_wgrad_kernel


def _check(x: torch.Tensor, w: torch.Tensor, group_ends: torch.Tensor) -> None:
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("w", w, ndim=3, dtypes=(x.dtype,))
    check_tensor("group_ends", group_ends, ndim=1, dtypes=(torch.int32, torch.int64))
    if w.shape[2] != x.shape[1]:
        raise ValueError(f"w must be [num_groups, n, k={x.shape[1]}], got shape {tuple(w.shape)}")
    if group_ends.shape[0] != w.shape[0]:
        raise ValueError(f"group_ends must have num_groups={w.shape[0]} entries, got {group_ends.shape[0]}")
    if len({x.device, w.device, group_ends.device}) != 1:
        raise ValueError(f"x, w, group_ends must share a device, got {x.device}, {w.device}, {group_ends.device}")


def grouped_mm_reference(x: torch.Tensor, w: torch.Tensor, group_ends: torch.Tensor) -> torch.Tensor:
    """Per-group loop in PyTorch with fp32 accumulation."""
    _check(x, w, group_ends)
    ends = group_ends.tolist()
    if any(b < a for a, b in zip([0] + ends, ends)) or (ends and ends[-1] > x.shape[0]):
        raise ValueError(f"group_ends must be non-decreasing and end at most at num_rows={x.shape[0]}, got {ends}")
    out = torch.zeros(x.shape[0], w.shape[1], dtype=x.dtype, device=x.device)  # rows past the last end: 0
    begin = 0
    for g, end in enumerate(ends):
        if end > begin:
            out[begin:end] = (x[begin:end].float() @ w[g].float().t()).to(x.dtype)
        begin = end
    return out


def grouped_mm(
    x: torch.Tensor,
    w: torch.Tensor,
    group_ends: torch.Tensor,
    *,
    tiles: Tiles = Tiles(64, 64, 32),
    num_sms: Optional[int] = None,
    impl: str = "auto",
) -> torch.Tensor:
    """``out[rows of g] = x[rows of g] @ w[g]^T``.

    Args:
        x: [num_rows, k] float, rows grouped by group.
        w: [num_groups, n, k], same dtype as ``x`` (one ``nn.Linear`` weight per group).
        group_ends: [num_groups] int32/int64, cumulative row counts, non-decreasing, ending at most at
            ``num_rows`` (checked by the reference; the kernel does not read it back to the host). Rows past
            the last end (capacity-sized buffers) are not computed: the kernel leaves them unwritten.
        tiles: block sizes of the kernel's tiles.
        num_sms: programs of the persistent grid (the SM budget; None: one per output tile).
    Returns:
        [num_rows, n], dtype of ``x``.
    """
    if not use_triton(impl, x, w, group_ends):
        return grouped_mm_reference(x, w, group_ends)
    _check(x, w, group_ends)
    block_m, block_n, block_k = tiles.check()
    num_rows, k = x.shape
    num_groups, n, _ = w.shape
    out = new_output((num_rows, n), x.dtype, x.device)
    if num_groups == 0 or num_rows == 0 or n == 0:
        return out
    counts = torch.diff(group_ends.long(), prepend=group_ends.new_zeros(1).long())
    tile_ends = torch.cumsum((counts + block_m - 1) // block_m, 0).to(torch.int32)
    max_tiles = (num_rows + block_m - 1) // block_m + num_groups
    col_tiles = (n + block_n - 1) // block_n
    grid = (persistent_grid(max_tiles * col_tiles, num_sms),)
    _built()[0][grid](
        x, w, out, group_ends, tile_ends, num_groups, n, k, max_tiles, col_tiles,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2), out.stride(0), out.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, UPCAST=_interpreting(),
    )
    return out


def grouped_wgrad_reference(grad: torch.Tensor, x: torch.Tensor, group_ends: torch.Tensor) -> torch.Tensor:
    """Per-group loop in PyTorch with fp32 accumulation: ``dw[g] = grad[rows of g]^T @ x[rows of g]``."""
    dw = grad.new_zeros(group_ends.shape[0], grad.shape[1], x.shape[1])
    begin = 0
    for g, end in enumerate(group_ends.tolist()):
        if end > begin:
            dw[g] = (grad[begin:end].float().t() @ x[begin:end].float()).to(grad.dtype)
        begin = end
    return dw


def grouped_wgrad(
    grad: torch.Tensor,
    x: torch.Tensor,
    group_ends: torch.Tensor,
    *,
    tiles: Tiles = Tiles(32, 64, 64),
    num_sms: Optional[int] = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Weight gradient of ``grouped_mm``: ``dw[g] = grad[rows of g]^T @ x[rows of g]``.

    Args:
        grad: [num_rows, n] float, the output gradient; x: [num_rows, k], same dtype.
        group_ends: [num_groups] int32/int64 cumulative row counts on the device; rows past the
            last end are ignored, and the kernel never reads the ends back to the host.
        tiles: block sizes of the kernel's tiles (``m`` runs over the reduced rows here).
        num_sms: programs of the persistent grid (the SM budget; None: one per output tile).
    Returns:
        [num_groups, n, k], dtype of ``grad`` (zero for empty groups).
    """
    check_tensor("grad", grad, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("x", x, ndim=2, dtypes=(grad.dtype,))
    check_tensor("group_ends", group_ends, ndim=1, dtypes=(torch.int32, torch.int64))
    if x.shape[0] != grad.shape[0]:
        raise ValueError(f"grad {tuple(grad.shape)} and x {tuple(x.shape)} must have the same rows")
    if not use_triton(impl, grad, x, group_ends):
        return grouped_wgrad_reference(grad, x, group_ends)
    block_m, block_n, block_k = tiles.check()
    num_groups, n, k = group_ends.shape[0], grad.shape[1], x.shape[1]
    dw = new_output((num_groups, n, k), grad.dtype, grad.device)
    if num_groups == 0 or n == 0 or k == 0:
        return dw
    n_tiles, k_tiles = (n + block_n - 1) // block_n, (k + block_k - 1) // block_k
    grid = (persistent_grid(num_groups * n_tiles * k_tiles, num_sms),)
    _built()[1][grid](
        grad, x, dw, group_ends, n, k, num_groups, n_tiles, k_tiles, grad.stride(0), grad.stride(1),
        x.stride(0), x.stride(1),
        dw.stride(0), dw.stride(1), dw.stride(2),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, UPCAST=_interpreting(),
    )
    return dw
