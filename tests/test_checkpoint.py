"""Checkpoints under global names: one MoE layer's keys, a save by 2 expert ranks loaded by 1 and the
reverse (weights, buffers, AdamW state bitwise), atomic publishing, and clear errors on bad input."""
import os

import pytest
import torch

from checkpoint_workers import build, load_into, names_of, save_trained, train_step
from dist_harness import run_ranks

from dualpipe_ext import checkpoint as ckpt


def test_moe_state_has_one_key_per_global_expert():
    moe = build()["a"]
    state = moe.global_state_dict("layers.3.mlp.")
    assert sorted(k for k in state if ".experts." in k)[:3] == ["layers.3.mlp.experts.down.0",
                                                                "layers.3.mlp.experts.down.1",
                                                                "layers.3.mlp.experts.down.2"]
    assert len([k for k in state if ".experts." in k]) == 16
    state["layers.3.mlp.experts.down.5"].fill_(7.0)  # a view: loading writes into the layer
    assert bool((moe.experts.down[5] == 7).all())
    assert {"layers.3.mlp.gate", "layers.3.mlp.expert_bias", "layers.3.mlp.expert_load",
            "layers.3.mlp.shared.gate_up"} <= set(state)


@pytest.mark.slow
def test_save_and_load_in_one_process_is_bitwise(tmp_path):
    model = build()
    opt = train_step(model, seed=0)
    names = [names_of(model)]
    saved = ckpt.model_state([model], names, for_save=True)
    saved.update(ckpt.optimizer_state(opt, [model], names, for_save=True))
    path = ckpt.save(str(tmp_path), 1, saved, {"note": "x"})
    assert ckpt.latest(str(tmp_path)) == path and ckpt.read_meta(path) == {"note": "x", "step": 1}
    fresh = build(seed=3)
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    target = ckpt.model_state([fresh], [names_of(fresh)], for_save=False)
    target.update(ckpt.optimizer_state(opt2, [fresh], [names_of(fresh)], for_save=False))
    ckpt.load(path, target)
    for key, t in saved.items():
        assert torch.equal(target[key], t), key
    assert any(torch.count_nonzero(t) for k, t in saved.items() if k.endswith("expert_load"))
    for p, q in zip(fresh.parameters(), model.parameters()):  # the optimizer resumes too
        assert torch.equal(opt2.state[p]["exp_avg_sq"], opt.state[q]["exp_avg_sq"])


@pytest.mark.slow
def test_two_expert_ranks_to_one_process_and_back(tmp_path):
    two = str(tmp_path / "two")
    saved = run_ranks(save_trained, 2, two, timeout_s=120)
    one = load_into(0, 1, two)  # 2 expert ranks -> 1 process
    for rank, res in enumerate(saved):
        for key, t in res["state"].items():
            if key.endswith("expert_load"):
                continue
            assert torch.equal(one[key], t), f"rank {rank}: {key}"
    for key, t in saved[0]["load_sum"].items():  # the group's total load, kept once
        assert torch.equal(one[key], t), key
    back = run_ranks(load_into, 2, two, timeout_s=120)  # and into 2 ranks again: experts where they belong
    for rank, res in enumerate(back):
        for key, t in res.items():
            if key.endswith("expert_load"):
                assert torch.equal(t, one[key] if rank == 0 else torch.zeros_like(t)), key
            else:
                assert torch.equal(t, one[key]), f"rank {rank}: {key}"
        experts = [k for k in res if k.endswith(".experts.gate_up.0") or k.endswith(".experts.gate_up.7")]
        assert len(experts) == 2, experts  # rank 0 holds expert 0 of each layer, rank 1 expert 7


def test_a_save_that_dies_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    model = build()
    names = [names_of(model)]
    good = ckpt.save(str(tmp_path), 2, ckpt.model_state([model], names, for_save=True), {})

    def dies(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(dcp, "save", dies)
    with pytest.raises(ckpt.CheckpointError, match=f"the latest good checkpoint is {good}"):
        ckpt.save(str(tmp_path), 4, ckpt.model_state([model], names, for_save=True), {})
    monkeypatch.undo()
    assert ckpt.latest(str(tmp_path)) == good and os.path.isdir(str(tmp_path / "step-000004.tmp"))
    fresh = build(seed=9)
    target = ckpt.model_state([fresh], [names_of(fresh)], for_save=False)
    ckpt.load(ckpt.resolve(str(tmp_path)), target)
    assert torch.equal(fresh["a"].gate, model["a"].gate)


def test_bad_folders_and_misfits_get_one_clear_error(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="no such folder"):
        ckpt.resolve(str(tmp_path / "missing"))
    with pytest.raises(ckpt.CheckpointError, match="holds no checkpoint"):
        ckpt.resolve(str(tmp_path))
    model = build()
    path = ckpt.save(str(tmp_path), 1, ckpt.model_state([model], [names_of(model)], for_save=True), {})
    from torch import nn

    from dualpipe_ext.moe import MoE, MoEConfig
    from checkpoint_workers import CFG

    wider = nn.ModuleDict({"a": MoE(MoEConfig(**dict(CFG, hidden=32)))})
    with pytest.raises(ckpt.CheckpointError, match=r"'a.gate' is \[8, 16\] there, \[8, 32\] here"):
        ckpt.load(path, ckpt.model_state([wider], [names_of(wider)], for_save=False))
    other = nn.ModuleDict({"c": MoE(MoEConfig(**CFG))})
    with pytest.raises(ckpt.CheckpointError, match="has no 'c.gate'"):
        ckpt.load(path, ckpt.model_state([other], [names_of(other)], for_save=False))
