"""Bad configuration and bad stage input give clear errors."""
import pytest
import torch

from dualpipe_ext.moe import MoEConfig
from dualpipe_ext.overlap import BlockConfig, MoEStage, OverlapConfig

MOE = MoEConfig(hidden=8, moe_intermediate=4, num_experts=2, topk=1)


def test_config_errors():
    with pytest.raises(ValueError, match="num_heads"):
        BlockConfig(MOE, num_heads=3)
    with pytest.raises(ValueError, match="MoEConfig"):
        BlockConfig({"hidden": 8})
    with pytest.raises(ValueError, match="num_comm_sms"):
        OverlapConfig(num_comm_sms=0)
    with pytest.raises(ValueError, match="inject_latency_s"):
        OverlapConfig(inject_latency_s=-1.0)
    with pytest.raises(ValueError, match="num_layers"):
        MoEStage(BlockConfig(MOE), 0)


def test_stage_input_shape_error_and_single_process_run():
    stage = MoEStage(BlockConfig(MOE, num_heads=2), 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"\[batch, seq, 8\]"):
        stage(torch.zeros(3, 8, dtype=torch.float64))
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    stage(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in stage.parameters())


def test_stage_and_layers_share_one_budget():
    """The stage's OverlapConfig.num_comm_sms reaches every MoE block; layers built with another budget
    are refused (one value: the GEMMs take it from the layer, cuBLAS's carveout from the stage)."""
    from dualpipe_ext.overlap import ComponentStage

    stage = MoEStage(BlockConfig(MOE), 2, overlap=OverlapConfig(num_comm_sms=3))
    assert [b.moe.num_comm_sms for b in stage.blocks] == [3, 3]
    with pytest.raises(ValueError, match="num_comm_sms=3, the stage's OverlapConfig 5"):
        ComponentStage(list(stage.blocks), overlap=OverlapConfig(num_comm_sms=5))
    assert ComponentStage(list(stage.blocks), overlap=OverlapConfig(num_comm_sms=3)).overlap.num_comm_sms == 3
