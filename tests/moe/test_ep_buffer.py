"""EPBuffer exchanges on CPU processes, kernels under the Triton interpreter: results equal the
plain-PyTorch exchange references and the collective moe.dispatch/combine, several exchanges
in flight, slots reused for many exchanges, and no collective or host read per exchange."""
from __future__ import annotations

import glob

import pytest
import torch

from ep_cases import problem, valid_rows
from moe_dist_utils import run_ranks

EXPERTS, TOPK, HIDDEN, MAX_TOKENS = 8, 3, 5, 6


def _all_problems(world, routing, seed=0):
    return [problem(r, world, routing, EXPERTS, TOPK, HIDDEN, MAX_TOKENS, seed) for r in range(world)]


def _exchange_worker(rank, world, routings, num_sms, fused=False):
    import torch.distributed as dist

    from dualpipe_ext import moe
    from dualpipe_ext.kernels._common import poison_outputs
    from dualpipe_ext.kernels.ep_exchange import combine_exchange_reference, dispatch_exchange_reference

    ep = moe.EPBuffer(None, max_tokens=MAX_TOKENS, hidden=HIDDEN, dtype=torch.float32, num_sms=num_sms, max_topk=4,
                      timeout_s=30)
    ep._exchanges.fused = fused  # True: the CUDA way, put and receive at once with the waits inside the kernels
    report = []
    for seed, routing in enumerate(routings):
        problems = _all_problems(world, routing, seed)
        x, idx, w = (t.clone() for t in problems[rank])
        x.requires_grad_(True)
        w.requires_grad_(True)
        with poison_outputs():
            recv_x, recv_idx, recv_w, handle = ep.dispatch(x, idx, w, EXPERTS)
        ref_x, ref_idx, ref_w, ref_src, ref_count = dispatch_exchange_reference(
            *zip(*problems), EXPERTS, MAX_TOKENS)[rank]
        got = ref_src >= 0  # received rows; the receiver leaves the padding rows of recv_x as they were (poison)
        same = dict(x=torch.equal(recv_x[got], ref_x[got]), pad_untouched=bool(recv_x[~got].isnan().all()),
                    idx=torch.equal(recv_idx, ref_idx), w=torch.equal(recv_w, ref_w),
                    src=torch.equal(handle.recv_src, ref_src), count=torch.equal(handle.recv_count, ref_count))
        # the collective path: the same rows, bit for bit, once the padding is dropped
        cx, cidx, cw, chandle = moe.dispatch(x.detach(), idx, w.detach(), EXPERTS)
        rows = valid_rows(recv_idx)
        same.update(coll_x=torch.equal(recv_x[rows], cx), coll_idx=torch.equal(recv_idx[rows], cidx),
                    coll_w=torch.equal(recv_w[rows], cw))
        # an expert-like function of rows and weights, combined back, with gradients
        y = recv_x * (1 + recv_w.sum(1, keepdim=True))
        with poison_outputs():
            out = ep.combine(y, handle)
        ys = [None] * world
        dist.all_gather_object(ys, (y.detach(), handle.recv_src))
        ref_out = combine_exchange_reference([a for a, _ in ys], [b for _, b in ys], [p[0].shape[0] for p in problems],
                                             MAX_TOKENS)[rank]
        coll_out = moe.combine(cx * (1 + cw.sum(1, keepdim=True)), chandle)
        same.update(out=torch.equal(out, ref_out), coll_out=torch.equal(out, coll_out))
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7 + rank))
        (out * g).sum().backward()
        xc = x.detach().clone().requires_grad_(True)
        wc = w.detach().clone().requires_grad_(True)
        cx2, cidx2, cw2, ch2 = moe.dispatch(xc, idx, wc, EXPERTS)
        (moe.combine(cx2 * (1 + cw2.sum(1, keepdim=True)), ch2) * g).sum().backward()
        grads_close = (torch.allclose(x.grad, xc.grad, rtol=1e-6, atol=1e-6)
                       and torch.allclose(w.grad, wc.grad, rtol=1e-6, atol=1e-6))
        report.append((routing, same, grads_close))
    ep.close()
    return report


@pytest.mark.parametrize("world,routings,num_sms", [
    (1, ("random",), 1),
    pytest.param(2, ("random", "holes", "skewed"), 2, marks=pytest.mark.slow),
    pytest.param(4, ("skewed", "empty-rank"), 1, marks=pytest.mark.slow),
    pytest.param(8, ("random",), 3, marks=pytest.mark.slow),
])
def test_exchanges_match_references_and_collective_path(world, routings, num_sms):
    results = run_ranks(_exchange_worker, world, routings, num_sms, timeout_s=240)
    _check_exchange_reports(results)


