"""Per-rank bodies of the overlap engine's multi-process tests (run by dist_harness.run_ranks)."""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.distributed as dist

from dualpipe_ext import DualPipe, RuntimeConfig, set_p2p_tensor_dtype, set_p2p_tensor_shapes
from dualpipe_ext.moe import MoEConfig
from dualpipe_ext.overlap import BlockConfig, MoEStage, OverlapConfig, OverlappedMoEStage, component_plan
from dualpipe_ext.overlap.plan import format_plan

HIDDEN, BATCH, SEQ = 16, 2, 7
CFG = BlockConfig(MoEConfig(hidden=HIDDEN, moe_intermediate=8, num_experts=4, topk=2, num_shared_experts=1),
                  num_heads=2)


def criterion(out, target):
    return (out - target).pow(2).mean()


def _stage(cls, seed: int, layers: int, group, overlap=None):
    torch.manual_seed(seed)
    return cls(CFG, layers, group, overlap, dtype=torch.float64)


def _data(seed: int, n: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n * BATCH, SEQ, HIDDEN, generator=g, dtype=torch.float64)


def _same(a, b, what: str, failures: List[str]) -> None:
    if a is None or b is None or not torch.equal(a, b):
        failures.append(f"{what} differs" + ("" if a is None or b is None else f" (max {float((a - b).abs().max()):.3g})"))


def autograd_reference(stage: MoEStage, x: torch.Tensor) -> torch.Tensor:
    """The stage's function written as one autograd graph over ``dualpipe_ext.moe.MoE``."""
    for blk in stage.blocks:
        eps = blk.config.norm_eps
        norm = lambda t, w: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * w  # noqa: E731
        h = x + blk._attention(norm(x, blk.norm1))
        x = h + blk.moe(norm(h, blk.norm2))
    return x


def _cos_check(a, b, what: str, failures: List[str]) -> None:
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
    if not 1 - float(cos) < 1e-12:
        failures.append(f"{what}: 1 - cos = {1 - float(cos):.3g}")


def pair_equality(rank: int, world: int, layers: int) -> List[str]:
    """An overlapped pair against forward-then-backward of the same stages, bit for bit."""
    ep = dist.new_group(list(range(world)))
    failures: List[str] = []
    for variant in ("loss", "output_grads"):
        ref0, ref1 = _stage(MoEStage, 10 + rank, layers, ep), _stage(MoEStage, 20 + rank, layers, ep)
        st0, st1 = _stage(OverlappedMoEStage, 10 + rank, layers, ep), _stage(OverlappedMoEStage, 20 + rank, layers, ep)
        x0, x1, t = _data(30 + rank), _data(40 + rank), _data(50 + rank)
        g1 = _data(60 + rank)
        xr, xo = x1.clone().requires_grad_(), x1.clone().requires_grad_()
        # reference: the backward chunk's forward ran earlier; then F of chunk 0, then B of chunk 1
        out1 = ref1(xr)
        l1 = criterion(out1, t)
        o0 = ref0(x0)
        l0 = criterion(o0, t)
        if variant == "loss":
            l1.backward()
        else:
            torch.autograd.backward(out1, g1)
        # overlapped
        out1o = st1(xo)
        l1o = criterion(out1o, t)
        if variant == "loss":
            o0o, l0o = OverlappedMoEStage.overlapped_forward_backward(st0, [x0], criterion, [t], st1, l1o, [], [])
        else:
            o0o, l0o = OverlappedMoEStage.overlapped_forward_backward(st0, [x0], None, [], st1, None, [out1o], [g1])
            l0o = criterion(o0o, t)
        _same(o0o, o0, f"{variant}: outputs0", failures)
        _same(l0o, l0, f"{variant}: loss0", failures)
        _same(xo.grad, xr.grad, f"{variant}: input grad of module1", failures)
        for (n, p), q in zip(st1.named_parameters(), ref1.parameters()):
            _same(p.grad, q.grad, f"{variant}: module1 {n}.grad", failures)
        l0o.backward()  # the forward chunk's own backward later (here: sequential) must also agree
        l0.backward()
        for (n, p), q in zip(st0.named_parameters(), ref0.parameters()):
            _same(p.grad, q.grad, f"{variant}: module0 {n}.grad", failures)
    # the component backward against one autograd graph through moe.MoE's dispatch and combine
    auto = _stage(MoEStage, 20 + rank, layers, ep)
    xa = x1.clone().requires_grad_()
    out = autograd_reference(auto, xa)
    _cos_check(out, out1.detach(), "autograd reference: output", failures)
    torch.autograd.backward(out, g1)
    _cos_check(xa.grad, xr.grad, "autograd reference: input grad", failures)
    for (n, p), q in zip(auto.named_parameters(), ref1.parameters()):
        _cos_check(p.grad, q.grad, f"autograd reference: {n}.grad", failures)
    return failures


