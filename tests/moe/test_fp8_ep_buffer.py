"""FP8 dispatch through EPBuffer (CPU processes, kernels under the Triton interpreter): the packed
e4m3 rows and scales cross in the slots of the buffer's rows, the received rows are bit for bit
those of an EPBuffer dispatch of the dequantized tokens and of the collective FP8 dispatch, the
gradient goes straight through, and the MoE layer runs FP8 dispatch on this path."""
from __future__ import annotations

import pytest
import torch

from ep_cases import problem, valid_rows
from moe_dist_utils import run_ranks

EXPERTS, TOPK, MAX_TOKENS = 8, 3, 6


def test_fp8_rows_pack_into_16_byte_multiples_and_fit_the_slot_rows():
    from dualpipe_ext.kernels import fp8
    from dualpipe_ext.kernels.ep_common import ExchangeLayout, row_geometry
    from dualpipe_ext.moe.ep_ops import _pack_fp8

    for hidden, dtype in ((100, torch.bfloat16), (200, torch.float32), (256, torch.float16)):
        row_bytes = -(-fp8.packed_row_bytes(hidden) // 16) * 16
        x = torch.randn(5, hidden).to(dtype)
        packed = _pack_fp8(x, row_bytes, ue8m0=False)
        assert packed.dtype == torch.int32 and packed.shape == (5, row_bytes // 4)
        raw = packed.view(torch.uint8)
        assert torch.equal(raw[:, fp8.packed_row_bytes(hidden):], torch.zeros_like(raw[:, fp8.packed_row_bytes(hidden):]))
        q, scales = fp8.unpack(raw[:, :fp8.packed_row_bytes(hidden)], hidden)
        assert torch.equal(fp8.dequantize_reference(q, scales, dtype).view(torch.uint8),
                           fp8.round_trip(x).view(torch.uint8))
        elem = torch.empty(0, dtype=dtype).element_size()
        lay = ExchangeLayout.build(2, 4, hidden, 4, 1, elem)
        width, stride, consts = row_geometry(lay, packed)
        assert (width, stride) == (row_bytes // 4, hidden * elem // 4)
        assert width % consts["VEC"] == 0 and stride % consts["VEC"] == 0
        assert consts["VEC"] == (4 if (hidden * elem) % 16 == 0 else consts["VEC"])
        # the rows of the buffer's own dtype walk as before
        assert row_geometry(lay, x)[:2] == (hidden, hidden)
    lay = ExchangeLayout.build(2, 4, 4, 4, 1, 2)  # 8-byte bf16 rows: a 16-byte FP8 row does not fit
    with pytest.raises(ValueError, match="do not fit"):
        row_geometry(lay, torch.zeros(1, 4, dtype=torch.int32))


def _exchange_worker(rank, world, hidden, dtype, fused):
    from dualpipe_ext import moe
    from dualpipe_ext.kernels import fp8
    from dualpipe_ext.kernels._common import poison_outputs

    ep = moe.EPBuffer(None, max_tokens=MAX_TOKENS, hidden=hidden, dtype=dtype, num_sms=2, max_topk=4, timeout_s=60)
    ep._exchanges.fused = fused
    report = []
    for seed, (routing, ue8m0, async_op) in enumerate((("random", False, False), ("holes", True, True))):
        x, idx, w = problem(rank, world, routing, EXPERTS, TOPK, hidden, MAX_TOKENS, seed, dtype)
        x = (x * 3).requires_grad_(True)
        with poison_outputs():
            res = ep.dispatch(x, idx, w, EXPERTS, async_op=async_op, fp8=True, ue8m0=ue8m0)
            recv_x, recv_idx, recv_w, handle = res.wait() if async_op else res
            rounded = fp8.round_trip(x.detach(), ue8m0=ue8m0)
            px, pidx, pw, ph = ep.dispatch(rounded, idx, w, EXPERTS)
        got = handle.recv_src >= 0
        same = dict(dtype=recv_x.dtype == dtype,
                    x=torch.equal(recv_x[got].detach().view(torch.uint8), px[got].view(torch.uint8)),
                    idx=torch.equal(recv_idx, pidx), w=torch.equal(recv_w.detach(), pw),
                    src=torch.equal(handle.recv_src, ph.recv_src), count=torch.equal(handle.recv_count, ph.recv_count),
                    rounded=bool(got.sum() == 0) or not torch.equal(recv_x[got].detach(),
                                                                     ep.dispatch(x.detach(), idx, w, EXPERTS)[0][got]))
        # the collective FP8 dispatch: the same rows once the padding is dropped (both in source order)
        cx, cidx, cw, _ = moe.dispatch(x.detach(), idx, w, EXPERTS, fp8=True, ue8m0=ue8m0)
        rows = valid_rows(recv_idx)
        same.update(coll_x=torch.equal(recv_x[rows].detach().view(torch.uint8), cx.view(torch.uint8)),
                    coll_idx=torch.equal(recv_idx[rows], cidx), coll_w=torch.equal(recv_w[rows].detach(), cw))
        # straight-through: x.grad is that of an unquantized EPBuffer dispatch (padding rows get no gradient)
        g = torch.randn(recv_x.shape, generator=torch.Generator().manual_seed(5 + rank)).to(dtype)
        g[~got] = 0
        (torch.where(got[:, None], recv_x, torch.zeros((), dtype=dtype)) * g).sum().backward()
        x2 = x.detach().clone().requires_grad_(True)
        r2 = ep.dispatch(x2, idx, w, EXPERTS)
        (torch.where(got[:, None], r2[0], torch.zeros((), dtype=dtype)) * g).sum().backward()
        same.update(grad=torch.equal(x.grad, x2.grad))
        # combine after an FP8 dispatch stays in the buffer's dtype
        out = ep.combine(torch.where(got[:, None], recv_x.detach(), torch.zeros((), dtype=dtype)), handle)
        outp = ep.combine(torch.where(got[:, None], px, torch.zeros((), dtype=dtype)), ph)
        same.update(combine=torch.equal(out.view(torch.uint8), outp.view(torch.uint8)))
        report.append((routing, same))
    ep.close()
    return report


@pytest.mark.slow
@pytest.mark.parametrize("hidden,dtype,fused,world", [
    (100, torch.bfloat16, False, 2),  # 104 bytes of FP8 row padded to 112, in 200-byte slot rows
    (200, torch.float32, True, 2),  # two scale groups, one partial; the waits inside the kernels as on CUDA
    (102, torch.float16, False, 4),  # scales at byte 102 of the slot row (not 4-byte aligned), 4 ranks
])
def test_fp8_epbuffer_dispatch_is_a_dispatch_of_the_dequantized_tokens(hidden, dtype, fused, world):
    for rank, report in enumerate(run_ranks(_exchange_worker, world, hidden, dtype, fused, timeout_s=600)):
        for routing, same in report:
            assert all(same.values()), (rank, routing, {k: v for k, v in same.items() if not v})


def _errors_worker(rank, world):
    from dualpipe_ext import moe

    out = {}
    ep = moe.EPBuffer(None, max_tokens=MAX_TOKENS, hidden=4, dtype=torch.bfloat16, max_topk=4, timeout_s=60)
    x, idx, w = problem(rank, world, "random", EXPERTS, TOPK, 4, MAX_TOKENS, 0, torch.bfloat16)
    try:  # a 16-byte FP8 row does not fit an 8-byte slot row: every rank raises the same error
        ep.dispatch(x, idx, w, EXPERTS, fp8=True)
        out["fit"] = "no error"
    except ValueError as e:
        out["fit"] = str(e)
    ep.close()
    ep = moe.EPBuffer(None, max_tokens=MAX_TOKENS, hidden=16, dtype=torch.bfloat16, max_topk=4, timeout_s=60)
    x, idx, w = problem(rank, world, "random", EXPERTS, TOPK, 16, MAX_TOKENS, 0, torch.bfloat16)
    try:  # rank 1 alone asks for FP8
        ep.dispatch(x, idx, w, EXPERTS, fp8=rank == 1)
        out["disagree"] = "no error"
    except ValueError as e:
        out["disagree"] = str(e)
    ep.close()
    return out


def test_fp8_epbuffer_bad_input_raises_on_every_rank():
    for res in run_ranks(_errors_worker, 2, timeout_s=300):
        assert "fp8 rows do not fit" in res["fit"], res
        assert "or fp8 differ" in res["disagree"] and "fp8 mode 1" in res["disagree"], res


def _layer_worker(rank, world, hidden):
    import os

    os.environ["DUALPIPE_EXT_TRITON"] = "1"
    from dualpipe_ext import moe

    out = {}
    for path in ("ep", "collective"):
        torch.manual_seed(0)  # the same weights on every rank and on both paths
        cfg = moe.MoEConfig(hidden=hidden, moe_intermediate=4, num_experts=4, topk=2, num_shared_experts=1,
                            fp8_dispatch=True)
        ep = (moe.EPBuffer(None, max_tokens=MAX_TOKENS, hidden=hidden, dtype=torch.float32, max_topk=2,
                           timeout_s=60) if path == "ep" else None)
        layer = moe.MoE(cfg, ep=ep)
        stats = []
        layer.register_dispatch_hook(lambda lay, handle: stats.append(lay.dispatch_stats(handle)))
        x = torch.randn(MAX_TOKENS - rank, hidden, generator=torch.Generator().manual_seed(rank)).requires_grad_(True)
        y = layer(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        out[path] = dict(out=y.detach(), grad_x=x.grad, row_bytes=layer.dispatch_row_bytes,
                         ep_row_bytes=ep.fp8_row_bytes if ep is not None else None,
                         rows=[st.received_rows for st in stats], bytes=[st.received_bytes for st in stats])
        if ep is not None:
            ep.close()
    return out


@pytest.mark.slow
def test_moe_layer_with_fp8_dispatch_on_the_epbuffer_path():
    hidden = 40  # 40 e4m3 bytes + 4 of scale, padded to 48
    for res in run_ranks(_layer_worker, 2, hidden, timeout_s=600):
        ep, coll = res["ep"], res["collective"]
        assert ep["row_bytes"] == ep["ep_row_bytes"] == 48 and coll["row_bytes"] == 44
        # one dispatch each, the same rows received (padding rows of the buffer not counted)
        assert len(ep["rows"]) == 1 and ep["rows"] == coll["rows"] and ep["rows"][0] > 0
        assert ep["bytes"] == [48 * ep["rows"][0]] and coll["bytes"] == [44 * coll["rows"][0]]
        # the same FP8-rounded rows reach the same experts; only the summation order may differ
        assert torch.allclose(ep["out"], coll["out"], rtol=1e-5, atol=1e-6)
        assert torch.allclose(ep["grad_x"], coll["grad_x"], rtol=1e-5, atol=1e-6)


_COMPILE_FP8 = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("compile_ep_kernels", sys.argv[1])
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
kx = m.kx
blocks = dict(WP=8, KP=8, BLOCK_T=16, BLOCK_H=512, VEC=4, HAS_POLL=False)
out = {}
for fn, consts, warps in ((kx._put_dispatch_kernel, dict(ROUTES=True, WAIT_ACK=True), kx.NUM_WARPS_PUT),):
    k = m.compile_one(fn, "i32", {**blocks, **consts}, warps)
    out[fn.__name__] = m.global_ops(k.asm["ptx"])
print(json.dumps(out))
"""


@pytest.mark.slow
def test_fp8_rows_move_as_128_bit_accesses_on_sm90(tmp_path):
    # packed FP8 rows travel as int32 words (VEC = 4: 16 bytes) through the same put kernel; the receive
    # kernel's FP8 variant (dequantizing) is checked in tests/kernels/test_compile_sm90.py
    pytest.importorskip("triton.backends.nvidia")
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    script = os.path.join(os.path.dirname(__file__), "..", "kernels", "compile_ep_kernels.py")
    proc = subprocess.run([sys.executable, "-c", _COMPILE_FP8, script], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    from dualpipe_ext.kernels.ep_exchange import NUM_WARPS_PUT

    per_tile = 16 * 512 * 4 // 16 // (32 * NUM_WARPS_PUT)  # a 16 x 512 tile of int32 in 16-byte vectors
    assert set(got) == {"_put_dispatch_kernel"}
    for name, ops in got.items():
        assert ops.get("st.global.v4.b32", 0) >= per_tile, (name, ops)
        assert ops.get("ld.global.v4.b32", 0) >= per_tile, (name, ops)