def test_exchanges_with_the_waits_inside_the_kernels():
    # the kernels as CUDA runs them: put and receive launched together, every wait inside a kernel
    _check_exchange_reports(run_ranks(_exchange_worker, 2, ("random", "holes"), 2, True, timeout_s=240))


def _check_exchange_reports(results):
    for rank, report in enumerate(results):
        for routing, same, grads_close in report:
            assert all(same.values()), (rank, routing, {k: v for k, v in same.items() if not v})
            assert grads_close, (rank, routing)
    assert not glob.glob("/dev/shm/dualpipe_ext_ep_*")


def _received_equal(recv_x, ref):
    """recv_x equals the reference's in the received rows (padding rows are not written)."""
    got = ref[3] >= 0
    return torch.equal(recv_x[got], ref[0][got])


def _in_flight_worker(rank, world, rounds):
    from dualpipe_ext import moe
    from dualpipe_ext.kernels.ep_exchange import dispatch_exchange_reference

    ep = moe.EPBuffer(None, max_tokens=MAX_TOKENS, hidden=HIDDEN, dtype=torch.float32, max_topk=TOPK, timeout_s=30)
    ok = []
    # two dispatches in flight, waited on in the other order, then two combines in flight
    pa, pb = _all_problems(world, "random", 1), _all_problems(world, "holes", 2)
    a = ep.dispatch(*pa[rank], EXPERTS, async_op=True)
    b = ep.dispatch(*pb[rank], EXPERTS, async_op=True)
    rb, ra = b.wait(), a.wait()
    for got, probs in ((ra, pa), (rb, pb)):
        ref = dispatch_exchange_reference(*zip(*probs), EXPERTS, MAX_TOKENS)[rank]
        ok.append(_received_equal(got[0], ref) and torch.equal(got[1], ref[1]))
    ca = ep.combine(ra[0] * 2, ra[3], async_op=True)
    cb = ep.combine(rb[0] * 3, rb[3], async_op=True)
    outs = (cb.wait(), ca.wait())
    ok.append(torch.allclose(outs[1], moe.combine(moe.dispatch(*pa[rank], EXPERTS)[0] * 2,
                                                    moe.dispatch(*pa[rank], EXPERTS)[3])))
    try:  # a third of the same shape would overwrite a slot still in use
        hold = [ep.dispatch(*pa[rank], EXPERTS, async_op=True) for _ in range(2)]
        ep.dispatch(*pa[rank], EXPERTS, async_op=True)
        ok.append(False)
    except RuntimeError as e:
        ok.append("not waited on yet" in str(e) and "num_slots" in str(e))
        for h in hold:
            h.wait()
    # many successive exchanges reuse the slots (epochs keep growing)
    for i in range(rounds):
        probs = _all_problems(world, ("random", "holes", "skewed")[i % 3], 10 + i)
        recv_x, recv_idx, recv_w, handle = ep.dispatch(*probs[rank], EXPERTS)
        ref = dispatch_exchange_reference(*zip(*probs), EXPERTS, MAX_TOKENS)[rank]
        out = ep.combine(recv_x, handle)
        sent_anywhere = (probs[rank][1] >= 0).any(1, keepdim=True)
        owners = torch.stack([((probs[rank][1] >= 0) & (probs[rank][1] // (EXPERTS // world) == r)).any(1)
                              for r in range(world)], 1).sum(1, keepdim=True)
        ok.append(_received_equal(recv_x, ref) and torch.allclose(out, probs[rank][0] * owners * sent_anywhere))
    ep.close()
    return ok


@pytest.mark.slow
def test_exchanges_in_flight_and_slots_reused_many_times():
    results = run_ranks(_in_flight_worker, 2, 48, timeout_s=240)  # 4 + 4 + 96 exchanges
    for rank, ok in enumerate(results):
        assert all(ok), (rank, [i for i, v in enumerate(ok) if not v])


_COLLECTIVES = ("all_to_all_single", "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object",
                "broadcast", "broadcast_object_list", "reduce_scatter_tensor", "barrier", "send", "recv", "isend",
                "irecv", "batch_isend_irecv")


def _count_calls():
    import torch.distributed as dist

    calls = []
    for name in _COLLECTIVES:
        fn = getattr(dist, name)

        def wrapped(*a, _fn=fn, _name=name, **k):
            calls.append(_name)
            return _fn(*a, **k)

        setattr(dist, name, wrapped)
    return calls


def _no_reads_worker(rank, world):
    import os

    os.environ["DUALPIPE_EXT_TRITON"] = "1"  # every kernel through Triton (interpreted), as on a GPU
    from dualpipe_ext import moe
    from dualpipe_ext.debug import HostReadCounter

    ep = moe.EPBuffer(None, max_tokens=MAX_TOKENS, hidden=16, dtype=torch.float32, max_topk=2, timeout_s=30)
    cfg = moe.MoEConfig(hidden=16, moe_intermediate=8, num_experts=4, topk=2, num_shared_experts=1,
                        bias_update_speed=0.01)
    layer = moe.MoE(cfg, ep=ep)
    x = torch.randn(MAX_TOKENS - rank, 16, requires_grad=True)
    xx, idx, wts = problem(rank, world, "holes", 4, 2, 16, MAX_TOKENS)
    xx.requires_grad_(True)
    wts.requires_grad_(True)
    calls = _count_calls()
    with HostReadCounter() as exchange_reads:
        recv_x, recv_idx, recv_w, handle = ep.dispatch(xx, idx, wts, 4)
        out = ep.combine(recv_x * recv_w.sum(1, keepdim=True), handle)
        out.sum().backward()
    exchange_calls = list(calls)
    with HostReadCounter() as layer_reads:
        layer(x).pow(2).sum().backward()
    layer_calls = calls[len(exchange_calls):]
    layer.ep = None  # the collective path, as a control: the counters do see reads and collectives
    with HostReadCounter() as control_reads:
        layer(x).pow(2).sum().backward()
    return (exchange_reads.report(), exchange_calls, layer_reads.report(), layer_calls, len(control_reads.calls),
            len(calls) - len(exchange_calls) - len(layer_calls))


@pytest.mark.slow
def test_no_host_reads_and_no_collectives_per_exchange():
    results = run_ranks(_no_reads_worker, 2, timeout_s=240)
    for exchange_reads, exchange_calls, layer_reads, layer_calls, control_reads, control_calls in results:
        assert exchange_reads == "no host reads", exchange_reads
        assert layer_reads == "no host reads", layer_reads
        assert exchange_calls == [] and layer_calls == [], (exchange_calls, layer_calls)
        assert control_reads > 5 and control_calls >= 3


def _fallback_worker(rank, world):
    from dualpipe_ext import moe
    from dualpipe_ext.kernels.ep_exchange import dispatch_exchange_reference

    ep = moe.EPBuffer(None, max_tokens=MAX_TOKENS, hidden=HIDDEN, dtype=torch.float32, max_topk=TOPK, timeout_s=30)
    ep._exchanges.has_poll = False  # the wait of Triton releases without tl.atomic_poll
    probs = _all_problems(world, "random", 3)
    got = [ep.dispatch(*probs[rank], EXPERTS)[0] for _ in range(3)]
    ref = dispatch_exchange_reference(*zip(*probs), EXPERTS, MAX_TOKENS)[rank]
    return all(_received_equal(g, ref) for g in got)


@pytest.mark.slow
def test_spin_loop_wait_without_atomic_poll():
    assert all(run_ranks(_fallback_worker, 2, timeout_s=120))


@pytest.mark.parametrize("world,max_tokens,hidden,max_topk,slots,elem", [(1, 5, 5, 3, 2, 4), (3, 7, 9, 5, 3, 2),
                                                                         (8, 4096, 7168, 8, 2, 2)])
def test_every_slot_of_every_region_is_128_byte_aligned(world, max_tokens, hidden, max_topk, slots, elem):
    # the kernels declare the regions 16-byte aligned (tl.multiple_of) to move rows as 128-bit accesses
    from dualpipe_ext.kernels.ep_exchange import ExchangeLayout, row_vec

    lay = ExchangeLayout.build(world, max_tokens, hidden, max_topk, slots, elem)
    offsets = [o for s in range(slots) for o in lay.slot_offsets(s)]
    assert all(o % 128 == 0 for o in offsets) and len(set(offsets)) == len(offsets)
    assert max(offsets) < lay.nbytes
    vec = row_vec(hidden, elem)
    assert hidden % vec == 0 and vec * elem <= 16 and (vec * elem == 16 or hidden % (2 * vec))
