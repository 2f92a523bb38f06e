"""dispatch + experts + combine on gloo ranks against a dense single-process reference."""
from __future__ import annotations

import pytest
import torch

from moe_dist_utils import dense_moe_reference, reference_router, run_ranks

HIDDEN, INTER = 16, 8


def _problem(seed, tokens_per_rank, num_experts):
    g = torch.Generator().manual_seed(seed)
    total = sum(tokens_per_rank)
    return dict(
        x=torch.randn(total, HIDDEN, generator=g, dtype=torch.float64),
        gate=torch.randn(num_experts, HIDDEN, generator=g, dtype=torch.float64),
        gate_up=torch.randn(num_experts, 2 * INTER, HIDDEN, generator=g, dtype=torch.float64) / HIDDEN ** 0.5,
        down=torch.randn(num_experts, HIDDEN, INTER, generator=g, dtype=torch.float64) / INTER ** 0.5,
        grad_out=torch.randn(total, HIDDEN, generator=g, dtype=torch.float64),
        tokens_per_rank=list(tokens_per_rank),
    )


def _worker(rank, world, cases):
    """Runs each case through dispatch -> experts_forward -> combine; returns outputs and grads."""
    from dualpipe_ext import moe
    from dualpipe_ext.kernels._common import poison_outputs

    results = []
    for case in cases:
        p, topk, mode, async_op = case["problem"], case["topk"], case["mode"], case["async_op"]
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
                pending = moe.dispatch(x, topk_idx, topk_weights, num_experts, async_op=True)
                recv_x, recv_idx, recv_weights, handle = pending.wait()
            else:
                recv_x, recv_idx, recv_weights, handle = moe.dispatch(x, topk_idx, topk_weights, num_experts)
            y = moe.experts_forward(experts, recv_x, recv_idx, recv_weights)
            out = moe.combine(y, handle, async_op=True).wait() if async_op else moe.combine(y, handle)
        (out * p["grad_out"][begin:end]).sum().backward()
        results.append(dict(out=out.detach(), grad_x=x.grad, grad_gate=gate.grad, recv_idx=recv_idx,
                            grad_gate_up=experts.gate_up.grad, grad_down=experts.down.grad))
    return results


def _reference(p, topk, mode):
    x = p["x"].clone().requires_grad_(True)
    gate = p["gate"].clone().requires_grad_(True)
    gate_up = p["gate_up"].clone().requires_grad_(True)
    down = p["down"].clone().requires_grad_(True)
    idx, weights = reference_router(x, gate, topk, mode)
    out = dense_moe_reference(x, idx, weights, gate_up, down)
    (out * p["grad_out"]).sum().backward()
    return dict(out=out.detach(), grad_x=x.grad, grad_gate=gate.grad, grad_gate_up=gate_up.grad, grad_down=down.grad,
                idx=idx)


def _expected_recv_idx(idx, tokens_per_rank, rank, world, num_experts):
    """Received tokens ordered by source rank then token; local expert ids on ``rank`` or -1."""
    local = num_experts // world
    rows = []
    for t in range(idx.shape[0]):
        owners = {int(e) // local for e in idx[t] if e >= 0}
        if rank in owners:
            rows.append([int(e) - rank * local if e >= 0 and int(e) // local == rank else -1 for e in idx[t]])
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, idx.shape[1])


def _check(cases, results, world):
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
            # experts that received no token have a zero gradient (or None when nothing ran)
            for name in ("grad_gate_up", "grad_down"):
                got = r[name] if r[name] is not None else torch.zeros_like(ref[name][sl])
                torch.testing.assert_close(got, ref[name][sl], **tol)
            # received tokens ordered by source rank, then token index: compared bitwise
            expected = torch.cat([
                _expected_recv_idx(ref["idx"][sum(p["tokens_per_rank"][:s]):sum(p["tokens_per_rank"][:s + 1])],
                                   p["tokens_per_rank"], rank, world, num_experts)
                for s in range(world)])
            assert torch.equal(r["recv_idx"], expected), (case["name"], rank)


def _cases(world):
    tokens = [7, 0, 13, 5][:world] if world == 4 else [9, 0] if world == 2 else [11]
    return [
        dict(name="topk", problem=_problem(1, [11, 6, 4, 9][:world], 8), topk=3, mode="topk", async_op=False),
        dict(name="skewed+zero-token-rank", problem=_problem(2, tokens, 8), topk=2, mode="skewed", async_op=False),
        dict(name="holes+async", problem=_problem(3, [5, 12, 3, 8][:world], 4 * world), topk=2, mode="holes",
             async_op=True),
        dict(name="top1-skewed+async", problem=_problem(4, [6] * world, 2 * world), topk=1, mode="skewed",
             async_op=True),
    ]


@pytest.mark.parametrize("world", [1, pytest.param(2, marks=pytest.mark.slow), pytest.param(4, marks=pytest.mark.slow)])
def test_dispatch_experts_combine_match_dense_reference(world):
    cases = _cases(world)
    if world == 1:  # no process group at all: local path
        results = [_run_local(cases)]
    else:
        results = run_ranks(_worker, world, cases, timeout_s=120)
    _check(cases, results, world)


def _run_local(cases):
    import torch.distributed as dist

    assert not dist.is_initialized()
    return _worker(0, 1, cases)
