"""The collective dispatch reads the routing's values on the host only with its counts: one
device-to-host transfer, no separate value check (no ``bool(tensor)``), in or out of debug mode."""
from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("debug", ["0", "1"])
def test_dispatch_checks_the_routing_with_the_counts(monkeypatch, debug):
    from dualpipe_ext import moe
    from dualpipe_ext.debug import HostReadCounter

    monkeypatch.setenv("DUALPIPE_EXT_CHECKS", debug)
    x, w = torch.randn(5, 8), torch.full((5, 2), 0.5)
    idx = torch.tensor([[0, 1], [2, 3], [1, 2], [3, 0], [0, 2]])
    with HostReadCounter() as reads:
        recv_x, _, _, _ = moe.dispatch(x, idx, w, 4)
    names = [name for name, _ in reads.calls]
    assert names.count("cpu") == 1, reads.report()
    assert not {"__bool__", "item", "__int__"} & set(names), reads.report()
    assert recv_x.shape == (5, 8)  # one rank: every token once
    bad = idx.clone()
    bad[3, 1] = 7
    with pytest.raises(ValueError, match=r"topk_idx entries must be -1 \(no expert\) or in \[0, 4\), found 7"):
        moe.dispatch(x, bad, w, 4)
    w[2, 0] = float("inf")
    with pytest.raises(ValueError, match="topk_weights contain NaN or infinity"):
        moe.dispatch(x, idx, w, 4)
