"""safe_merge with a NaN or Inf anywhere in any adapter raises and leaves every weight bit-identical."""

from __future__ import annotations

import pytest
import torch
from conftest import make_bert_seq_cls, make_mlp
from peft import get_peft_model
from reliability_utils import assert_unchanged, record

from lra_peft import LRAConfig, LRALayer

TARGETS = ["query", "value"]


def _trained(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lra_" in name:
                param.add_(0.3 * torch.randn(param.shape, generator=gen))
    return model


def _poison(layer: LRALayer, factor: str, adapter: str, value: float) -> None:
    with torch.no_grad():
        tensor = getattr(layer, factor)[adapter]
        tensor[tuple(size - 1 for size in tensor.shape)] = value


def _two_adapters(init_second) -> torch.nn.Module:
    model = get_peft_model(make_bert_seq_cls(), LRAConfig(r=4, target_modules=TARGETS, init_weights="principal"))
    model.add_adapter("second", LRAConfig(r=2, target_modules=TARGETS, init_weights=init_second))
    return _trained(model)


def _assert_every_merge_refused(model: torch.nn.Module, adapter_names=None) -> None:
    before = record(model)
    with pytest.raises(ValueError, match="NaN or Inf"):
        model.merge_adapter(adapter_names=adapter_names, safe_merge=True)
    assert_unchanged(model, before, plain_base=False)
    with pytest.raises(ValueError, match="NaN or Inf"):
        model.merge_and_unload(safe_merge=True, adapter_names=adapter_names)
    assert_unchanged(model, before, plain_base=False)
    assert not any(m.merged for m in model.modules() if isinstance(m, LRALayer))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("factor", ["lra_U", "lra_lambda", "lra_V"])
def test_non_finite_trained_factor_of_the_last_layer(factor: str, bad: float) -> None:
    model = _trained(get_peft_model(make_bert_seq_cls(), LRAConfig(r=4, target_modules=TARGETS)))
    _poison([m for m in model.modules() if isinstance(m, LRALayer)][-1], factor, "default", bad)
    _assert_every_merge_refused(model)


@pytest.mark.parametrize("factor", ["lra_U0", "lra_lambda0", "lra_V0"])
def test_non_finite_initial_factor_of_a_second_principal_adapter(factor: str) -> None:
    # The second SVD-initialised adapter subtracts its ΔW₀ when merged: a NaN there would reach W.
    model = _two_adapters("principal")
    _poison([m for m in model.modules() if isinstance(m, LRALayer)][-1], factor, "second", float("nan"))
    _assert_every_merge_refused(model, adapter_names=["second"])


@pytest.mark.parametrize("factor", ["lra_U0", "lra_lambda0", "lra_V0"])
def test_non_finite_residual_of_an_unmerged_owner_blocks_merge_and_unload(factor: str) -> None:
    # merge_and_unload adds the owner's ΔW₀ back when the owner is not merged: that must be checked first as well.
    model = _two_adapters(False)
    _poison([m for m in model.modules() if isinstance(m, LRALayer)][0], factor, "default", float("inf"))
    before = record(model)
    with pytest.raises(ValueError, match="NaN or Inf.*lra_U0/lra_lambda0/lra_V0 of adapter 'default'"):
        model.merge_and_unload(safe_merge=True, adapter_names=["second"])
    assert_unchanged(model, before, plain_base=False)


def test_one_broken_adapter_among_several_changes_nothing() -> None:
    model = _two_adapters(False)
    _poison([m for m in model.modules() if isinstance(m, LRALayer)][-1], "lra_V", "second", float("nan"))
    _assert_every_merge_refused(model, adapter_names=["default", "second"])
    # The healthy adapter alone still merges, and exactly as if the broken one were not there.
    model.merge_adapter(adapter_names=["default"], safe_merge=True)
    assert all(m.merged_adapters == ["default"] for m in model.modules() if isinstance(m, LRALayer))


def test_finite_factors_whose_merge_overflows_are_refused() -> None:
    # Each factor is finite, but W + ΔW overflows float32: only checking the result catches this.
    model = _trained(get_peft_model(make_bert_seq_cls(), LRAConfig(r=4, target_modules=TARGETS)))
    layer = [m for m in model.modules() if isinstance(m, LRALayer)][0]
    with torch.no_grad():
        layer.lra_lambda["default"].fill_(3e38)
        layer.lra_U["default"].fill_(10.0)
    _assert_every_merge_refused(model)


@pytest.mark.parametrize("factor", ["lra_U", "lra_lambda", "lra_V"])
@pytest.mark.parametrize("target", ["emb", "conv"])
def test_embedding_and_conv_layers(target: str, factor: str) -> None:
    model = _trained(get_peft_model(make_mlp(), LRAConfig(r=2, target_modules=["emb", "conv", "lin0"])))
    layer = model.get_submodule(f"base_model.model.{target}")
    assert isinstance(layer, LRALayer)
    _poison(layer, factor, "default", float("nan"))
    _assert_every_merge_refused(model)
