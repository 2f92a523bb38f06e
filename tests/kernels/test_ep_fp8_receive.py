"""The dispatch receive kernel dequantizes packed FP8 rows on the way out of the slot, bit for bit as
``fp8.dequantize_reference`` does. One process plays every rank of a small group: the ranks'
symmetric buffers are plain CPU tensors in one table, the kernels run under the interpreter
(puts first, then each rank's receive: no wait inside a launch)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

EXPERTS, TOPK, MAX_TOKENS, WORLD = 4, 2, 5, 2


class _Group:
    """Every rank's buffer, in one process."""

    def __init__(self, hidden: int, dtype: torch.dtype, num_programs: int = 2):
        from dualpipe_ext.kernels import ep_exchange as kx

        self.kx = kx
        elem = torch.empty(0, dtype=dtype).element_size()
        self.layout = kx.ExchangeLayout.build(WORLD, MAX_TOKENS, hidden, TOPK, 1, elem)
        self.bufs = [torch.zeros(self.layout.nbytes, dtype=torch.uint8) for _ in range(WORLD)]
        self.table = torch.tensor([b.data_ptr() for b in self.bufs], dtype=torch.int64)
        self.status = torch.zeros(2 * WORLD + 1, dtype=torch.int64)
        self.status_addr = torch.tensor([self.status.data_ptr()], dtype=torch.int64)
        self.epochs = [torch.zeros(2, dtype=torch.int64) for _ in range(WORLD)]
        self.channels = [kx.Channel(self.table, self.status_addr, self.epochs[r], self.layout, r, 0, num_programs,
                                    10 ** 9, 1000, False) for r in range(WORLD)]

    def exchange(self, packed, idxs, ws, out_dtype, packed_fp8=True):
        """Every rank puts its packed rows, then every rank receives; returns each rank's outputs."""
        from dualpipe_ext.kernels._common import new_output, poison_outputs

        kx = self.kx
        for r in range(WORLD):
            pos, counts = kx.compact_positions(idxs[r], EXPERTS, WORLD)
            kx.launch_put_dispatch(self.channels[r], packed[r], pos, counts, (idxs[r], ws[r]), EXPERTS, TOPK)
        out = []
        for r in range(WORLD):
            cap = WORLD * MAX_TOKENS
            with poison_outputs():
                recv_x = new_output((cap, self.layout.hidden), out_dtype, torch.device("cpu"))
                routes = (new_output((cap, TOPK), torch.int64, torch.device("cpu")),
                          new_output((cap, TOPK), torch.float32, torch.device("cpu")),
                          new_output((cap,), torch.int64, torch.device("cpu")))
                count = new_output((WORLD,), torch.int64, torch.device("cpu"))
            before = recv_x.clone()
            kx.launch_recv_dispatch(self.channels[r], recv_x, routes, count, TOPK, packed_fp8=packed_fp8)
            out.append((recv_x, *routes, count, before))
        assert not self.status.any(), self.status  # no wait expired
        return out


def _routing(rank: int, n: int):
    g = torch.Generator().manual_seed(100 + rank)
    idx = torch.rand(n, EXPERTS, generator=g).argsort(1)[:, :TOPK].contiguous()
    if n:
        idx[::3, -1] = -1
    return idx, torch.where(idx >= 0, torch.rand(n, TOPK, generator=g), 0.0)


def _packed(q: torch.Tensor, scales: torch.Tensor, row_bytes: int) -> torch.Tensor:
    """[n, row_bytes // 4] int32: e4m3 bytes, the scales' bytes, zeros (what ``EPBuffer.dispatch`` sends)."""
    from dualpipe_ext.kernels import fp8

    packed = torch.zeros(q.shape[0], row_bytes, dtype=torch.uint8)
    packed[:, :fp8.packed_row_bytes(q.shape[1])] = fp8.pack(q, scales)
    return packed.view(torch.int32)


