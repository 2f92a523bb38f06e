"""FP8 (e4m3) quantization of token rows with one scale per 1x128 group, and its inverse.

    q, scales = quantize(x)                  # x [num_tokens, hidden] -> e4m3 [num_tokens, hidden], fp32 scales
    x_hat = dequantize(q, scales, x.dtype)   # [num_tokens, hidden]

What every bit is (the reference below is the definition; the Triton kernels match it bit for bit):

- Row ``t`` is cut into ``num_groups = ceil(hidden / 128)`` groups of 128 consecutive columns.
  When ``hidden`` is not a multiple of 128 the last group is partial: it holds the last
  ``hidden % 128`` columns, its scale comes from those columns alone, and nothing is padded
  in the outputs (``q`` has exactly ``hidden`` columns).
- ``amax`` = the largest absolute value of the group (inputs are read in float32; bf16 and
  fp16 widen exactly), raised to at least ``AMAX_MIN = 2**-64``: an all-zero group (or one of
  only tiny values) gets a finite non-zero scale and quantizes to (signed) zeros.
- ``scale = amax / 448`` in float32 (correctly rounded); with ``ue8m0`` it is then rounded up
  to a power of two (DeepSeek-V3's UE8M0 scale form: only the exponent needs storing).
- ``q = e4m3(x / scale)``: float32 division (correctly rounded), then round-to-nearest-even
  to e4m3fn with saturation: magnitudes above 448 become 448 (e4m3fn's largest finite
  value; no NaN is ever produced from finite input). The sign of zero is kept. Values below
  2**-6 land on e4m3's subnormals (multiples of 2**-9).
- ``dequantize``: ``float32(q) * scale`` in float32 (correctly rounded), then round-to-nearest-even
  to the output dtype.

Inputs must be finite; a NaN or infinity makes its whole group unspecified.

The kernels do the e4m3 rounding and the bf16 rounding with integer operations on the float32
bits instead of Triton's casts: Triton's interpreter truncates where the GPU rounds, and this
way the CPU tests check the very arithmetic the GPU runs. ``tl.math.div_rn`` is the correctly
rounded division on both (the GPU's default ``/`` is approximate).

Wire form for the exchanges: ``packed_row_bytes(hidden) = hidden + 4 * ceil(hidden / 128)``
bytes per row (``pack``/``unpack``): the e4m3 bytes, then the float32 scales' bytes.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ._common import cdiv, check_same_device, check_tensor, new_output, use_triton
from ._triton import block_range, tl, triton  # None without Triton: the references run without it

__all__ = ["GROUP", "E4M3_MAX", "AMAX_MIN", "Quantized", "quantize", "dequantize", "quantize_reference",
           "dequantize_reference", "e4m3_bits_reference", "num_groups", "packed_row_bytes", "pack", "unpack",
           "round_trip"]

GROUP = 128  # columns per scale
E4M3_MAX = 448.0  # largest finite e4m3fn value
AMAX_MIN = 2.0 ** -64  # floor of a group's amax (all-zero groups)
_IN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_OUT_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# Rows per program: 8 x 128 columns = 1024 elements over 4 warps, one group at a time. Not tuned on a GPU.
BLOCK_T = 8


class Quantized(NamedTuple):
    """Result of ``quantize``."""

    q: torch.Tensor  # [num_tokens, hidden] float8_e4m3fn
    scales: torch.Tensor  # [num_tokens, num_groups] float32


def num_groups(hidden: int) -> int:
    return cdiv(hidden, GROUP)


def packed_row_bytes(hidden: int) -> int:
    """Bytes of one quantized row on the wire: ``hidden`` e4m3 bytes and one float32 scale per group."""
    return hidden + 4 * num_groups(hidden)


def _check_x(name: str, x: torch.Tensor) -> None:
    check_tensor(name, x, ndim=2, dtypes=_IN_DTYPES)


def quantize(x: torch.Tensor, *, ue8m0: bool = False, impl: str = "auto") -> Quantized:
    """Quantize rows to e4m3 with a float32 scale per 1x128 group (see the module docstring).

    Args:
        x: [num_tokens, hidden] float32/bfloat16/float16, finite.
        ue8m0: round every scale up to a power of two.
        impl: "auto" | "triton" | "reference".
    Returns:
        ``Quantized(q [num_tokens, hidden] float8_e4m3fn, scales [num_tokens, ceil(hidden/128)] float32)``.
    """
    _check_x("x", x)
    if not use_triton(impl, x):
        return quantize_reference(x, ue8m0=ue8m0)
    x = x if x.stride(-1) == 1 else x.contiguous()
    t, h = x.shape
    q = new_output((t, h), torch.uint8, x.device)
    s = new_output((t, num_groups(h)), torch.float32, x.device)
    if t and h:
        _quantize_kernel[(cdiv(t, BLOCK_T),)](x, q, s, t, h, num_groups(h), x.stride(0), q.stride(0), s.stride(0),
                                              UE8M0=ue8m0, BLOCK_T=BLOCK_T, GROUP=GROUP)
    return Quantized(q.view(torch.float8_e4m3fn), s)


def dequantize(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16, *,
               impl: str = "auto") -> torch.Tensor:
    """``float32(q) * scale`` per group, rounded to ``dtype``.

    Args:
        q: [num_tokens, hidden] float8_e4m3fn or uint8 (its bits); rows may be strided.
        scales: [num_tokens, ceil(hidden/128)] float32; rows may be strided.
        dtype: float32, bfloat16 or float16.
    Returns:
        [num_tokens, hidden] ``dtype``.
    """
    check_tensor("q", q, ndim=2, dtypes=(torch.float8_e4m3fn, torch.uint8))
    check_tensor("scales", scales, ndim=2, dtypes=(torch.float32,))
    check_same_device(q=q, scales=scales)
    if dtype not in _OUT_KIND:
        raise ValueError(f"dtype must be one of {tuple(_OUT_KIND)}, got {dtype!r}")
    t, h = q.shape
    if tuple(scales.shape) != (t, num_groups(h)):
        raise ValueError(f"scales must be [{t}, {num_groups(h)}] for q of shape {tuple(q.shape)}, got "
                         f"{tuple(scales.shape)}")
    if not use_triton(impl, q, scales):
        return dequantize_reference(q, scales, dtype)
    q = q.view(torch.uint8)
    q = q if q.stride(-1) == 1 else q.contiguous()
    scales = scales if scales.stride(-1) == 1 else scales.contiguous()
    out = new_output((t, h), dtype, q.device)
    if t and h:
        # bf16 results are written as their int16 bits (rounded in the kernel)
        target = out.view(torch.int16) if dtype == torch.bfloat16 else out
        _dequantize_kernel[(cdiv(t, BLOCK_T),)](q, scales, target, t, h, num_groups(h), q.stride(0),
                                                scales.stride(0), out.stride(0), OUT_KIND=_OUT_KIND[dtype],
                                                BLOCK_T=BLOCK_T, GROUP=GROUP)
    return out


def pack(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """One byte row per token: [num_tokens, packed_row_bytes(hidden)] uint8 (e4m3 bytes, then the scales' bytes)."""
    return torch.cat([q.view(torch.uint8), scales.contiguous().view(torch.uint8)], dim=1)


def unpack(rows: torch.Tensor, hidden: int):
    """Inverse of ``pack``: ``(q [n, hidden] uint8 view, scales [n, num_groups] float32)``."""
    if rows.dtype != torch.uint8 or rows.dim() != 2 or rows.shape[1] != packed_row_bytes(hidden):
        raise ValueError(f"rows must be [n, {packed_row_bytes(hidden)}] uint8 for hidden {hidden}, got "
                         f"{rows.dtype} {tuple(rows.shape)}")
    return rows[:, :hidden], rows[:, hidden:].contiguous().view(torch.float32)


def round_trip(x: torch.Tensor, *, ue8m0: bool = False, impl: str = "auto") -> torch.Tensor:
    """``dequantize(quantize(x))`` in ``x``'s dtype: what a token looks like after an FP8 dispatch."""
    q, s = quantize(x, ue8m0=ue8m0, impl=impl)
    return dequantize(q, s, x.dtype, impl=impl)


# --------------------------------------------------------------------------------------------- Triton

if triton is not None:

    @triton.jit
    def _e4m3_bits(y):
        """int32 e4m3fn code (0..254, never NaN) of float32 ``y``: round to nearest even, saturate at 448."""
        bits = y.to(tl.int32, bitcast=True)
        sign = (bits >> 24) & 0x80
        a = tl.minimum(tl.abs(y), 448.0)
        abits = a.to(tl.int32, bitcast=True)
        # normal range: keep 3 mantissa bits, rounding on the 20 dropped ones; the carry may bump the exponent
        rounded = abits + 0x7FFFF + ((abits >> 20) & 1)
        normal = (rounded >> 20) - (120 << 3)  # rebias the exponent: 127 -> 7
        # subnormal range (a < 2**-6): multiples of 2**-9, rounded to nearest even integer
        s = a * 512.0
        m = s.to(tl.int32)
        frac = s - m.to(tl.float32)
        up = (frac > 0.5) | ((frac == 0.5) & ((m & 1) == 1))
        sub = m + up.to(tl.int32)
        return tl.where(a < 0.015625, sub, normal) | sign

    @triton.jit
    def _e4m3_value(code):
        """float32 value of int32 e4m3fn ``code`` (0..255; 0x7F/0xFF are NaN)."""
        e = (code >> 3) & 0xF
        m = code & 7
        normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
        v = tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)
        v = tl.where((code & 0x80) != 0, -v, v)
        return tl.where((code & 0x7F) == 0x7F, float("nan"), v)

    @triton.jit
    def dequantize_value(code, scale, OUT_KIND: tl.constexpr):
        """What ``dequantize`` stores for int32 e4m3 codes ``code`` times float32 ``scale`` (broadcast):
        float32 (OUT_KIND 0), the int16 bits of the bfloat16 rounded to nearest even (1), float16 (2)."""
        v = _e4m3_value(code) * scale
        if OUT_KIND == 1:  # bfloat16: round to nearest even on the bits, store the upper half
            b = v.to(tl.int32, bitcast=True)
            b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
            b = tl.where(v != v, 0x7FC0, b)  # NaN stays NaN
            return b.to(tl.int16)
        elif OUT_KIND == 2:
            return v.to(tl.float16)
        else:
            return v

    @triton.jit
    def _quantize_kernel(x_ptr, q_ptr, s_ptr, num_tokens, hidden, num_groups, stride_x, stride_q, stride_s,
                         UE8M0: tl.constexpr, BLOCK_T: tl.constexpr, GROUP: tl.constexpr):
        rows, rmask = block_range(tl.program_id(0) * BLOCK_T, BLOCK_T, num_tokens)
        cols0 = tl.arange(0, GROUP)
        for g in range(num_groups):
            cols = g * GROUP + cols0
            mask = rmask[:, None] & (cols < hidden)[None, :]
            x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            amax = tl.maximum(tl.max(tl.abs(x), axis=1), 5.421010862427522e-20)  # AMAX_MIN = 2**-64
            scale = tl.math.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32))
            if UE8M0:  # round up to a power of two: a non-zero mantissa carries into the exponent
                sbits = scale.to(tl.int32, bitcast=True)
                scale = ((sbits + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)
            y = tl.math.div_rn(x, tl.broadcast_to(scale[:, None], x.shape))
            code = _e4m3_bits(y)
            tl.store(q_ptr + rows[:, None] * stride_q + cols[None, :], code.to(tl.uint8), mask=mask)
            tl.store(s_ptr + rows * stride_s + g, scale, mask=rmask)

    @triton.jit
    def _dequantize_kernel(q_ptr, s_ptr, out_ptr, num_tokens, hidden, num_groups, stride_q, stride_s, stride_out,
                           OUT_KIND: tl.constexpr, BLOCK_T: tl.constexpr, GROUP: tl.constexpr):
        rows, rmask = block_range(tl.program_id(0) * BLOCK_T, BLOCK_T, num_tokens)
        cols0 = tl.arange(0, GROUP)
        for g in range(num_groups):
            cols = g * GROUP + cols0
            mask = rmask[:, None] & (cols < hidden)[None, :]
            code = tl.load(q_ptr + rows[:, None] * stride_q + cols[None, :], mask=mask, other=0).to(tl.int32)
            scale = tl.load(s_ptr + rows * stride_s + g, mask=rmask, other=1.0)
            v = dequantize_value(code, scale[:, None], OUT_KIND)
            tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], v, mask=mask)


