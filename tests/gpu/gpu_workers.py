"""Rank bodies of the GPU tests, runnable on CPU too (the same code at smaller sizes).

On CUDA every process of a group uses ``cuda:0``: a gloo group carries the control (NCCL refuses
two ranks on one device), ``EPBuffer(device=cuda:0)`` takes CUDA symmetric memory, and
``TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES=1`` lets its rendezvous map several processes'
buffers of one device. Kernels of different processes time-slice on the GPU: these bodies check
results, never speed. On CPU the buffers are shared-memory files and the kernels run in Triton's
interpreter.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "moe"))

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# max relative error (max |got - ref| / max |ref|) of a layer's output and gradients against the
# float64 dense reference, per dtype. float32: the Triton grouped GEMM's tl.dot takes fp32 as TF32
# on CUDA (about 1e-3); bfloat16: 8 mantissa bits through two GEMMs and the combine (about 1e-2).
LAYER_TOLERANCE = {torch.float32: 5e-3, torch.bfloat16: 3e-2}


def sizes(device: str) -> dict:
    """Exchange and layer sizes: small on CPU (interpreter), larger on CUDA."""
    if device == "cuda":
        return dict(experts=8, topk=3, hidden=512, max_tokens=96, inter=128)
    return dict(experts=8, topk=3, hidden=8, max_tokens=6, inter=4)


def setup(device: str) -> torch.device:
    """Environment of a rank before any kernel import; returns its device."""
    if device == "cuda":
        os.environ["TRITON_INTERPRET"] = "0"
        os.environ["TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES"] = "1"
        torch.cuda.set_device(0)
        return torch.device("cuda", 0)
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["DUALPIPE_EXT_TRITON"] = "1"  # every kernel through Triton (interpreted), as on a GPU
    return torch.device("cpu")


# Exchanges --------------------------------------------------------------------------------


def exchange_worker(rank: int, world: int, device: str, dtype_name: str, rounds: int) -> dict:
    """Every scenario of dispatch + combine against the references, bit for bit: {check: ok}."""
    dev = setup(device)
    dtype = getattr(torch, dtype_name)
    from ep_cases import problem

    from dualpipe_ext import moe
    from dualpipe_ext.kernels._common import poison_outputs
    from dualpipe_ext.kernels.ep_exchange import combine_exchange_reference, dispatch_exchange_reference

    s = sizes(device)
    E, K, H, T = s["experts"], s["topk"], s["hidden"], s["max_tokens"]
    ep = moe.EPBuffer(None, max_tokens=T, hidden=H, dtype=dtype, max_topk=K, timeout_s=60.0, device=dev)
    checks = {}

    def problems(routing, seed):
        return [problem(r, world, routing, E, K, H, T, seed, dtype) for r in range(world)]

    def references(ps):
        """(this rank's dispatch reference, its combine reference for expert outputs y = 2 * rows)."""
        sent = dispatch_exchange_reference(*zip(*ps), E, T)
        out = combine_exchange_reference([d[0] * 2 for d in sent], [d[3] for d in sent], [p[0].shape[0] for p in ps],
                                         T)[rank]
        return sent[rank], out

    def same_dispatch(got, ref):
        """Bitwise; recv_x in the received rows only (the receiver leaves padding rows as they were)."""
        rx, ridx, rw, handle = got
        received = ref[3] >= 0
        return torch.equal(rx.cpu()[received], ref[0][received]) and all(
            torch.equal(a.cpu(), b) for a, b in zip((ridx, rw, handle.recv_src, handle.recv_count), ref[1:]))

    def issue(ps):
        return tuple(t.to(dev) for t in ps[rank])

    # one exchange per routing: skewed (only rank 0 receives), holes, a rank without tokens, random
    for routing in ("skewed", "holes", "empty-rank", "random"):
        ps = problems(routing, 1)
        ref_d, ref_c = references(ps)
        with poison_outputs():
            got = ep.dispatch(*issue(ps), E)
            out = ep.combine(got[0] * 2, got[3])
        checks[f"{routing}: dispatch"] = same_dispatch(got, ref_d)
        checks[f"{routing}: combine"] = torch.equal(out.cpu(), ref_c)
        if routing == "skewed" and rank > 0:
            checks["skewed: this rank receives nothing"] = int(got[3].recv_count.sum()) == 0
        if routing == "empty-rank" and rank == world - 1:
            checks["empty-rank: no tokens out"] = out.shape[0] == 0
    # two exchanges of each shape in flight, waited in the other order
    pa, pb = problems("random", 2), problems("holes", 3)
    (ra_d, ra_c), (rb_d, rb_c) = references(pa), references(pb)
    a = ep.dispatch(*issue(pa), E, async_op=True)
    b = ep.dispatch(*issue(pb), E, async_op=True)
    got_b, got_a = b.wait(), a.wait()
    checks["in flight: dispatches waited out of order"] = same_dispatch(got_a, ra_d) and same_dispatch(got_b, rb_d)
    ca = ep.combine(got_a[0] * 2, got_a[3], async_op=True)
    cb = ep.combine(got_b[0] * 2, got_b[3], async_op=True)
    out_b, out_a = cb.wait(), ca.wait()
    checks["in flight: combines waited out of order"] = (torch.equal(out_a.cpu(), ra_c)
                                                         and torch.equal(out_b.cpu(), rb_c))
    # many successive exchanges reuse the slots
    bad = []
    for i in range(rounds):
        ps = problems(("random", "holes", "skewed", "empty-rank")[i % 4], 10 + i)
        ref_d, ref_c = references(ps)
        got = ep.dispatch(*issue(ps), E)
        out = ep.combine(got[0] * 2, got[3])
        if not (same_dispatch(got, ref_d) and torch.equal(out.cpu(), ref_c)):
            bad.append(i)
    checks[f"{rounds} successive exchanges (wrong: {bad[:5]})"] = not bad
    ep.close()
    return checks


# The MoE layer against a dense model ---------------------------------------------------------


def layer_params(world: int, device: str, seed: int = 3) -> dict:
    """Weights and tokens of the dense model (float32, CPU); the last rank of a group of 4 has no tokens."""
    s = sizes(device)
    H, I, E, T = s["hidden"], s["inter"], s["experts"], s["max_tokens"]
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    tokens = [T - (i % 3) for i in range(world)]
    if world > 2:
        tokens[-1] = 0
    n = sum(tokens)
    return dict(x=r(n, H), grad_out=r(n, H), gate=r(E, H) / H ** 0.5, gate_up=r(E, 2 * I, H) / H ** 0.5,
                down=r(E, H, I) / I ** 0.5, shared_gate_up=r(2 * I, H) / H ** 0.5, shared_down=r(H, I) / I ** 0.5,
                tokens=tokens)


def layer_worker(rank: int, world: int, device: str, dtype_name: str, p: dict) -> dict:
    """``MoE(ep=EPBuffer)`` forward and backward on this rank's tokens (router kept in float32)."""
    dev = setup(device)
    dtype = getattr(torch, dtype_name)
    from moe_dist_utils import load_weights

    from dualpipe_ext import moe

    s = sizes(device)
    cfg = moe.MoEConfig(hidden=s["hidden"], moe_intermediate=s["inter"], num_experts=s["experts"], topk=2,
                        num_shared_experts=1)
    ep = moe.EPBuffer(None, max_tokens=s["max_tokens"], hidden=s["hidden"], dtype=dtype, max_topk=2, timeout_s=60.0,
                      device=dev)
    layer = moe.MoE(cfg, ep=ep, device=dev, dtype=dtype)
    layer.gate = torch.nn.Parameter(torch.empty(s["experts"], s["hidden"], device=dev))  # float32 router
    load_weights(layer, p, rank, world)
    begin, n = sum(p["tokens"][:rank]), p["tokens"][rank]
    x = p["x"][begin:begin + n].to(dev, dtype).requires_grad_(True)
    y = layer(x)
    y.backward(p["grad_out"][begin:begin + n].to(dev, dtype))
    result = dict(out=y.detach().float().cpu(), grad_x=x.grad.float().cpu(),
                  grads={name: q.grad.float().cpu() for name, q in layer.named_parameters()})
    ep.close()
    return result


def dense_reference(p: dict, dtype: torch.dtype, topk: int = 2) -> dict:
    """Output and gradients of the dense model in float64 on CPU, from the inputs as the ranks hold them
    (tokens, experts and output gradient rounded to ``dtype``; the router in float32)."""
    import torch.nn.functional as F

    rounded = lambda t: t.to(dtype).double().requires_grad_(True)  # noqa: E731
    x, gate_up, down = rounded(p["x"]), rounded(p["gate_up"]), rounded(p["down"])
    sgu, sd = rounded(p["shared_gate_up"]), rounded(p["shared_down"])
    gate = p["gate"].double().requires_grad_(True)
    scores = torch.softmax(x @ gate.t(), dim=-1)
    idx = scores.topk(topk, dim=-1).indices
    weights = torch.zeros_like(scores).scatter(1, idx, scores.gather(1, idx))  # [tokens, experts]
    g, u = torch.einsum("th,eih->tei", x, gate_up).chunk(2, dim=-1)
    per_expert = torch.einsum("tei,ehi->teh", F.silu(g) * u, down)
    sg, su = (x @ sgu.t()).chunk(2, dim=-1)
    out = torch.einsum("te,teh->th", weights, per_expert) + (F.silu(sg) * su) @ sd.t()
    out.backward(p["grad_out"].to(dtype).double())
    return dict(out=out.detach(), grad_x=x.grad, gate=gate.grad, gate_up=gate_up.grad, down=down.grad,
                shared_gate_up=sgu.grad, shared_down=sd.grad)


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref| (0 for empty tensors)."""
    if ref.numel() == 0:
        return 0.0
    return float((got.double() - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


def layer_errors(results: list, ref: dict, p: dict) -> dict:
    """Relative error of every output and gradient of the ranks against the dense reference."""
    world = len(results)
    local = ref["gate_up"].shape[0] // world
    errs = dict(out=relative_error(torch.cat([r["out"] for r in results]), ref["out"]),
                grad_x=relative_error(torch.cat([r["grad_x"] for r in results]), ref["grad_x"]))
    for name, key in (("gate", "gate"), ("shared.gate_up", "shared_gate_up"), ("shared.down", "shared_down")):
        errs[name] = relative_error(sum(r["grads"][name] for r in results), ref[key])
    for name, key in (("experts.gate_up", "gate_up"), ("experts.down", "down")):
        errs[name] = relative_error(torch.cat([r["grads"][name] for r in results]), ref[key][:world * local])
    return errs


# CUDA graphs ---------------------------------------------------------------------------------


# An exchange wait inside a replay that goes wrong expires after this long (a healthy one takes
# microseconds); a stalled replay is then reported, not waited out at EPBuffer's default 120 s.
GRAPH_WAIT_S = 5.0


def _graph_check(step, dev, replays: int) -> dict:
    """Eager twice (must agree bitwise), then capture and replay, each replay bitwise equal to eager."""
    import torch.distributed as dist

    from dualpipe_ext.graphs import StepGraph

    dist.barrier()  # the ranks start their first (compiling) exchange together
    eager = [[t.clone() for t in step()] for _ in range(2)]
    report = dict(eager_repeats=all(torch.equal(a, b) for a, b in zip(*eager)), replays=[])
    graph = StepGraph(step, dev)
    report["captured"] = graph.captured
    for _ in range(replays):
        outs = graph.replay()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        same = [torch.equal(a, b) for a, b in zip(outs, eager[0])]
        report["replays"].append(all(same))
        if not all(same):
            report["first_difference"] = [i for i, ok in enumerate(same) if not ok][:5]
            break  # a replay that went wrong (a wait that timed out) is not worth repeating
    return report


def graph_moe_worker(rank: int, world: int, device: str, replays: int) -> dict:
    """One MoE layer on an EPBuffer, forward and backward, eager against graph replays."""
    dev = setup(device)
    from dualpipe_ext import moe

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    s = sizes(device)
    cfg = moe.MoEConfig(hidden=s["hidden"], moe_intermediate=s["inter"], num_experts=s["experts"], topk=2,
                        num_shared_experts=1)
    ep = moe.EPBuffer(None, max_tokens=s["max_tokens"], hidden=s["hidden"], dtype=dtype, max_topk=2,
                      timeout_s=GRAPH_WAIT_S, device=dev)
    torch.manual_seed(0)
    layer = moe.MoE(cfg, ep=ep, device=dev, dtype=dtype)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(s["max_tokens"], s["hidden"], generator=g).to(dev, dtype).requires_grad_(True)
    grad = torch.randn(x.shape, generator=g).to(dev, dtype)
    params = list(layer.parameters())

    def step():
        for q in params:
            q.grad = None
        x.grad = None
        y = layer(x)
        y.backward(grad)
        return [y.detach(), x.grad] + [q.grad for q in params]

    report = _graph_check(step, dev, replays)
    ep.close()
    return report


def graph_pair_worker(rank: int, world: int, device: str, replays: int) -> dict:
    """An overlapped forward + backward pair of the overlap engine (EPBuffer, two-batch), with the forward
    of the chunk it backpropagates, eager against graph replays. Attention on SDPA's math kernels, whose
    backward is deterministic."""
    dev = setup(device)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from dualpipe_ext.moe import EPBuffer, MoEConfig
    from dualpipe_ext.overlap import BlockConfig, OverlapConfig, OverlappedMoEStage

    hidden, batch, seq = (256, 4, 64) if device == "cuda" else (16, 2, 4)
    ep = EPBuffer(None, max_tokens=batch * seq, hidden=hidden, dtype=torch.float32, max_topk=2,
                  timeout_s=GRAPH_WAIT_S, device=dev)
    cfg = BlockConfig(MoEConfig(hidden=hidden, moe_intermediate=hidden, num_experts=8, topk=2, num_shared_experts=1),
                      num_heads=4)
    over = OverlapConfig(two_batch=True, num_comm_sms=ep.num_sms)
    torch.manual_seed(0)
    st0, st1 = (OverlappedMoEStage(cfg, 2, overlap=over, ep=ep, device=dev) for _ in range(2))
    g = torch.Generator().manual_seed(rank)
    x0 = torch.randn(batch, seq, hidden, generator=g).to(dev)
    x1 = torch.randn(batch, seq, hidden, generator=g).to(dev).requires_grad_(True)
    params = list(st0.parameters()) + list(st1.parameters())

    def step():
        for q in params:
            q.grad = None
        x1.grad = None
        with sdpa_kernel(SDPBackend.MATH):
            loss1 = st1(x1).square().mean()
            out0, _ = OverlappedMoEStage.overlapped_forward_backward(st0, [x0], None, [], st1, loss1, [], [])
        return [out0.detach(), x1.grad] + [q.grad for q in st1.parameters()]

    report = _graph_check(step, dev, replays)
    ep.close()
    return report
