"""A model trained after replace_moe and pipeline_stages, its experts on 1 or 2 ranks, goes back to
plain transformers: save_pretrained, from_pretrained, the weights bitwise the trained ones."""
import pytest
import torch

pytest.importorskip("transformers")

from dist_harness import run_ranks  # noqa: E402
from hf_export_workers import train_and_export  # noqa: E402
from hf_models import BUILDERS, build  # noqa: E402

from dualpipe_ext import checkpoint as ckpt  # noqa: E402
from dualpipe_ext.integrations import hf  # noqa: E402
from dualpipe_ext.integrations.hf_export import load_full, to_transformers  # noqa: E402


def _reloaded_state(out):
    """The exported folder loaded by plain transformers, then read in the swapped layout (one rank)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    plain = {n: t.clone() for n, t in model.state_dict().items()}
    hf.replace_moe(model)
    names = {id(p): n for n, p in model.named_parameters()}
    return model, plain, ckpt.model_state([model], [names], for_save=True)


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_trained_model_goes_back_to_transformers_bitwise(name, world, tmp_path):
    out = str(tmp_path / "hf")
    results = run_ranks(train_and_export, world, name, str(tmp_path / "ckpt"), out, timeout_s=300)
    _, plain, state = _reloaded_state(out)
    untrained = build(name, seed=1).state_dict()
    compared = 0
    for rank, mine in enumerate(results):
        for key, t in mine.items():
            assert torch.equal(state[key], t), f"rank {rank}: {key} differs after the round trip"
            compared += 1
    assert compared >= len(state) - 2 * sum(1 for k in state if k.endswith("expert_load"))
    changed = [n for n, t in plain.items() if n in untrained and not torch.equal(t, untrained[n])]
    assert len(changed) > len(plain) // 2, "the export did not overwrite the fresh model's weights"


def test_to_transformers_refuses_a_checkpoint_of_another_model():
    model = build("mixtral")
    state = {k: v for k, v in model.state_dict().items()}
    with pytest.raises(ckpt.CheckpointError, match="has no 'model.layers.0.mlp.gate'"):
        to_transformers(state, build("mixtral"))


def test_export_in_one_process_is_bitwise(tmp_path):
    model = build("deepseek_v3")
    hf.replace_moe(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    path = ckpt.save(str(tmp_path), 3, ckpt.model_state([model], [names], for_save=True), {})
    fresh = to_transformers(load_full(path), build("deepseek_v3", seed=1))
    blk = fresh.model.layers[1].mlp
    moe = model.model.layers[1].mlp
    assert torch.equal(blk.experts.gate_up_proj, moe.experts.gate_up)
    assert torch.equal(blk.experts.down_proj, moe.experts.down)
    assert torch.equal(blk.gate.weight, moe.gate)
    assert torch.equal(torch.cat([blk.shared_experts.gate_proj.weight, blk.shared_experts.up_proj.weight]),
                       moe.shared.gate_up)
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight)
