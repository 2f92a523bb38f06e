"""FP8 (e4m3, 1x128 groups) quantize/dequantize: the Triton kernels (interpreted) against the
PyTorch reference bit for bit, and the reference against torch's own float8_e4m3fn cast."""
import pytest
import torch

from dualpipe_ext.kernels import fp8
from dualpipe_ext.kernels._common import poison_outputs

DTYPES = [torch.bfloat16, torch.float32]


def _bits(t):
    return t.view(torch.uint8) if t.element_size() == 1 else t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _rows(kind, num_tokens, hidden, dtype):
    x = torch.randn(num_tokens, hidden)
    if kind == "constant":
        x = torch.full((num_tokens, hidden), -2.75)
    elif kind == "zero":
        x = torch.zeros(num_tokens, hidden)
        x[::2] = -0.0  # signed zeros stay signed
    elif kind == "tiny":  # e4m3 subnormals after scaling: a wide range inside each group, and fp32 denormals
        x = x * torch.exp2(torch.randint(-24, 1, (num_tokens, hidden)).float())
        x[::3] = x[::3] * 1e-38
    elif kind == "huge":  # amax near the top of bf16/fp32: scales near the largest floats
        x = x * 3e37
    elif kind == "mixed":  # one large value per row: the rest of its group lands near or under 2**-6
        x[:, 5] = 1e4
    return x.to(dtype)


def _check(x, ue8m0):
    with poison_outputs():
        got = fp8.quantize(x, ue8m0=ue8m0)
    want = fp8.quantize_reference(x, ue8m0=ue8m0)
    assert got.q.dtype == torch.float8_e4m3fn and got.q.shape == x.shape
    assert got.scales.dtype == torch.float32 and got.scales.shape == (x.shape[0], fp8.num_groups(x.shape[1]))
    assert torch.equal(_bits(got.q), _bits(want.q))
    assert torch.equal(_bits(got.scales), _bits(want.scales))
    assert bool(torch.isfinite(got.scales).all()) and bool((got.scales > 0).all())
    assert not bool(((_bits(got.q) & 0x7F) == 0x7F).any())  # never NaN
    if ue8m0:
        assert torch.equal(got.scales, torch.exp2(torch.log2(got.scales).round()))
    for out_dtype in (x.dtype, torch.float32):
        with poison_outputs():
            back = fp8.dequantize(got.q, got.scales, out_dtype)
        assert back.dtype == out_dtype
        assert torch.equal(_bits(back), _bits(fp8.dequantize_reference(want.q, want.scales, out_dtype)))
    return got


