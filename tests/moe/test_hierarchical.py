"""Hierarchical dispatch/combine on simulated nodes (gloo process groups on one host) against the
dense single-process reference, with the rows that cross between nodes counted."""
from __future__ import annotations

import pytest
import torch

from moe_dist_utils import run_ranks
from test_moe_dispatch import HIDDEN, INTER, _problem, _reference


def _worker(rank, world, ranks_per_node, cases):
    from dualpipe_ext import moe
    from dualpipe_ext.kernels._common import poison_outputs
    from dualpipe_ext.moe.hierarchical import HierarchicalEP

    hier = HierarchicalEP(None, ranks_per_node)
    results = []
    for case in cases:
        p, topk, mode, async_op = case["problem"], case["topk"], case["mode"], case["async_op"]
        from moe_dist_utils import reference_router

        num_experts = p["gate"].shape[0]
        local = num_experts // world
        begin = sum(p["tokens_per_rank"][:rank])
        end = begin + p["tokens_per_rank"][rank]
        x = p["x"][begin:end].clone().requires_grad_(True)
        gate = p["gate"].clone().requires_grad_(True)
        experts = moe.GroupedExperts(local, HIDDEN, INTER, dtype=torch.float64)
        with torch.no_grad():
            experts.gate_up.copy_(p["gate_up"][rank * local:(rank + 1) * local])
            experts.down.copy_(p["down"][rank * local:(rank + 1) * local])
        topk_idx, topk_weights = reference_router(x, gate, topk, mode, begin)
        with poison_outputs():
            if async_op:
                recv_x, recv_idx, recv_w, handle = hier.dispatch(x, topk_idx, topk_weights, num_experts,
                                                                 async_op=True).wait()
            else:
                recv_x, recv_idx, recv_w, handle = hier.dispatch(x, topk_idx, topk_weights, num_experts)
            y = moe.experts_forward(experts, recv_x, recv_idx, recv_w)
            out = hier.combine(y, handle, async_op=True).wait() if async_op else hier.combine(y, handle)
        # the explicit backward exchanges (as the overlap engine calls them) equal autograd's
        g = torch.Generator().manual_seed(100 + rank)
        g_out = torch.randn(out.shape, generator=g, dtype=out.dtype)
        g_recv = torch.randn(recv_x.shape, generator=g, dtype=recv_x.dtype)
        g_w = torch.randn(recv_w.shape, generator=g, dtype=recv_w.dtype)
        auto_y, = torch.autograd.grad((out * g_out).sum(), y, retain_graph=True)
        auto_x, auto_tw = torch.autograd.grad((recv_x * g_recv).sum() + (recv_w * g_w).sum(), (x, topk_weights),
                                              retain_graph=True, allow_unused=True)
        cb = hier.combine_backward(g_out, handle, async_op=async_op)
        cb = cb.wait() if async_op else cb
        db = hier.dispatch_backward(g_recv, g_w, handle, async_op=async_op)
        db = db.wait() if async_op else db
        # x also reaches recv_w through the router: add that path to the explicit row gradient
        via_w, = torch.autograd.grad((topk_weights * db[1]).sum(), x, retain_graph=True)
        db = (db[0] + via_w, db[1])
        (out * p["grad_out"][begin:end]).sum().backward()
        results.append(dict(out=out.detach(), grad_x=x.grad, grad_gate=gate.grad, stats=handle.stats(),
                            grad_gate_up=experts.gate_up.grad, grad_down=experts.down.grad,
                            explicit=(cb, db[0], db[1]), auto=(auto_y, auto_x, auto_tw)))
    return results