# ------------------------------------------------------------------------------------- torch reference


def e4m3_bits_reference(y: torch.Tensor) -> torch.Tensor:
    """int32 e4m3fn code of float32 ``y``: round to nearest even, saturate at 448 (the definition)."""
    y = y.float()
    bits = y.view(torch.int32)
    sign = (bits >> 24) & 0x80
    a = y.abs().clamp_max(E4M3_MAX)
    abits = a.view(torch.int32)
    normal = ((abits + 0x7FFFF + ((abits >> 20) & 1)) >> 20) - (120 << 3)
    s = a * 512.0
    m = s.to(torch.int32)
    frac = s - m.float()
    sub = m + ((frac > 0.5) | ((frac == 0.5) & ((m & 1) == 1))).to(torch.int32)
    return torch.where(a < 2.0 ** -6, sub, normal) | sign


def _group_view(xf: torch.Tensor) -> torch.Tensor:
    """[t, h] -> [t, groups, 128], the partial last group padded with zeros."""
    t, h = xf.shape
    pad = num_groups(h) * GROUP - h
    return torch.nn.functional.pad(xf, (0, pad)).view(t, num_groups(h), GROUP)


def quantize_reference(x: torch.Tensor, *, ue8m0: bool = False) -> Quantized:
    """PyTorch definition of ``quantize``."""
    t, h = x.shape
    xg = _group_view(x.float())
    amax = xg.abs().amax(dim=-1).clamp_min(AMAX_MIN)
    # a tensor divisor: torch on CUDA turns division by a Python number into a multiplication by its
    # reciprocal, which is not the correctly rounded quotient that defines the scale
    scale = amax / torch.full_like(amax, E4M3_MAX)
    if ue8m0:
        scale = ((scale.view(torch.int32) + 0x7FFFFF) & 0x7F800000).view(torch.float32)
    codes = e4m3_bits_reference(xg / scale[..., None]).reshape(t, xg.shape[1] * GROUP)[:, :h]
    return Quantized(codes.to(torch.uint8).view(torch.float8_e4m3fn), scale.contiguous())


def dequantize_reference(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """PyTorch definition of ``dequantize`` (torch's own e4m3 decode)."""
    t, h = q.shape
    v = _group_view(q.view(torch.float8_e4m3fn).float()) * scales[..., None]
    return v.reshape(t, v.shape[1] * GROUP)[:, :h].to(dtype)