def _row_bytes(hidden: int) -> int:
    from dualpipe_ext.kernels import fp8

    return -(-fp8.packed_row_bytes(hidden) // 16) * 16


def _check(group, q, scales, idxs, ws, out_dtype):
    from dualpipe_ext.kernels import fp8

    packed = [_packed(q[r], scales[r], _row_bytes(q[r].shape[1])) for r in range(WORLD)]
    got = group.exchange(packed, idxs, ws, out_dtype)
    xs = [fp8.dequantize_reference(q[r], scales[r], out_dtype) for r in range(WORLD)]
    ref = group.kx.dispatch_exchange_reference(xs, idxs, ws, EXPERTS, MAX_TOKENS)
    for r in range(WORLD):
        recv_x, recv_idx, recv_w, recv_src, count, before = got[r]
        rx, ridx, rw, rsrc, rcount = ref[r]
        assert torch.equal(count, rcount) and torch.equal(recv_src, rsrc), r
        assert torch.equal(recv_idx, ridx) and torch.equal(recv_w, rw), r
        rows = rsrc >= 0
        assert rows.any()
        bits = torch.int16 if out_dtype != torch.float32 else torch.int32
        assert torch.equal(recv_x[rows].view(bits), rx[rows].view(bits)), r  # bit for bit, signed zeros too
        assert torch.equal(recv_x[~rows].view(bits), before[~rows].view(bits)), r  # padding rows not written


def _tokens(rank: int) -> int:
    return MAX_TOKENS - rank


@pytest.mark.parametrize("hidden,buffer_dtype,out_dtype", [
    (256, torch.bfloat16, torch.bfloat16),  # two whole groups, 16-byte code loads
    (200, torch.float32, torch.float32),  # a partial last group
    (102, torch.bfloat16, torch.bfloat16),  # scales at byte 102: not 4-byte aligned
    (1000, torch.float16, torch.float16),  # 8 groups (two tiles of 4), the last partial
    (12, torch.bfloat16, torch.bfloat16),  # 16 bytes of FP8 row in a 24-byte slot row: 4-byte code loads
])
def test_receive_dequantizes_quantized_rows_as_the_reference(hidden, buffer_dtype, out_dtype):
    from dualpipe_ext.kernels import fp8

    group = _Group(hidden, buffer_dtype)
    q, s, idxs, ws = [], [], [], []
    for r in range(WORLD):
        g = torch.Generator().manual_seed(r)
        x = (torch.randn(_tokens(r), hidden, generator=g) * torch.logspace(-3, 3, hidden)).to(out_dtype)
        qr, sr = fp8.quantize_reference(x, ue8m0=r == 1)
        q.append(qr)
        s.append(sr)
        idx, w = _routing(r, _tokens(r))
        idxs.append(idx)
        ws.append(w)
    _check(group, q, s, idxs, ws, out_dtype)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_receive_dequantizes_every_code_and_extreme_scales(out_dtype):
    # raw codes (every finite e4m3 value, both signs, zeros) against scales from 2**-80 to 2**127:
    # products that underflow, overflow the output dtype (inf) and overflow float32 itself
    hidden = 300
    group = _Group(hidden, torch.float32)
    q, s, idxs, ws = [], [], [], []
    codes = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)
    for r in range(WORLD):
        g = torch.Generator().manual_seed(7 + r)
        n = _tokens(r)
        qr = codes[torch.randint(0, codes.numel(), (n, hidden), generator=g)]
        qr[0] = 0x7E if r == 0 else 0xFE  # saturated row: +-448
        qr[1] = 0 if r == 0 else 0x80  # zero row, +0 and -0
        exps = torch.randint(-80, 127, (n, 3), generator=g).float()
        sr = (1 + torch.rand(n, 3, generator=g)) * torch.exp2(exps)  # finite, below 2**127
        sr[0] = torch.finfo(torch.float32).max  # 448 * max: inf in float32
        sr[1] = 2.0 ** -64 / 448  # quantize's scale of an all-zero group
        qr[2] = torch.tensor([0x38, 0x40, 0xB8, 0x30], dtype=torch.uint8).repeat(hidden // 4)  # +-1, 2, 0.5
        sr[2] = 1 + 3 * 2.0 ** -8 if r == 0 else 1 + 3 * 2.0 ** -11  # halfway between two bf16 (fp16) values
        q.append(qr.view(torch.float8_e4m3fn))
        s.append(sr)
        idx, w = _routing(r, n)
        idx[:3] = torch.tensor([0, 2])  # the special rows reach both ranks
        idxs.append(idx)
        ws.append(torch.where(idx >= 0, w, 0.0))
    _check(group, q, s, idxs, ws, out_dtype)


def test_receive_without_fp8_still_copies_rows_unchanged():
    group = _Group(40, torch.bfloat16)
    xs, idxs, ws = [], [], []
    for r in range(WORLD):
        xs.append(torch.randn(_tokens(r), 40).to(torch.bfloat16))
        idx, w = _routing(r, _tokens(r))
        idxs.append(idx)
        ws.append(w)
    got = group.exchange(xs, idxs, ws, torch.bfloat16, packed_fp8=False)
    ref = group.kx.dispatch_exchange_reference(xs, idxs, ws, EXPERTS, MAX_TOKENS)
    for r in range(WORLD):
        rows = ref[r][3] >= 0
        assert torch.equal(got[r][0][rows].view(torch.int16), ref[r][0][rows].view(torch.int16))


def test_fp8_receive_geometry_and_bad_outputs():
    from dualpipe_ext.kernels import ep_exchange as kx

    lay = kx.ExchangeLayout.build(2, 4, 7168, 8, 2, 2)
    width, pitch, consts = kx.fp8_row_geometry(lay, torch.empty(0, 7168, dtype=torch.bfloat16))
    assert (width, pitch) == (7168, 14336) and consts["VEC"] == 16 and consts["BLOCK_H"] == 512
    assert consts["FP8"] == 2
    lay = kx.ExchangeLayout.build(2, 4, 102, 8, 2, 2)
    width, pitch, consts = kx.fp8_row_geometry(lay, torch.empty(0, 102, dtype=torch.float32))
    assert (width, pitch, consts["VEC"], consts["BLOCK_H"], consts["FP8"]) == (102, 204, 2, 128, 1)
    with pytest.raises(ValueError, match="dequantize into"):
        kx.fp8_row_geometry(lay, torch.empty(0, 102, dtype=torch.int32))
    with pytest.raises(ValueError, match="dequantize into"):
        kx.fp8_row_geometry(lay, torch.empty(0, 100, dtype=torch.float32))
    lay = kx.ExchangeLayout.build(2, 4, 4, 8, 2, 2)  # 4 + 4 bytes in 8-byte rows fit; 2-byte rows do not
    assert kx.fp8_row_geometry(lay, torch.empty(0, 4, dtype=torch.bfloat16))[1] == 8
    lay = kx.ExchangeLayout.build(2, 4, 2, 8, 2, 2)
    with pytest.raises(ValueError, match="do not fit"):
        kx.fp8_row_geometry(lay, torch.empty(0, 2, dtype=torch.bfloat16))
