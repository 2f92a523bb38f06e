"""How many collectives dispatch and combine issue (so the number cannot grow unnoticed), that
an async issue sends the control exchange alone and the payload follows at ``progress()``,
that bad input costs the control exchange alone, and that indices and weights arrive bit for bit."""
from __future__ import annotations

import pytest
import torch

from moe_dist_utils import run_ranks

WORLD, EXPERTS, TOPK, HIDDEN = 3, 6, 3, 5
TOKENS = [7, 0, 4]
_COLLECTIVES = ("all_to_all_single", "all_reduce", "all_gather", "all_gather_into_tensor", "broadcast",
                "reduce_scatter_tensor", "barrier", "send", "recv", "isend", "irecv", "batch_isend_irecv")


def _problem(rank):
    """This rank's tokens; every rank can rebuild every other rank's from the same seed."""
    g = torch.Generator().manual_seed(100 + rank)
    n = TOKENS[rank]
    x = torch.randn(n, HIDDEN, generator=g, dtype=torch.float64)
    idx = torch.rand(n, EXPERTS, generator=g).argsort(1)[:, :TOPK].contiguous()
    if n > 1:
        idx[1, 0] = -1
    # awkward float32 bit patterns: a subnormal, a negative zero, the largest finite value
    w = torch.rand(n, TOPK, generator=g)
    specials = torch.tensor([1e-40, -0.0, torch.finfo(torch.float32).max, -3.5])
    w.view(-1)[: min(w.numel(), 4)] = specials[: min(w.numel(), 4)]
    return x, idx, w