def _check(cases, results, world, ranks_per_node):
    num_nodes = world // ranks_per_node
    for c, case in enumerate(cases):
        p, topk, mode = case["problem"], case["topk"], case["mode"]
        ref = _reference(p, topk, mode)
        num_experts = p["gate"].shape[0]
        local = num_experts // world
        per_rank = [r[c] for r in results]
        tol = dict(rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(torch.cat([r["out"] for r in per_rank]), ref["out"], **tol)
        torch.testing.assert_close(torch.cat([r["grad_x"] for r in per_rank]), ref["grad_x"], **tol)
        torch.testing.assert_close(sum(r["grad_gate"] for r in per_rank), ref["grad_gate"], **tol)
        for rank, r in enumerate(per_rank):
            sl = slice(rank * local, (rank + 1) * local)
            for name in ("grad_gate_up", "grad_down"):
                got = r[name] if r[name] is not None else torch.zeros_like(ref[name][sl])
                torch.testing.assert_close(got, ref[name][sl], **tol)
            auto_y, auto_x, auto_tw = r["auto"]
            cb, gx, gtw = r["explicit"]
            torch.testing.assert_close(cb, auto_y, **tol)
            torch.testing.assert_close(gx, auto_x, **tol)
            torch.testing.assert_close(gtw, auto_tw if auto_tw is not None else torch.zeros_like(gtw), **tol)
            # one inter-node row per distinct (token, other destination node); never more than flat
            begin = sum(p["tokens_per_rank"][:rank])
            idx = ref["idx"][begin:begin + p["tokens_per_rank"][rank]]
            node = rank // ranks_per_node
            pairs = {(t, int(e) // (local * ranks_per_node)) for t in range(idx.shape[0]) for e in idx[t] if e >= 0}
            flat = {(t, int(e) // local) for t in range(idx.shape[0]) for e in idx[t] if e >= 0}
            st = r["stats"]
            assert st.inter_rows == sum(1 for _, n in pairs if n != node), (case["name"], rank)
            assert st.flat_inter_rows == sum(1 for _, d in flat if d // ranks_per_node != node)
            assert st.inter_rows <= st.flat_inter_rows
            assert st.inter_bytes == st.inter_rows * HIDDEN * 8
    assert num_nodes >= 2


def _cases(world):
    tokens = [7, 0] + [5, 9, 4, 6, 3, 8][:world - 2]
    return [
        dict(name="topk", problem=_problem(1, [11, 6, 4, 9, 3, 5, 8, 2][:world], 4 * world), topk=3, mode="topk",
             async_op=False),
        # every token to experts 0, 1: the other node receives nothing; rank 1 has no tokens
        dict(name="skewed+empty-node+zero-token-rank", problem=_problem(2, tokens, 2 * world), topk=2,
             mode="skewed", async_op=False),
        dict(name="holes+async", problem=_problem(3, [5, 12, 3, 8, 2, 6, 9, 4][:world], 2 * world), topk=4,
             mode="holes", async_op=True),
    ]


@pytest.mark.slow
@pytest.mark.parametrize("num_nodes,ranks_per_node", [(2, 2), (2, 4)])
def test_hierarchical_matches_dense_reference(num_nodes, ranks_per_node):
    world = num_nodes * ranks_per_node
    cases = _cases(world)
    results = run_ranks(_worker, world, ranks_per_node, cases, timeout_s=240)
    _check(cases, results, world, ranks_per_node)


def _bad_layout_worker(rank, world, ranks_per_node):
    from dualpipe_ext.moe.hierarchical import HierarchicalEP

    try:
        HierarchicalEP(None, ranks_per_node)
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.parametrize("ranks_per_node,match", [(2, "do not divide into nodes of ranks_per_node=2"),
                                                   (0, "ranks_per_node must be a positive int")])
def test_bad_layout_raises_on_every_rank(ranks_per_node, match):
    msgs = run_ranks(_bad_layout_worker, 3, ranks_per_node, timeout_s=60)
    assert all(m is not None and match in m for m in msgs), msgs
    assert len({m.split("; on rank")[0] for m in msgs}) == 1  # the same verdict on every rank


def _disagree_worker(rank, world):
    from dualpipe_ext.moe.hierarchical import HierarchicalEP

    try:
        HierarchicalEP(None, 2 if rank == 0 else 4)
    except ValueError as e:
        return str(e)
    return None


def test_ranks_disagreeing_on_the_layout_raise_alike():
    msgs = run_ranks(_disagree_worker, 4, timeout_s=60)
    assert all(m is not None and "disagree on ranks_per_node" in m for m in msgs), msgs