@pytest.mark.parametrize("kind", ["random", "constant", "zero", "tiny", "huge", "mixed"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ue8m0", [False, True])
def test_quantize_bitwise(kind, dtype, ue8m0):
    _check(_rows(kind, 97, 256, dtype), ue8m0)


@pytest.mark.parametrize("num_tokens,hidden", [(1, 128), (97, 200), (123, 1), (97, 127), (1, 300), (123, 64),
                                               (8, 129), (0, 128)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_awkward_sizes(num_tokens, hidden, dtype):
    got = _check(_rows("random", num_tokens, hidden, dtype), ue8m0=False)
    if num_tokens and hidden % 128:
        # the partial last group: its scale comes from its own hidden % 128 columns only
        tail = _rows("random", num_tokens, hidden, dtype)
        tail[:, -(hidden % 128):] *= 1e-3
        q = fp8.quantize(tail)
        amax = tail[:, -(hidden % 128):].float().abs().amax(1)
        assert torch.equal(q.scales[:, -1], amax / 448)


def test_fp16_input_and_output():
    x = torch.randn(33, 300, dtype=torch.float16)
    got = _check(x, ue8m0=False)
    with poison_outputs():
        back = fp8.dequantize(got.q, got.scales, torch.float16)
    assert torch.equal(_bits(back), _bits(fp8.dequantize_reference(got.q, got.scales, torch.float16)))


def test_strided_rows_and_uint8_codes():
    big = torch.randn(50, 400)
    x = big[::2, 10:310]  # rows strided, not contiguous
    got = _check(x, ue8m0=False)
    packed = fp8.pack(got.q, got.scales)
    assert packed.dtype == torch.uint8 and packed.shape == (25, fp8.packed_row_bytes(300)) == (25, 300 + 4 * 3)
    q, s = fp8.unpack(packed, 300)  # q: a strided uint8 view into the packed rows
    with poison_outputs():
        back = fp8.dequantize(q, s, torch.float32)
    assert torch.equal(back, fp8.dequantize_reference(got.q, got.scales, torch.float32))


def test_reference_rounding_is_torch_cast_with_saturation():
    # every float32 that maps to e4m3 boundaries: all codes, their midpoints (ties), one ulp either side
    values = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    mids = (values[:-1] + values[1:]) / 2
    near = torch.cat([mids, torch.nextafter(mids, torch.full_like(mids, 1e9)),
                      torch.nextafter(mids, torch.zeros_like(mids)), values])
    y = torch.cat([near, -near, torch.randn(100_000) * 50, torch.randn(100_000) * 1e-2,
                   torch.tensor([447.9, 448.0, 460.0, 464.0, 465.0, 1e30, -1e30, 1e-45, -1e-45, 0.0, -0.0])])
    got = fp8.e4m3_bits_reference(y)
    torch_cast = y.clamp(-448.0, 448.0).to(torch.float8_e4m3fn).view(torch.uint8).to(torch.int32)
    assert torch.equal(got, torch_cast)


def test_reference_matches_torch_cast_of_the_scaled_group():
    x = torch.randn(64, 384) * 10
    q, s = fp8.quantize_reference(x)
    scaled = x.view(64, 3, 128) / (x.view(64, 3, 128).abs().amax(-1, keepdim=True) / 448)
    assert torch.equal(q.view(torch.uint8), scaled.reshape(64, 384).to(torch.float8_e4m3fn).view(torch.uint8))
    assert torch.equal(s, x.view(64, 3, 128).abs().amax(-1) / 448)


def test_dequantize_decodes_every_code_like_torch():
    codes = torch.arange(256, dtype=torch.int64).to(torch.uint8).view(2, 128)
    scales = torch.tensor([[1.0], [0.375]])
    with poison_outputs():
        got = fp8.dequantize(codes, scales, torch.float32)
    want = codes.view(torch.float8_e4m3fn).float() * scales
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0))


@pytest.mark.parametrize("ue8m0", [False, True])
def test_round_trip_error_bound(ue8m0):
    # e4m3 keeps 3 mantissa bits: relative error <= 2**-4 for values in the normal range of their group
    x = torch.randn(97, 256)
    back = fp8.round_trip(x, ue8m0=ue8m0)
    amax = x.view(97, 2, 128).abs().amax(-1, keepdim=True)
    err = (back - x).view(97, 2, 128).abs()
    scale = (amax / 448) if not ue8m0 else fp8.quantize(x, ue8m0=True).scales[..., None]
    normal = x.view(97, 2, 128).abs() >= scale * 2 ** -6
    assert bool((err <= x.view(97, 2, 128).abs() * 2 ** -4 + 1e-30)[normal].all())
    assert bool((err <= scale * 2 ** -10)[~normal].all())  # subnormal steps are scale * 2**-9


def test_bad_input():
    with pytest.raises(ValueError, match="x must have dtype"):
        fp8.quantize(torch.zeros(4, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="x must have 2 dimensions"):
        fp8.quantize(torch.zeros(8))
    q, s = fp8.quantize(torch.randn(4, 130))
    with pytest.raises(ValueError, match=r"scales must be \[4, 2\]"):
        fp8.dequantize(q, s[:, :1])
    with pytest.raises(ValueError, match="dtype must be one of"):
        fp8.dequantize(q, s, torch.float64)
    with pytest.raises(ValueError, match=r"rows must be \[n, 138\] uint8"):
        fp8.unpack(torch.zeros(4, 130, dtype=torch.uint8), 130)


def test_reference_scale_is_the_correctly_rounded_quotient():
    """amax / 448 rounded once (float64 quotient rounded to float32), not amax * (1 / 448), which is what
    torch computes on CUDA for a Python-number divisor: the two differ for some amax."""
    from dualpipe_ext.kernels import fp8

    g = torch.Generator().manual_seed(3)
    x = torch.randn(512, 128, generator=g) * torch.rand(512, 1, generator=g) * 100
    scales = fp8.quantize_reference(x).scales[:, 0]
    exact = (x.abs().amax(1).double() / 448.0).float()
    assert torch.equal(scales, exact)
    assert not torch.equal(exact, (x.abs().amax(1) * (1.0 / 448.0)))  # the test can tell the two apart
