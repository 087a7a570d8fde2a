"""merge / unmerge / safe_merge / merge_and_unload / unload / disable_adapter."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_bert_seq_cls, make_gpt2, make_mlp, rel_err
from peft import get_peft_model

from lra_peft import LRAConfig, LRALayer


def _trained(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Stand-in for training: random non-zero U, λ, V in every adapter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lra_" in name:
                param.add_(0.3 * torch.randn(param.shape, generator=gen))
    return model


def _bert_logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


@pytest.mark.parametrize("init", [True, "principal", "minor"])
@pytest.mark.parametrize("make,targets", [(make_bert_seq_cls, ["query", "value", "dense"]),
                                          (make_gpt2, ["c_attn", "c_fc"])])
def test_merge_equals_unmerged_and_unmerge_restores(make, targets, init, input_ids: torch.Tensor) -> None:
    base = make()
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model = _trained(get_peft_model(base, LRAConfig(r=4, target_modules=targets, init_weights=init)))
    before = _bert_logits(model, input_ids)
    residual = {n: m.get_base_layer().weight.clone() for n, m in model.named_modules() if isinstance(m, LRALayer)}
    model.merge_adapter()
    assert rel_err(_bert_logits(model, input_ids), before) <= 1e-5
    model.unmerge_adapter()
    assert rel_err(_bert_logits(model, input_ids), before) <= 1e-5
    for name, module in model.named_modules():
        if isinstance(module, LRALayer):
            torch.testing.assert_close(module.get_base_layer().weight, residual[name], rtol=1e-5, atol=1e-6)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, LRALayer) for m in merged.modules())
    assert rel_err(_bert_logits(merged, input_ids), before) <= 1e-5
    assert set(merged.state_dict()) == set(original)


@pytest.mark.parametrize("init", [True, "principal"])
def test_plain_module_merge_all_layer_types(init, mlp_inputs: dict) -> None:
    model = _trained(get_peft_model(make_mlp(), LRAConfig(r=2, target_modules=["emb", "conv", "lin0"],
                                                         init_weights=init)))
    with torch.no_grad():
        before = model(**mlp_inputs)
        merged = model.merge_and_unload()
        assert rel_err(merged(**mlp_inputs), before) <= 1e-5


@pytest.mark.parametrize("init", [True, "principal"])
def test_unload_and_disable_give_the_original_model(init, input_ids: torch.Tensor) -> None:
    base = make_bert_seq_cls()
    expected = _bert_logits(base, input_ids)
    model = _trained(get_peft_model(copy.deepcopy(base), LRAConfig(r=4, target_modules=["query", "value"],
                                                                   init_weights=init)))
    assert rel_err(_bert_logits(model, input_ids), expected) > 1e-3
    with model.disable_adapter():
        # The classifier head is in modules_to_save (a trained copy) only for task_type models; none here.
        assert rel_err(_bert_logits(model, input_ids), expected) <= 1e-5
    assert rel_err(_bert_logits(model, input_ids), expected) > 1e-3
    unloaded = model.unload()
    assert rel_err(_bert_logits(unloaded, input_ids), expected) <= 1e-5


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_safe_merge_with_non_finite_adapter_raises_and_leaves_base_untouched(bad: float) -> None:
    model = _trained(get_peft_model(make_bert_seq_cls(), LRAConfig(r=4, target_modules=["query", "value"])))
    layers = [m for m in model.modules() if isinstance(m, LRALayer)]
    with torch.no_grad():
        layers[-1].lra_lambda["default"][0] = bad  # only the last layer is broken
    weights = {id(m): m.get_base_layer().weight.clone() for m in layers}
    with pytest.raises(ValueError, match="NaN or Inf"):
        model.merge_adapter(safe_merge=True)
    with pytest.raises(ValueError, match="NaN or Inf"):
        model.merge_and_unload(safe_merge=True)
    for m in layers:
        assert torch.equal(m.get_base_layer().weight, weights[id(m)])
        assert not m.merged
    assert any(isinstance(m, LRALayer) for m in model.modules())


def test_merge_subset_of_adapters_with_principal_owner(input_ids: torch.Tensor) -> None:
    """Merging a second adapter while a principal adapter owns the residual must still yield W + ΔW_other."""
    base = make_bert_seq_cls()
    model = get_peft_model(copy.deepcopy(base), LRAConfig(r=4, target_modules=["query"], init_weights="principal"))
    model.add_adapter("other", LRAConfig(r=2, target_modules=["query"], init_weights=False))
    model.set_adapter("other")
    expected = _bert_logits(model, input_ids)
    deltas = {name: (m.scaling["other"] * (m.lra_U["other"] * m.lra_lambda["other"]) @ m.lra_V["other"].T).detach()
              for name, m in model.base_model.model.named_modules() if isinstance(m, LRALayer)}
    merged = model.merge_and_unload(adapter_names=["other"])
    assert rel_err(_bert_logits(merged, input_ids), expected) <= 1e-5
    # The merge really carries "other" and only it: each merged weight is W + ΔW_other, with the original W (not the
    # residual) underneath. (The logits of this tiny model move by ~3e-5 only, too little to tell that apart.)
    assert len(deltas) == 2
    for name, other in deltas.items():
        original = base.get_submodule(name).weight
        assert other.norm() > 0.1 * original.norm()
        torch.testing.assert_close(merged.get_submodule(name).weight - original, other, rtol=1e-4, atol=1e-5)


def test_merging_into_a_tied_weight_is_refused_and_changes_nothing(input_ids: torch.Tensor) -> None:
    # GPT-2's lm_head shares wte's weight: merging an adapter of wte would move the logits through lm_head too.
    model = _trained(get_peft_model(make_gpt2(), LRAConfig(r=4, target_modules=["wte", "c_attn"])))
    lm_head = model.base_model.model.lm_head.weight
    before = _bert_logits(model, input_ids)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    for merge in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(ValueError, match=r"into transformer\.wte would also change lm_head.*Nothing was merged"):
            merge()
        assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
        assert not any(m.merged for m in model.modules() if isinstance(m, LRALayer))
        assert torch.equal(_bert_logits(model, input_ids), before)
    assert model.base_model.model.lm_head.weight is lm_head
    # An adapter that adds nothing to wte merges (nothing shared changes), as does one on untied weights.
    untrained = get_peft_model(make_gpt2(), LRAConfig(r=4, target_modules=["wte"]))
    reference = _bert_logits(untrained, input_ids)
    assert torch.allclose(_bert_logits(untrained.merge_and_unload(), input_ids), reference)
    untied = make_gpt2()
    untied.config.tie_word_embeddings = False
    untied.lm_head.weight = torch.nn.Parameter(untied.lm_head.weight.detach().clone())
    model = _trained(get_peft_model(untied, LRAConfig(r=4, target_modules=["wte"])))
    expected = _bert_logits(model, input_ids)
    assert rel_err(_bert_logits(model.merge_and_unload(), input_ids), expected) <= 1e-5
