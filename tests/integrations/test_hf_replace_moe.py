"""replace_moe on tiny random transformers models: the same function as the untouched model."""
from __future__ import annotations

import copy
import importlib
import sys

import pytest
import torch

pytest.importorskip("transformers")

from hf_models import BUILDERS, NUM_MOE_BLOCKS, build, moe_layout, output_grad, tokens  # noqa: E402

NAMES = list(BUILDERS)
TOL = dict(rtol=1e-5, atol=1e-6)  # float32: the experts sum in another order


def _close(got, want, name, scaled=False):
    """Elementwise within TOL; ``scaled``: within 1e-5 of the largest magnitude (the Triton GEMMs
    accumulate in tiles, so a gradient's small entries may carry the rounding of its large ones)."""
    if scaled:
        err = float((got - want).abs().max()) if want.numel() else 0.0
        assert err <= 1e-5 * float(want.abs().max()) + 1e-7, f"{name}: max error {err:.3g}"
    else:
        torch.testing.assert_close(got, want, **TOL, msg=name)


def _check(model_grads, full, sharded, rank=0, world=1, merged=None, scaled=False):
    """Replicated gradients (summed over ranks in ``merged``) and this rank's expert slices."""
    assert set(model_grads) == set(full)
    for name, want in full.items():
        if name in sharded:
            rows = want.shape[0] // world
            _close(model_grads[name], want[rank * rows:(rank + 1) * rows], name, scaled)
        else:
            _close((merged or model_grads)[name], want, name, scaled)


def _reference(name: str, batch: int):
    ref = build(name)
    logits = ref(tokens(batch)).logits
    (logits * output_grad(batch)).sum().backward()
    return logits.detach(), ref


@pytest.mark.parametrize("kernels", ["reference", "triton"])
@pytest.mark.parametrize("name", NAMES)
def test_same_logits_and_gradients(name, kernels, monkeypatch):
    from dualpipe_ext.integrations import replace_moe
    from dualpipe_ext.moe import MoE

    # "triton": every MoE kernel (routing, layout, permute, expand/reduce, grouped GEMM) under the interpreter
    monkeypatch.setenv("DUALPIPE_EXT_TRITON", "1" if kernels == "triton" else "0")
    model = build(name)
    ref = copy.deepcopy(model)
    assert replace_moe(model) == NUM_MOE_BLOCKS[name]
    swapped = [m for m in model.modules() if isinstance(m, MoE)]
    assert len(swapped) == NUM_MOE_BLOCKS[name]
    ids = tokens(3)
    logits = model(ids).logits
    (logits * output_grad(3)).sum().backward()
    ref_logits = ref(ids).logits
    (ref_logits * output_grad(3)).sum().backward()
    torch.testing.assert_close(logits, ref_logits, **TOL)
    full, sharded = moe_layout(ref)
    _check({n: p.grad for n, p in model.named_parameters()}, full, sharded, scaled=kernels == "triton")
    if name == "deepseek_v3":  # the aux-loss-free bias became MoE.expert_bias, a buffer
        bias = ref.model.layers[1].mlp.gate.e_score_correction_bias
        assert torch.equal(swapped[0].expert_bias, bias) and bias.abs().sum() > 0
        assert "expert_bias" in dict(swapped[0].named_buffers())


@pytest.mark.slow
def test_expert_parallel_two_ranks(two_ranks):
    # each rank fed its slice of one batch, EP over both ranks (hf_workers.expert_parallel)
    from hf_workers import EP_BATCH_PER_RANK

    results = [r["expert_parallel"] for r in two_ranks]
    for name in NAMES:
        ref_logits, ref = _reference(name, 2 * EP_BATCH_PER_RANK)
        full, sharded = moe_layout(ref, 2)
        per_rank = [r[name] for r in results]
        assert [r["count"] for r in per_rank] == [NUM_MOE_BLOCKS[name]] * 2
        torch.testing.assert_close(torch.cat([r["logits"] for r in per_rank]), ref_logits, **TOL)
        merged = {n: sum(r["grads"][n] for r in per_rank) for n in full}
        for rank, r in enumerate(per_rank):
            _check(r["grads"], full, sharded, rank, 2, merged)


def test_options_reach_the_moe():
    from dualpipe_ext.integrations import replace_moe
    from dualpipe_ext.moe import MoE

    model = build("qwen3_moe")
    replace_moe(model, num_comm_sms=3)
    assert {m.num_comm_sms for m in model.modules() if isinstance(m, MoE)} == {3}


class _HomeMadeMoE(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = torch.nn.Linear(16, 4, bias=False)
        self.experts = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(4))


def test_unsupported_block_is_named_and_nothing_changes():
    from dualpipe_ext.integrations import replace_moe

    model = build("mixtral")
    model.model.layers[1].mlp = _HomeMadeMoE()
    before = type(model.model.layers[0].mlp)
    with pytest.raises(TypeError, match=r"model\.layers\.1\.mlp \(_HomeMadeMoE\).*supported: .*MixtralSparseMoeBlock"):
        replace_moe(model)
    assert type(model.model.layers[0].mlp) is before  # checked before anything was swapped


def test_model_without_moe_blocks():
    from transformers import LlamaConfig, LlamaForCausalLM

    from dualpipe_ext.integrations import replace_moe

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(TypeError, match="LlamaForCausalLM has no MoE block"):
        replace_moe(model)
    swapped = build("qwen3_moe")
    replace_moe(swapped)
    with pytest.raises(TypeError, match="Qwen3MoeForCausalLM has no MoE block"):  # already swapped
        replace_moe(swapped)


@pytest.mark.parametrize("kwargs,match", [
    (dict(group=3), "group must be a torch.distributed ProcessGroup"),
    (dict(dtype=torch.float64), "'dtype' is set by replace_moe"),
    (dict(bogus=1), r"unknown option\(s\) \['bogus'\]"),
    (dict(num_comm_sms=0), "num_comm_sms"),
])
def test_bad_group_or_options(kwargs, match):
    from dualpipe_ext.integrations import replace_moe

    with pytest.raises(ValueError, match=match):
        replace_moe(build("qwen3_moe"), **kwargs)


def test_block_features_moe_does_not_reproduce():
    from dualpipe_ext.integrations import replace_moe

    model = build("mixtral")
    model.model.layers[0].mlp.jitter_noise = 0.1
    with pytest.raises(ValueError, match="router_jitter_noise"):
        replace_moe(model)
    model = build("qwen3_moe")
    model.config.output_router_logits = True
    with pytest.raises(ValueError, match="output_router_logits"):
        replace_moe(model)


def test_clear_error_without_transformers(monkeypatch):
    # None in sys.modules makes `import transformers` raise ImportError, as if it were not installed
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "dualpipe_ext.integrations.hf", raising=False)
    import dualpipe_ext.integrations as integrations

    monkeypatch.delattr(integrations, "hf", raising=False)
    for load in (lambda: importlib.import_module("dualpipe_ext.integrations.hf"),
                 lambda: integrations.replace_moe):
        with pytest.raises(ImportError) as info:
            load()
        message = str(info.value)
        assert "\n" not in message and "'transformers'" in message and 'pip install -e ".[hf]"' in message
        assert info.value.__cause__ is None and info.value.__suppress_context__


def test_importing_dualpipe_ext_does_not_import_transformers():
    import subprocess

    code = ("import sys, dualpipe_ext, dualpipe_ext.integrations; dualpipe_ext.integrations.__all__; "
            "assert 'transformers' not in sys.modules, 'transformers was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
