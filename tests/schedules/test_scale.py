"""The on-paper DeepSeek-V3-scale step: flat against hierarchical dispatch."""
from dataclasses import replace

import pytest

from dualpipe_ext.schedules.scale import FLAT_V3, HIER_V3, Fanout, ScaleConfig, exchange_ms, pair_costs, predict_step


def test_hierarchical_sends_less_over_infiniband_and_exposes_less():
    cfg = ScaleConfig()
    flat, hier = predict_step(cfg, FLAT_V3), predict_step(cfg, HIER_V3)
    assert hier["comm_busy"] < flat["comm_busy"]
    assert hier["exposed_pair"] <= flat["exposed_pair"] and hier["step"] < flat["step"]
    assert pair_costs(cfg, HIER_V3)["compute"] == pytest.approx(118.0)  # DeepSeek's published compute per pair


def test_exchange_time_is_the_slower_link():
    cfg = replace(ScaleConfig(), latency_ms=0.0)
    ib_only = exchange_ms(cfg, Fanout(off_node=1.0, in_node=0.0), 2.0)
    assert ib_only == pytest.approx(4096 * 7168 * 2 / 50e9 * 1e3)
    assert exchange_ms(replace(cfg, ib_gbs=25.0), Fanout(1.0, 0.0), 2.0) == pytest.approx(2 * ib_only)
    # NVLink 3.2x faster: 3.2 rows per token inside the node cost one row over InfiniBand
    assert exchange_ms(cfg, Fanout(1.0, 3.2), 2.0) == pytest.approx(ib_only)
    assert exchange_ms(cfg, Fanout(1.0, 6.4), 2.0) == pytest.approx(2 * ib_only)


def test_without_communication_the_pair_is_its_compute():
    cfg = replace(ScaleConfig(), latency_ms=0.0)
    r = predict_step(cfg, Fanout(0.0, 0.0))
    assert r["exposed_pair"] == 0.0 and r["exposed_step"] == 0.0 and r["pair"] == pytest.approx(118.0)


@pytest.mark.parametrize("kw,match", [(dict(ep=60), "multiple of ranks_per_node"), (dict(pp=0), "positive int"),
                                      (dict(ib_gbs=0.0), "must be positive"), (dict(attn_fraction=2.0), "in \\[0, 1\\]")])
def test_bad_scale_configs(kw, match):
    with pytest.raises(ValueError, match=match):
        ScaleConfig(**kw)
