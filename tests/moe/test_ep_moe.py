"""The MoE layer with ``ep=EPBuffer``: output and every gradient equal a dense single-process
model (fp32 tolerance) and the collective path, on 2 and 4 CPU processes, every kernel
through Triton (interpreted) as on a GPU."""
from __future__ import annotations

import pytest
import torch

from moe_dist_utils import dense_moe_reference, load_weights, run_ranks, swiglu_expert

HIDDEN, INTER, EXPERTS, TOPK, MAX_TOKENS = 8, 4, 4, 2, 7


def _params(world):
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    tokens = [MAX_TOKENS - (i % 3) for i in range(world)]
    tokens[-1] = 0 if world > 2 else tokens[-1]  # a rank with no tokens
    n = sum(tokens)
    return dict(x=r(n, HIDDEN), grad_out=r(n, HIDDEN), gate=r(EXPERTS, HIDDEN), gate_up=r(EXPERTS, 2 * INTER, HIDDEN) / 3,
                down=r(EXPERTS, HIDDEN, INTER) / 2, shared_gate_up=r(2 * INTER, HIDDEN) / 3,
                shared_down=r(HIDDEN, INTER) / 2, tokens=tokens)


def _worker(rank, world, p):
    import os

    os.environ["DUALPIPE_EXT_TRITON"] = "1"
    from dualpipe_ext import moe

    cfg = moe.MoEConfig(hidden=HIDDEN, moe_intermediate=INTER, num_experts=EXPERTS, topk=TOPK, num_shared_experts=1,
                        bias_update_speed=0.1)
    ep = moe.EPBuffer(None, max_tokens=MAX_TOKENS, hidden=HIDDEN, dtype=torch.float32, max_topk=TOPK, timeout_s=60)
    out = {}
    for path in ("ep", "collective"):
        layer = moe.MoE(cfg, ep=ep if path == "ep" else None)
        load_weights(layer, p, rank, world)
        begin = sum(p["tokens"][:rank])
        x = p["x"][begin:begin + p["tokens"][rank]].clone().requires_grad_(True)
        y = layer(x)
        (y * p["grad_out"][begin:begin + p["tokens"][rank]]).sum().backward()
        out[path] = dict(out=y.detach(), grad_x=x.grad, load=layer.expert_load.clone(),
                         grads={n: q.grad for n, q in layer.named_parameters()})
    ep.close()
    return out


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_moe_with_epbuffer_matches_dense_model_and_collective_path(world):
    p = _params(world)
    results = run_ranks(_worker, world, p, timeout_s=300)
    leaves = {k: p[k].clone().requires_grad_(True) for k in ("x", "gate", "gate_up", "down", "shared_gate_up",
                                                               "shared_down")}
    scores = torch.softmax(leaves["x"] @ leaves["gate"].t(), dim=-1)
    idx = scores.topk(TOPK, dim=-1).indices
    out = dense_moe_reference(leaves["x"], idx, scores.gather(1, idx), leaves["gate_up"], leaves["down"])
    out = out + swiglu_expert(leaves["x"], leaves["shared_gate_up"], leaves["shared_down"])
    (out * p["grad_out"]).sum().backward()
    tol = dict(rtol=2e-5, atol=2e-6)
    for path in ("ep", "collective"):
        torch.testing.assert_close(torch.cat([r[path]["out"] for r in results]), out.detach(), **tol)
        torch.testing.assert_close(torch.cat([r[path]["grad_x"] for r in results]), leaves["x"].grad, **tol)
        for name, ref in (("gate", "gate"), ("shared.gate_up", "shared_gate_up"), ("shared.down", "shared_down")):
            torch.testing.assert_close(sum(r[path]["grads"][name] for r in results), leaves[ref].grad, **tol)
        local = EXPERTS // world
        for rank, r in enumerate(results):
            sl = slice(rank * local, (rank + 1) * local)
            torch.testing.assert_close(r[path]["grads"]["experts.gate_up"], leaves["gate_up"].grad[sl], **tol)
            torch.testing.assert_close(r[path]["grads"]["experts.down"], leaves["down"].grad[sl], **tol)
            torch.testing.assert_close(r[path]["load"], torch.bincount(
                idx[sum(p["tokens"][:rank]):sum(p["tokens"][:rank + 1])].flatten(), minlength=EXPERTS).float())
