"""get_peft_model on several architectures: what is adapted, what trains, and outputs at step 0."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_bert_seq_cls, make_gpt2, make_llama, make_mlp, rel_err
from peft import PeftModel, get_peft_model

from lra_peft import LRAConfig, LRALayer

ARCHS = {
    "bert": (make_bert_seq_cls, dict(target_modules=["query", "value"], task_type="SEQ_CLS")),
    "gpt2": (make_gpt2, dict(target_modules=["c_attn", "c_proj"], task_type="CAUSAL_LM")),
    "llama": (make_llama, dict(target_modules="all-linear", task_type="CAUSAL_LM")),
}


def _outputs(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("init", [True, "principal", "minor"])
def test_step0_outputs_unchanged(arch: str, init, input_ids: torch.Tensor) -> None:
    make, kwargs = ARCHS[arch]
    base = make()
    expected = _outputs(base, input_ids)
    model = get_peft_model(copy.deepcopy(base), LRAConfig(r=4, init_weights=init, **kwargs))
    assert rel_err(_outputs(model, input_ids), expected) <= 1e-5


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_init_false_changes_outputs(arch: str, input_ids: torch.Tensor) -> None:
    make, kwargs = ARCHS[arch]
    base = make()
    expected = _outputs(base, input_ids)
    model = get_peft_model(copy.deepcopy(base), LRAConfig(r=4, init_weights=False, **kwargs))
    assert rel_err(_outputs(model, input_ids), expected) > 1e-3


@pytest.mark.parametrize("init", [True, False, "principal", "minor"])
def test_plain_module_all_layer_types(init, mlp_inputs: dict) -> None:
    base = make_mlp()
    with torch.no_grad():
        expected = base(**mlp_inputs)
    model = get_peft_model(copy.deepcopy(base), LRAConfig(r=2, target_modules=["emb", "conv", "lin0", "lin1"],
                                                          init_weights=init))
    kinds = {type(m).__name__ for m in model.modules() if isinstance(m, LRALayer)}
    assert kinds == {"Embedding", "Conv2d", "Linear"}
    with torch.no_grad():
        out = model(**mlp_inputs)
    if init is False:
        assert rel_err(out, expected) > 1e-3
    else:
        assert rel_err(out, expected) <= 1e-5


def test_principal_factors_are_the_top_singular_triplets() -> None:
    base = make_mlp()
    weight = base.lin0.weight.detach().clone()
    model = get_peft_model(base, LRAConfig(r=3, lra_alpha=6, target_modules=["lin0"], init_weights="principal"))
    layer = model.base_model.model.lin0
    s = torch.linalg.svdvals(weight)
    # ΔW = s·U·diag(λ)·Vᵀ with s = 2, so λ holds half the singular values.
    torch.testing.assert_close(layer.lra_lambda["default"].detach() * 2, s[:3], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.get_base_layer().weight + layer.get_delta_weight("default"), weight,
                               rtol=1e-5, atol=1e-6)
    assert torch.linalg.svdvals(layer.get_base_layer().weight.detach())[0] == pytest.approx(s[3].item(), rel=1e-4)


def test_randomized_svd_principal_close_to_exact() -> None:
    base = make_mlp()
    exact = get_peft_model(copy.deepcopy(base), LRAConfig(r=4, target_modules=["lin0"], init_weights="principal"))
    approx = get_peft_model(copy.deepcopy(base), LRAConfig(r=4, target_modules=["lin0"], init_weights="principal",
                                                           svd_niter=4))
    lam_exact = exact.base_model.model.lin0.lra_lambda["default"].detach()
    lam_approx = approx.base_model.model.lin0.lra_lambda["default"].detach()
    torch.testing.assert_close(lam_approx, lam_exact, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_only_adapter_weights_get_gradients(arch: str, input_ids: torch.Tensor) -> None:
    make, kwargs = ARCHS[arch]
    model = get_peft_model(make(), LRAConfig(r=4, init_weights=False, **kwargs))
    model.train()
    if arch == "bert":
        loss = model(input_ids=input_ids, labels=torch.tensor([0, 1, 2, 0])).loss
    else:
        loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad, "no parameter received a gradient"
    assert with_grad <= trainable
    for name in trainable:
        assert ".lra_" in name or "modules_to_save" in name, name
    assert any(".lra_U." in n for n in with_grad) and any(".lra_V." in n for n in with_grad)
    assert any(".lra_lambda." in n for n in with_grad)
    if arch == "bert":  # task_type SEQ_CLS adds the classifier to modules_to_save
        assert any("classifier.modules_to_save" in n for n in with_grad)


def test_print_trainable_parameters_counts_u_lambda_v(capsys: pytest.CaptureFixture) -> None:
    model = get_peft_model(make_mlp(), LRAConfig(r=2, target_modules=["lin0", "lin1"]))
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == (32 * 2 + 2 + 24 * 2) + (4 * 2 + 2 + 32 * 2)
    model.print_trainable_parameters()
    assert "trainable params: 188" in capsys.readouterr().out


def test_default_target_modules_follow_lora_mapping() -> None:
    model = get_peft_model(make_bert_seq_cls(), LRAConfig(r=2, task_type="SEQ_CLS"))
    adapted = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, LRALayer)}
    assert adapted == {"query", "value"}


def test_rank_and_alpha_pattern() -> None:
    config = LRAConfig(r=2, target_modules=["lin0", "lin1"], rank_pattern={"lin1": 3}, alpha_pattern={"lin1": 6})
    model = get_peft_model(make_mlp(), config)
    assert model.base_model.model.lin0.r["default"] == 2
    assert model.base_model.model.lin1.r["default"] == 3
    assert model.base_model.model.lin1.scaling["default"] == pytest.approx(2.0)
    assert model.base_model.model.lin1.lra_U["default"].shape == (4, 3)


def test_orthogonal_regularizer_added_to_loss(input_ids: torch.Tensor) -> None:
    import lra_peft

    base = make_bert_seq_cls()
    labels = torch.tensor([0, 1, 2, 0])
    plain = get_peft_model(copy.deepcopy(base), LRAConfig(r=4, init_weights=False, target_modules=["query"],
                                                          task_type="SEQ_CLS"))
    torch.manual_seed(0)
    reg = get_peft_model(copy.deepcopy(base), LRAConfig(r=4, init_weights=False, target_modules=["query"],
                                                        task_type="SEQ_CLS", orth_reg_weight=0.5))
    reg.load_state_dict(plain.state_dict())
    for layer in (m for m in reg.modules() if isinstance(m, LRALayer)):
        with torch.no_grad():  # make U non-orthogonal so the regulariser is non-zero
            layer.lra_U["default"].mul_(2.0)
    penalty = lra_peft.orthogonal_loss(reg)
    layers = [m for m in reg.modules() if isinstance(m, LRALayer)]
    manual = sum(
        ((m.lra_U["default"].T @ m.lra_U["default"] - torch.eye(4)) ** 2).sum()
        + ((m.lra_V["default"].T @ m.lra_V["default"] - torch.eye(4)) ** 2).sum()
        for m in layers
    ) / len(layers)
    assert penalty.item() == pytest.approx(manual.item(), rel=1e-5)
    assert penalty.item() > 1.0
    task_loss = reg.base_model.model(input_ids=input_ids, labels=labels).loss
    total = reg(input_ids=input_ids, labels=labels).loss
    assert total.item() == pytest.approx(task_loss.item() + 0.5 * penalty.item(), rel=1e-5)
    total.backward()
    assert layers[0].lra_U["default"].grad is not None


def test_peft_model_is_a_peft_model() -> None:
    model = get_peft_model(make_mlp(), LRAConfig(r=2, target_modules=["lin0"]))
    assert isinstance(model, PeftModel)
    assert model.peft_config["default"].peft_type == "LRA"


@pytest.mark.parametrize("bias,expected", [("none", set()), ("lra_only", {"lin0"}), ("all", {"lin0", "lin1", "conv"})])
def test_bias_modes_train_the_right_biases(bias: str, expected: set) -> None:
    model = get_peft_model(make_mlp(), LRAConfig(r=2, target_modules=["lin0"], bias=bias))
    trainable_biases = {n.split(".")[2] for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}
    assert trainable_biases == expected


def test_dropout_only_in_training(mlp_inputs: dict) -> None:
    model = get_peft_model(make_mlp(), LRAConfig(r=2, target_modules=["lin0"], init_weights=False, lra_dropout=0.5))
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(**mlp_inputs), model(**mlp_inputs))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**mlp_inputs), model(**mlp_inputs))
