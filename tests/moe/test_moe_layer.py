"""The MoE layer on 2 gloo ranks equals a dense single-process model in output and every gradient."""
from __future__ import annotations

import torch

from moe_dist_utils import dense_moe_reference, load_weights, reference_router, run_ranks, swiglu_expert

HIDDEN, INTER, EXPERTS, TOPK = 16, 8, 4, 2


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return dict(x=r(13, HIDDEN), grad_out=r(13, HIDDEN), gate=r(EXPERTS, HIDDEN), gate_up=r(EXPERTS, 2 * INTER, HIDDEN) / 4,
                down=r(EXPERTS, HIDDEN, INTER) / 3, shared_gate_up=r(2 * INTER, HIDDEN) / 4, shared_down=r(HIDDEN, INTER) / 3,
                tokens=[8, 5])


def _worker(rank, world, p):
    from dualpipe_ext import moe

    cfg = moe.MoEConfig(hidden=HIDDEN, moe_intermediate=INTER, num_experts=EXPERTS, topk=TOPK, num_shared_experts=1)
    layer = moe.MoE(cfg, dtype=torch.float64)
    load_weights(layer, p, rank, world)
    begin = sum(p["tokens"][:rank])
    x = p["x"][begin:begin + p["tokens"][rank]].clone().requires_grad_(True)
    out = layer(x)
    (out * p["grad_out"][begin:begin + p["tokens"][rank]]).sum().backward()
    return dict(out=out.detach(), grad_x=x.grad, grads={n: q.grad for n, q in layer.named_parameters()})


def test_moe_layer_matches_dense_model_on_two_ranks():
    p = _params()
    results = run_ranks(_worker, 2, p, timeout_s=120)
    leaves = {k: p[k].clone().requires_grad_(True) for k in ("x", "gate", "gate_up", "down", "shared_gate_up", "shared_down")}
    idx, weights = reference_router(leaves["x"], leaves["gate"], TOPK, "topk")
    out = dense_moe_reference(leaves["x"], idx, weights, leaves["gate_up"], leaves["down"])
    out = out + swiglu_expert(leaves["x"], leaves["shared_gate_up"], leaves["shared_down"])
    (out * p["grad_out"]).sum().backward()
    tol = dict(rtol=1e-5, atol=1e-6)  # routing weights are float32 by contract
    torch.testing.assert_close(torch.cat([r["out"] for r in results]), out.detach(), **tol)
    torch.testing.assert_close(torch.cat([r["grad_x"] for r in results]), leaves["x"].grad, **tol)
    for name, ref in (("gate", "gate"), ("shared.gate_up", "shared_gate_up"), ("shared.down", "shared_down")):
        torch.testing.assert_close(sum(r["grads"][name] for r in results), leaves[ref].grad, **tol)
    for rank, r in enumerate(results):
        sl = slice(rank * 2, rank * 2 + 2)
        torch.testing.assert_close(r["grads"]["experts.gate_up"], leaves["gate_up"].grad[sl], **tol)
        torch.testing.assert_close(r["grads"]["experts.down"], leaves["down"].grad[sl], **tol)