def _pipeline(cls, rank: int, layers: int, ep, overlap, record: bool):
    local = [_stage(cls, 100 + rank, layers, ep, overlap), _stage(cls, 200 + rank, layers, ep, overlap)]
    return DualPipe(local, config=RuntimeConfig(comm_timeout_s=30.0, record=record))


def _step(pipe, rank: int, chunks: int):
    x = _data(300 + rank, chunks // 2)
    y = _data(400 + rank, chunks // 2)
    return pipe.step(x, num_chunks=chunks, criterion=criterion, labels=[y])[0]


def _pair_events(pipe) -> List[tuple]:
    return [e for e in pipe.timeline.events if e[1] == "compute" and "+" in e[0]]


def pipeline_and_latency(rank: int, world: int, layers: int, chunks: int, latency_s: float) -> Dict:
    """DualPipe with EP over the same two ranks: overlapped against plain, then with injected latency."""
    set_p2p_tensor_shapes([(BATCH, SEQ, HIDDEN)])
    set_p2p_tensor_dtype(torch.float64)
    ep = dist.new_group(list(range(world)))
    failures: List[str] = []
    plain = _pipeline(MoEStage, rank, layers, ep, None, False)
    over = _pipeline(OverlappedMoEStage, rank, layers, ep, None, False)
    loss_p, loss_o = _step(plain, rank, chunks), _step(over, rank, chunks)
    _same(loss_o, loss_p, "DualPipe loss", failures)
    for (n, p), q in zip(over.named_parameters(), plain.parameters()):
        _cos_check(p.grad, q.grad, f"DualPipe {n}.grad", failures)
    if over.executor.num_overlapped_calls == 0 or plain.executor.num_overlapped_calls != 0:
        failures.append(f"overlapped pairs: {over.executor.num_overlapped_calls} (engine), "
                        f"{plain.executor.num_overlapped_calls} (plain)")

    # injected latency: pair times with and without the engine, and the spans of the overlapped run
    lat = OverlapConfig(inject_latency_s=latency_s)
    plain = _pipeline(MoEStage, rank, layers, ep, lat, True)
    over = _pipeline(OverlappedMoEStage, rank, layers, ep, lat, True)
    _step(plain, rank, chunks), _step(over, rank, chunks)
    pair_ms = {name: sorted((e[3] - e[2]) / 1e6 for e in _pair_events(p)) for name, p in
               (("plain", plain), ("overlapped", over))}
    spans = [e for e in over.timeline.events if e[1] == "span"]
    stage = over.module[0]
    failures += _check_in_flight(spans, _pair_events(over), [stage.run_spec(False), stage.run_spec(True)], latency_s)
    return {"failures": failures, "pair_ms": pair_ms}


def _check_in_flight(spans, pairs, runs, latency_s: float) -> List[str]:
    """Within every pair: each issued exchange stayed in flight (issue end .. wait end, at least
    the injected latency long) across the computation the plan pairs with it."""
    failures: List[str] = []
    plan_text = format_plan(component_plan(runs)).splitlines()
    partners = {line.split(" under ")[0]: line.split(" under ")[1].split(", ") for line in plan_text if " under " in line}
    for pname, _, pstart, pend, *_ in pairs:
        inside = [s for s in spans if pstart <= s[2] and s[3] <= pend]
        by_name = {s[0]: s for s in inside}
        if len(by_name) != len(plan_text) + 1:  # the plan's steps plus the output-gradient capture
            failures.append(f"{pname}: {len(by_name)} distinct spans, expected {len(plan_text) + 1}")
            continue
        for issue, computes in partners.items():
            i, w = by_name[issue], by_name["wait " + issue[len("issue "):]]
            if w[3] - i[2] < latency_s * 1e9:
                failures.append(f"{pname}: {issue} completed in {(w[3] - i[2]) / 1e6:.2f} ms < injected latency")
            for c in computes:
                cs = by_name[c]
                if not (i[3] <= cs[2] and cs[3] <= w[2]):
                    failures.append(f"{pname}: {c} did not run while {issue} was in flight")
    return failures
