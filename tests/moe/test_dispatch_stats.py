"""An MoE layer keeps no counters that its calls change: each dispatch's rows are in its handle,
``dispatch_stats`` turns a handle into an immutable record, and a caller that wants totals collects
the handles through ``register_dispatch_hook``."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from moe_dist_utils import run_ranks


def _layer(**kw):
    from dualpipe_ext import moe

    torch.manual_seed(0)
    return moe.MoE(moe.MoEConfig(hidden=8, moe_intermediate=4, num_experts=4, topk=2, **kw))


def _state(layer) -> dict:
    """Every plain attribute of the layer and of its hierarchical exchanges (not tensors, not modules)."""
    out = {k: repr(v) for k, v in vars(layer).items() if not k.startswith("_")}
    if layer.hier is not None:
        out.update({f"hier.{k}": repr(v) for k, v in vars(layer.hier).items()})
    return out


@pytest.mark.parametrize("kw", [{}, {"hierarchical": True}, {"fp8_dispatch": True}])
def test_dispatch_stats_come_from_the_handles_and_the_layer_does_not_change(kw):
    layer = _layer(**kw)
    records = []
    hook = layer.register_dispatch_hook(lambda lay, handle: records.append(lay.dispatch_stats(handle)))
    x = torch.randn(7, 8)
    before = _state(layer)
    layer(x)
    assert _state(layer) == before and not hasattr(layer, "received_rows")
    assert len(records) == 1 and records[0].received_rows == 7  # one process: every token once
    assert records[0].row_bytes == layer.dispatch_row_bytes
    assert records[0].received_bytes == 7 * layer.dispatch_row_bytes
    assert (records[0].nodes is not None) == bool(kw.get("hierarchical"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        records[0].received_rows = 0
    # an asynchronous dispatch reaches the hooks when its result is ready
    idx, w = layer.route(x[:3])
    pending = layer.dispatch(x[:3], idx, w, async_op=True)
    assert len(records) == 1
    pending.progress()
    _, _, _, handle = pending.wait()
    assert len(records) == 2 and records[1].received_rows == 3
    assert layer.dispatch_stats(handle) == records[1]
    hook.remove()
    layer(x)
    assert len(records) == 2


def _two_rank_worker(rank, world):
    layer = _layer()
    handles = []
    layer.register_dispatch_hook(lambda lay, handle: handles.append(handle))
    x = torch.randn(5 + rank, 8, generator=torch.Generator().manual_seed(rank))
    idx, _ = layer.route(x)
    layer(x)
    layer(x[:2])
    local = 4 // world
    # sent[k][r]: this rank's tokens of dispatch k with an expert on rank r
    sent = [[int(((i >= r * local) & (i < (r + 1) * local)).any(1).sum()) for r in range(world)]
            for i in (idx, idx[:2])]
    return [layer.dispatch_stats(h).received_rows for h in handles], sent


def test_received_rows_of_each_dispatch_on_two_ranks():
    results = run_ranks(_two_rank_worker, 2, timeout_s=120)
    for r, (got, _) in enumerate(results):
        assert got == [sum(results[s][1][k][r] for s in range(2)) for k in range(2)], (r, got)
