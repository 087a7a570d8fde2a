"""Several adapters in one model: add, set, delete, several active, mixed-batch inference."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_bert_seq_cls, rel_err
from peft import get_peft_model

from lra_peft import LRAConfig, LRALayer

TARGETS = ["query", "value"]


def _randomize(model: torch.nn.Module, adapter: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lra_" in name and name.endswith(f".{adapter}"):
                param.add_(0.3 * torch.randn(param.shape, generator=gen))


def _logits(model: torch.nn.Module, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids, **kwargs).logits


def _single(base: torch.nn.Module, init, seed: int) -> torch.nn.Module:
    model = get_peft_model(copy.deepcopy(base), LRAConfig(r=4, target_modules=TARGETS, init_weights=init))
    _randomize(model, "default", seed)
    return model


@pytest.fixture
def two_adapters():
    """One model with a principal adapter "a" and a plain adapter "b", plus reference single-adapter models."""
    base = make_bert_seq_cls()
    torch.manual_seed(0)
    ref_a = _single(base, "principal", 1)
    ref_b = _single(base, True, 2)
    model = get_peft_model(copy.deepcopy(base), LRAConfig(r=4, target_modules=TARGETS, init_weights="principal"))
    model.add_adapter("b", LRAConfig(r=4, target_modules=TARGETS, init_weights=True))
    # copy the reference adapters' weights in so that outputs can be compared exactly
    state = model.state_dict()
    for name, value in ref_a.state_dict().items():
        if ".lra_" in name:
            state[name] = value
    for name, value in ref_b.state_dict().items():
        if ".lra_" in name and name.endswith(".default"):
            state[name[: -len(".default")] + ".b"] = value
    model.load_state_dict(state)
    return base, model, ref_a.eval(), ref_b.eval()


def test_set_adapter_switches_outputs(two_adapters, input_ids: torch.Tensor) -> None:
    base, model, ref_a, ref_b = two_adapters
    model.set_adapter("default")
    assert rel_err(_logits(model, input_ids), _logits(ref_a, input_ids)) <= 1e-5
    model.set_adapter("b")
    assert rel_err(_logits(model, input_ids), _logits(ref_b, input_ids)) <= 1e-5
    with model.disable_adapter():
        assert rel_err(_logits(model, input_ids), _logits(base, input_ids)) <= 1e-5


def test_several_active_adapters_add_up(two_adapters, input_ids: torch.Tensor) -> None:
    base, model, ref_a, ref_b = two_adapters
    model.base_model.set_adapter(["default", "b"])
    both = _logits(model, input_ids)
    merged = copy.deepcopy(model).merge_and_unload(adapter_names=["default", "b"])
    assert rel_err(_logits(merged, input_ids), both) <= 1e-5
    # The layer weights of the merged model are W + ΔW_a + ΔW_b: check on one layer against the references.
    layer_a = ref_a.base_model.model.bert.encoder.layer[0].attention.self.query
    layer_b = ref_b.base_model.model.bert.encoder.layer[0].attention.self.query
    # ref_a owns its layer's residual, so its effective weight is residual + s·U·diag(λ)·Vᵀ (= W − ΔW₀ + ...).
    expected = (layer_a.get_base_layer().weight + layer_a.get_delta_weight("default")
                + layer_b.get_delta_weight("default"))
    torch.testing.assert_close(merged.bert.encoder.layer[0].attention.self.query.weight, expected,
                               rtol=1e-5, atol=1e-5)


def test_mixed_batch_inference(two_adapters, input_ids: torch.Tensor) -> None:
    base, model, ref_a, ref_b = two_adapters
    model.eval()  # as with LoRA, adapter_names is an inference-only argument
    names = ["default", "__base__", "b", "default"]
    mixed = _logits(model, input_ids, adapter_names=names)
    for row, name in enumerate(names):
        ref = {"default": ref_a, "b": ref_b, "__base__": base}[name]
        expected = _logits(ref, input_ids[row: row + 1])
        assert rel_err(mixed[row: row + 1], expected) <= 1e-5, name
    with pytest.raises(ValueError, match="non-existing adapter"):
        _logits(model, input_ids, adapter_names=["default", "nope", "b", "b"])


def test_mixed_batch_base_rows_are_exactly_base_without_principal(input_ids: torch.Tensor) -> None:
    base = make_bert_seq_cls()
    model = _single(base, True, 3).eval()
    mixed = _logits(model, input_ids, adapter_names=["__base__"] * len(input_ids))
    assert torch.equal(mixed, _logits(base, input_ids))


def test_delete_adapter_restores_original_weights(two_adapters, input_ids: torch.Tensor) -> None:
    base, model, ref_a, ref_b = two_adapters
    model.delete_adapter("default")
    assert "default" not in model.peft_config
    for module in model.modules():
        if isinstance(module, LRALayer):
            assert module.residual_owner is None
            assert "default" not in module.lra_U and "default" not in module.lra_U0
    model.set_adapter("b")
    assert rel_err(_logits(model, input_ids), _logits(ref_b, input_ids)) <= 1e-5
    q_base = model.base_model.model.bert.encoder.layer[0].attention.self.query.get_base_layer().weight
    torch.testing.assert_close(q_base, base.bert.encoder.layer[0].attention.self.query.weight, rtol=1e-5, atol=1e-6)


def test_two_principal_adapters_in_one_model(input_ids: torch.Tensor) -> None:
    """The second principal adapter decomposes the original W, not the first one's residual."""
    base = make_bert_seq_cls()
    model = get_peft_model(copy.deepcopy(base), LRAConfig(r=4, target_modules=TARGETS, init_weights="principal"))
    model.add_adapter("second", LRAConfig(r=2, target_modules=TARGETS, init_weights="principal"))
    for adapter in ("default", "second"):
        model.set_adapter(adapter)
        assert rel_err(_logits(model, input_ids), _logits(base, input_ids)) <= 1e-5
    query = model.base_model.model.bert.encoder.layer[0].attention.self.query
    s = torch.linalg.svdvals(base.bert.encoder.layer[0].attention.self.query.weight.detach())
    torch.testing.assert_close(query.lra_lambda["second"].detach() * query.scaling["second"], s[:2], rtol=1e-4,
                               atol=1e-5)


def test_new_adapter_is_not_trainable_until_set(input_ids: torch.Tensor) -> None:
    model = get_peft_model(make_bert_seq_cls(), LRAConfig(r=4, target_modules=TARGETS))
    model.add_adapter("other", LRAConfig(r=4, target_modules=TARGETS))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and ".lra_" in n}
    assert trainable and all(n.endswith(".default") for n in trainable)
    model.set_adapter("other")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and ".lra_" in n}
    assert trainable and all(n.endswith(".other") for n in trainable)
