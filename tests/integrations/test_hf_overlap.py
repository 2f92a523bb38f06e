"""transformers decoder layers through the overlap engine: an overlapped pair of component stages
equals the same components run one after another, bit for bit, and the stages compute the
untouched model's function (fp32 tolerance)."""
from __future__ import annotations

import copy

import pytest
import torch

from hf_models import build, tokens


def _dense_free(name):
    model = build(name)
    if name == "deepseek_v3":  # layers that are all MoE (first_k_dense_replace=0)
        from transformers import DeepseekV3ForCausalLM

        config = copy.deepcopy(model.config)
        config.first_k_dense_replace = 0
        torch.manual_seed(0)
        model = DeepseekV3ForCausalLM(config).float()
        model.config._attn_implementation = "eager"
    return model


@pytest.mark.parametrize("name", ["deepseek_v3", "qwen3_moe", "mixtral"])
@pytest.mark.parametrize("two_batch", [False, True])
def test_overlapped_pair_of_hf_stages_equals_the_plain_order(name, two_batch):
    from dualpipe_ext.integrations import hf
    from dualpipe_ext.overlap import OverlapConfig

    reference = _dense_free(name)
    cfg = OverlapConfig(two_batch=two_batch)
    runs = []
    for interleave in (False, True):
        models = [copy.deepcopy(reference) for _ in range(2)]
        for m in models:
            assert hf.replace_moe(m) == m.config.num_hidden_layers
        st0, st1 = (hf.overlap_stages(m, 1, overlap=cfg, interleave=interleave)[0] for m in models)
        ids0, ids1 = tokens(4, seed=1), tokens(4, seed=2)
        loss1 = hf.causal_lm_loss(st1(ids1), ids1)  # the backward chunk's forward ran earlier
        if interleave:
            out0, loss0 = type(st0).overlapped_forward_backward(st0, [ids0], hf.causal_lm_loss, [ids0], st1, loss1,
                                                                [], [])
        else:
            out0 = st0(ids0)
            loss0 = hf.causal_lm_loss(out0, ids0)
            loss1.backward()
        loss0.backward()
        runs.append((out0.detach(), loss0.detach(), loss1.detach(),
                     [p.grad for m in models for p in m.parameters()]))
    (po, pl0, pl1, pg), (oo, ol0, ol1, og) = runs
    assert torch.equal(oo, po) and torch.equal(ol0, pl0) and torch.equal(ol1, pl1)
    assert len(pg) == len(og) and all(a is not None and torch.equal(a, b) for a, b in zip(og, pg))
    # and the function is the untouched model's
    untouched = copy.deepcopy(reference)
    logits = untouched(tokens(4, seed=1)).logits
    tol = dict(rtol=1e-4, atol=1e-5) if not two_batch else dict(rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(oo, logits.detach(), **tol)


def test_overlap_stages_refuse_dense_layers_and_bad_splits():
    from dualpipe_ext.integrations import hf

    model = build("deepseek_v3")  # layer 0 is dense
    hf.replace_moe(model)
    with pytest.raises(TypeError, match="not a dualpipe_ext.moe.MoE"):
        hf.overlap_stages(model, 1)
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