def _expected_routes(rank):
    """(recv_idx, recv_weights) this rank must receive: by source rank, then token."""
    local = EXPERTS // WORLD
    idx_rows, w_rows = [], []
    for s in range(WORLD):
        _, idx, w = _problem(s)
        for t in range(idx.shape[0]):
            mine = (idx[t] >= 0) & (idx[t] // local == rank)
            if mine.any():
                idx_rows.append(torch.where(mine, idx[t] - rank * local, torch.full_like(idx[t], -1)))
                w_rows.append(torch.where(mine, w[t], torch.zeros_like(w[t])))
    if not idx_rows:
        return torch.empty(0, TOPK, dtype=torch.int64), torch.empty(0, TOPK)
    return torch.stack(idx_rows), torch.stack(w_rows)


def _worker(rank, world):
    import torch.distributed as dist

    from dualpipe_ext import moe

    calls = []
    for name in _COLLECTIVES:
        fn = getattr(dist, name, None)
        if fn is not None:
            def wrapped(*a, _fn=fn, _name=name, **k):
                calls.append((_name, bool(k.get("async_op", False))))
                return _fn(*a, **k)

            setattr(dist, name, wrapped)

    def issued(fn):
        start = len(calls)
        try:
            result = fn()
        except ValueError as e:
            result = e
        return result, calls[start:]

    x, idx, w = _problem(rank)
    x.requires_grad_(True)
    w.requires_grad_(True)
    out = {}
    (recv_x, recv_idx, recv_w, handle), out["dispatch"] = issued(lambda: moe.dispatch(x, idx, w, EXPERTS))
    y = recv_x * recv_w.sum(1, keepdim=True).to(recv_x.dtype)
    combined, out["combine"] = issued(lambda: moe.combine(y, handle))
    _, out["backward"] = issued(lambda: combined.sum().backward())
    out["routes"] = (recv_idx, recv_w.detach())
    out["grad_w"] = w.grad

    pending, out["dispatch_async_issue"] = issued(lambda: moe.dispatch(x, idx, w, EXPERTS, async_op=True))
    _, out["dispatch_async_progress"] = issued(pending.progress)
    (recv_x2, recv_idx2, recv_w2, handle2), out["dispatch_async_wait"] = issued(pending.wait)
    out["routes_async"] = (recv_idx2, recv_w2.detach())
    pending, out["combine_async_issue"] = issued(lambda: moe.combine(recv_x2, handle2, async_op=True))
    _, out["combine_async_wait"] = issued(pending.wait)

    bad_idx = idx.clone() if rank != 2 else torch.full_like(idx, EXPERTS)
    out["bad_dispatch"] = issued(lambda: moe.dispatch(x, bad_idx, w, EXPERTS))
    out["dtype_mismatch"] = issued(lambda: moe.dispatch(x.float() if rank == 1 else x, idx, w, EXPERTS))
    # rank 0 passes the handle of another dispatch (every token to expert 0): must fail everywhere
    to_first = torch.full_like(idx, -1)
    to_first[:, 0] = 0
    other = moe.dispatch(x, to_first, w, EXPERTS)[3]
    other = other if rank == 0 else handle
    y0 = torch.zeros(other.num_recv, HIDDEN, dtype=torch.float64)
    out["handle_mismatch"] = issued(lambda: moe.combine(y0, other))
    # still in step afterwards
    out["after"] = moe.combine(recv_x2.detach(), handle2)
    return {k: (str(v[0]), v[1]) if k in ("bad_dispatch", "dtype_mismatch", "handle_mismatch") else v
            for k, v in out.items()}


A2A, A2A_ASYNC, ALL_REDUCE = ("all_to_all_single", False), ("all_to_all_single", True), ("all_reduce", False)
ALL_REDUCE_ASYNC = ("all_reduce", True)


@pytest.fixture(scope="module")
def results():
    return run_ranks(_worker, WORLD, timeout_s=120)


def test_collectives_per_dispatch_and_combine(results):
    for rank, r in enumerate(results):
        # dispatch: control exchange + rows + indices/weights; combine: control + rows; all issued async
        assert r["dispatch"] == [A2A_ASYNC, A2A_ASYNC, A2A_ASYNC], (rank, r["dispatch"])
        assert r["combine"] == [ALL_REDUCE_ASYNC, A2A_ASYNC], (rank, r["combine"])
        # backward: combine's rows, then dispatch's row and weight gradients
        assert r["backward"] == [A2A, A2A, A2A], (rank, r["backward"])
        # async: the issue sends the control exchange only, the payload follows at progress() (or wait())
        assert r["dispatch_async_issue"] == [A2A_ASYNC], (rank, r["dispatch_async_issue"])
        assert r["dispatch_async_progress"] == [A2A_ASYNC, A2A_ASYNC], (rank, r["dispatch_async_progress"])
        assert r["dispatch_async_wait"] == []
        assert r["combine_async_issue"] == [ALL_REDUCE_ASYNC], (rank, r["combine_async_issue"])
        assert r["combine_async_wait"] == [A2A_ASYNC], (rank, r["combine_async_wait"])


def test_routes_arrive_bit_for_bit_and_errors_cost_one_collective(results):
    for rank, r in enumerate(results):
        want_idx, want_w = _expected_routes(rank)
        for key in ("routes", "routes_async"):
            got_idx, got_w = r[key]
            assert got_idx.dtype == torch.int64 and torch.equal(got_idx, want_idx), (rank, key)
            assert got_w.dtype == torch.float32 and torch.equal(got_w.view(torch.int32), want_w.view(torch.int32)), (rank, key)
        assert r["grad_w"] is not None and r["grad_w"].shape == (TOKENS[rank], TOPK)

        msg, issued = r["bad_dispatch"]
        assert issued == [A2A_ASYNC], (rank, issued)  # the control exchange only: no payload moved
        assert "rank(s) [2] of the group passed bad input (rank 2: topk_idx values)" in msg, msg
        assert ("found 6" in msg) == (rank == 2), msg

        msg, issued = r["dtype_mismatch"]
        assert issued == [A2A_ASYNC], (rank, issued)
        assert msg == ("dispatch: ranks of the group disagree: dtype differs "
                       "(rank 0: torch.float64, rank 1: torch.float32, rank 2: torch.float64)"), msg

        msg, issued = r["handle_mismatch"]
        assert issued == [ALL_REDUCE_ASYNC], (rank, issued)
        assert "combine: the handles of the ranks come from different dispatches" in msg, msg
        assert msg == results[0]["handle_mismatch"][0]  # the same message on every rank
        assert r["after"].shape == (TOKENS[rank], HIDDEN)
