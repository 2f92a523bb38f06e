"""transformers decoder layers through the overlap engine: an overlapped pair of component stages
equals the same components run one after another, bit for bit, and the stages compute the
untouched model's function (fp32 tolerance)."""
from __future__ import annotations

import copy

import pytest
import torch

from hf_models import build, tokens


def _with_dense_layers(num_layers, dense):
    """A Qwen3-MoE model whose layers ``dense`` have a dense MLP (``mlp_only_layers``)."""
    from transformers import Qwen3MoeForCausalLM

    config = copy.deepcopy(build("qwen3_moe").config)
    config.num_hidden_layers, config.mlp_only_layers = num_layers, list(dense)
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(config).float()
    model.config._attn_implementation = "eager"
    return model


def _pair(reference, index, num_stages, overlap, interleave, **kwargs):
    """Stage ``index`` of two copies of the model: the forward of one chunk with the backward of
    another, one after the other or through the engine. Returns the output, the losses (last
    stage) and every parameter gradient, and the logits of the plain stages chained."""
    from dualpipe_ext.integrations import hf

    models = [copy.deepcopy(reference) for _ in range(2)]
    for m in models:
        assert hf.replace_moe(m) > 0
    chains = [hf.overlap_stages(m, num_stages, overlap=overlap, interleave=interleave, **kwargs) for m in models]
    ids0, ids1 = tokens(4, seed=1), tokens(4, seed=2)
    with torch.no_grad():
        x0, x1 = ids0, ids1
        for k in range(index):
            x0, x1 = chains[0][k](x0), chains[1][k](x1)
        logits = ids0
        for stage in chains[0]:
            logits = stage(logits)
    st0, st1 = chains[0][index], chains[1][index]
    last = index == num_stages - 1
    out1 = st1(x1)  # the backward chunk's forward ran earlier
    grad_out = torch.randn(out1.shape, generator=torch.Generator().manual_seed(3))
    loss1 = hf.causal_lm_loss(out1, ids1) if last else None
    criterion, labels = (hf.causal_lm_loss, [ids0]) if last else (None, [])
    if interleave:
        out0, loss0 = type(st0).overlapped_forward_backward(st0, [x0], criterion, labels, st1, loss1,
                                                            [] if last else [out1], [] if last else [grad_out])
    else:
        out0 = st0(x0)
        loss0 = criterion(out0, *labels) if last else None
        torch.autograd.backward([loss1] if last else [out1], None if last else [grad_out])
    torch.autograd.backward([loss0] if last else [out0], None if last else [grad_out])
    grads = {f"{i}:{n}": p.grad for i, m in enumerate(models) for n, p in m.named_parameters() if p.grad is not None}
    return out0.detach(), [loss.detach() for loss in (loss0, loss1) if loss is not None], grads, logits


def _assert_pair_equals_plain(reference, index, num_stages, overlap, **kwargs):
    po, pl, pg, logits = _pair(reference, index, num_stages, overlap, False, **kwargs)
    oo, ol, og, _ = _pair(reference, index, num_stages, overlap, True, **kwargs)
    assert torch.equal(oo, po) and all(torch.equal(a, b) for a, b in zip(ol, pl))
    assert sorted(og) == sorted(pg) and og and all(torch.equal(og[n], pg[n]) for n in og)
    untouched = copy.deepcopy(reference)
    torch.testing.assert_close(logits, untouched(tokens(4, seed=1)).logits.detach(), rtol=1e-4, atol=2e-5)
    return og


@pytest.mark.parametrize("name", ["deepseek_v3", "qwen3_moe", "mixtral"])  # DeepSeek-V3's layer 0 is dense
@pytest.mark.parametrize("two_batch", [False, True])
def test_overlapped_pair_of_hf_stages_equals_the_plain_order(name, two_batch):
    from dualpipe_ext.overlap import OverlapConfig

    _assert_pair_equals_plain(build(name), 0, 1, OverlapConfig(two_batch=two_batch))


@pytest.mark.slow
@pytest.mark.parametrize("index", [0, 1])
def test_dense_layers_between_and_after_moe_layers(index):
    """Layers 1, 2 and 4 of 5 dense, stages of 2 and 3 layers: stage 0 ends with a dense layer (in its
    epilogue); stage 1 starts with one (run in the next MoE layer's attention component) and ends
    with one before the head. Both chunks' dense layers get their gradients."""
    from dualpipe_ext.integrations import hf
    from dualpipe_ext.overlap import OverlapConfig

    reference = _with_dense_layers(5, dense=[1, 2, 4])
    model = copy.deepcopy(reference)
    hf.replace_moe(model)
    stages = hf.overlap_stages(model, 2, layers_per_stage=[2, 3])
    assert [len(s.layers) for s in stages] == [1, 1]
    assert len(stages[0].epilogue.dense) == 1 and len(stages[1].layers[0].dense_before) == 1
    assert len(stages[1].epilogue.dense) == 1 and stages[1].epilogue.lm_head is not None
    grads = _assert_pair_equals_plain(reference, index, 2, OverlapConfig(), layers_per_stage=[2, 3])
    for copy_index in (0, 1):
        for j in ([1] if index == 0 else [2, 4]):
            g = grads[f"{copy_index}:model.layers.{j}.mlp.down_proj.weight"]
            assert g.abs().sum() > 0


def test_overlap_stages_refuse_stages_without_moe_layers_and_bad_splits():
    from dualpipe_ext.integrations import hf

    model = build("deepseek_v3")  # layer 0 is dense
    hf.replace_moe(model)
    with pytest.raises(ValueError, match=r"stage 0 \(layers 0 to 0\) has no MoE layer"):
        hf.overlap_stages(model, 2)
    with pytest.raises(TypeError, match="not a dualpipe_ext.moe.MoE"):
        hf.HFLayer(model.model.layers[0])
    model = build("qwen3_moe")
    with pytest.raises(TypeError, match="replace_moe"):
        hf.overlap_stages(model, 2)
    hf.replace_moe(model)
    with pytest.raises(ValueError, match="at least one"):
        hf.overlap_stages(model, 3)
    stages = hf.overlap_stages(model, 2)
    with pytest.raises(ValueError, match="input ids"):
        stages[0](torch.zeros(2, 8, 16))
    with pytest.raises(ValueError, match="hidden states"):
        stages[1](torch.zeros(2, 8, dtype=torch.int64))
