"""The overlap engine with FP8 dispatch: an overlapped forward+backward pair computes exactly what the
same stages compute one after the other (both dispatching in FP8), and differs from unquantized stages."""
from __future__ import annotations

import pytest
import torch

from moe_dist_utils import run_ranks

HIDDEN, BATCH, SEQ = 144, 2, 5  # 144: one full group of 128 and a partial one of 16


def _stage(cls, seed, group, fp8):
    from dualpipe_ext.moe import MoEConfig
    from dualpipe_ext.overlap import BlockConfig

    cfg = BlockConfig(MoEConfig(hidden=HIDDEN, moe_intermediate=8, num_experts=4, topk=2, num_shared_experts=1,
                                fp8_dispatch=fp8), num_heads=2)
    torch.manual_seed(seed)
    return cls(cfg, 2, group, None, dtype=torch.float32)


def _data(seed):
    return torch.randn(BATCH, SEQ, HIDDEN, generator=torch.Generator().manual_seed(seed))


def _pair(rank, world):
    import torch.distributed as dist

    from dualpipe_ext.overlap import MoEStage, OverlappedMoEStage

    ep = dist.new_group(list(range(world)))
    crit = lambda out, t: (out - t).pow(2).mean()  # noqa: E731
    x0, x1, t = _data(30 + rank), _data(40 + rank), _data(50 + rank)
    failures, outputs = [], {}
    for fp8 in (True, False):
        ref0, ref1 = _stage(MoEStage, 10 + rank, ep, fp8), _stage(MoEStage, 20 + rank, ep, fp8)
        st0, st1 = _stage(OverlappedMoEStage, 10 + rank, ep, fp8), _stage(OverlappedMoEStage, 20 + rank, ep, fp8)
        xr, xo = x1.clone().requires_grad_(), x1.clone().requires_grad_()
        l1 = crit(ref1(xr), t)
        o0 = ref0(x0)
        l1.backward()
        l1o = crit(st1(xo), t)
        o0o, _ = OverlappedMoEStage.overlapped_forward_backward(st0, [x0], crit, [t], st1, l1o, [], [])
        outputs[fp8] = o0o.detach()
        if fp8:
            if not torch.equal(o0o, o0):
                failures.append("output of the forward chunk differs")
            if not torch.equal(xo.grad, xr.grad):
                failures.append("input gradient of the backward chunk differs")
            for (n, p), q in zip(st1.named_parameters(), ref1.parameters()):
                if not torch.equal(p.grad, q.grad):
                    failures.append(f"{n}.grad differs")
    if torch.equal(outputs[True], outputs[False]):
        failures.append("the FP8 stages computed the unquantized result")
    return failures


@pytest.mark.slow
def test_overlapped_pair_with_fp8_dispatch_equals_forward_then_backward():
    for rank, failures in enumerate(run_ranks(_pair, 2, timeout_s=120)):
        assert failures == [], f"rank {rank}: {failures}"
