"""pipeline_stages of tiny random transformers models against the unsplit model."""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

from hf_models import BUILDERS, build, tokens  # noqa: E402

NAMES = list(BUILDERS)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", NAMES)
def test_stages_in_sequence_are_the_model(name, attn):
    from dualpipe_ext.integrations import causal_lm_loss, pipeline_stages

    model = build(name, num_layers=4)
    model.config._attn_implementation = attn
    ids = tokens(2)
    for num_stages in (1, 3, 4):
        stages = pipeline_stages(model, num_stages)
        assert sum(len(s.layers) for s in stages) == 4
        x = ids
        for stage in stages:
            x = stage(x)
            assert x.dtype == torch.float32
        out = model(ids, labels=ids)
        assert torch.equal(x, out.logits)
        torch.testing.assert_close(causal_lm_loss(x, ids), out.loss, rtol=1e-6, atol=0)
    # shared, not copied: every parameter of the model is in exactly one stage
    params = [id(p) for s in stages for p in s.parameters()]
    assert sorted(params) == sorted(id(p) for p in model.parameters())


def test_stages_after_replace_moe_share_the_swapped_blocks():
    import pickle

    from dualpipe_ext.integrations import causal_lm_loss, pipeline_stages, replace_moe

    model = build("deepseek_v3", num_layers=4)
    ref = copy.deepcopy(model)
    replace_moe(model)
    ids = tokens(2)
    stages = pipeline_stages(model, 2, layers_per_stage=[1, 3])
    x = ids
    for stage in stages:
        x = stage(x)
    causal_lm_loss(x, ids).backward()
    copied = pickle.loads(pickle.dumps(stages[1]))  # a stage is plain modules: no global state
    hidden = stages[0](ids).detach()
    assert torch.equal(copied(hidden), stages[1](hidden))
    loss = ref(ids, labels=ids).loss
    loss.backward()
    torch.testing.assert_close(causal_lm_loss(x, ids), loss)
    torch.testing.assert_close(model.model.embed_tokens.weight.grad, ref.model.embed_tokens.weight.grad,
                               rtol=1e-5, atol=1e-7)


def test_causal_lm_loss_ignores_labels():
    from dualpipe_ext.integrations import causal_lm_loss

    model = build("mixtral")
    ids = tokens(2)
    labels = ids.clone()
    labels[0, 3:] = -100
    torch.testing.assert_close(causal_lm_loss(model(ids).logits, labels), model(ids, labels=labels).loss)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_stages=0), "positive int"),
    (dict(num_stages=5), "at least as many decoder layers"),
    (dict(num_stages=2, layers_per_stage=[1, 2]), "summing to 4"),
])
def test_bad_split(kwargs, match):
    from dualpipe_ext.integrations import pipeline_stages

    with pytest.raises(ValueError, match=match):
        pipeline_stages(build("qwen3_moe", num_layers=4), **kwargs)


def test_not_a_causal_lm():
    from dualpipe_ext.integrations import pipeline_stages

    with pytest.raises(TypeError, match="no lm_head"):
        pipeline_stages(build("qwen3_moe").model, 2)


@pytest.mark.slow
def test_schedules_on_two_ranks_match_the_unsplit_model(two_ranks):
    # DualPipe, DualPipeV and 1F1B over each model (conftest.PIPELINE_CASES, hf_workers.pipeline)
    from hf_workers import PIPELINE_CASES as CASES

    results = [r["pipelines"] for r in two_ranks]
    for i, case in enumerate(CASES):
        per_rank = [r[i] for r in results]
        failures = [f"rank {rank}: {f}" for rank, r in enumerate(per_rank) for f in r["failures"]]
        assert not failures, f"{case}:\n" + "\n".join(failures)
        # every parameter of each model copy is held (and checked) on exactly one rank
        names = [n for n, _ in build(case["name"], num_layers=4).named_parameters()]
        for direction in range(len(per_rank[0]["held"])):
            held = [n for r in per_rank for n in r["held"][direction]]
            assert sorted(held) == sorted(names), case
