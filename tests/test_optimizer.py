"""`lra_param_groups` / `create_lra_optimizer`: principal adapters train at LoRA's learning rates without collapsing."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_bert_seq_cls
from peft import LoraConfig, get_peft_model
from torch import nn

from lra_peft import LRAConfig, create_lra_optimizer, lra_param_groups
from lra_peft.layer import LRALayer
from lra_peft.optimizer import UV_GAIN


class MLP(nn.Module):
    """One 64×64 layer whose top singular value is 20: a high-gain layer (MiniLM's reach 11)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(64, 64)
        u, _, v = torch.linalg.svd(torch.randn(64, 64))
        s = torch.linspace(20.0, 0.5, 64)
        self.proj.weight.data = u @ torch.diag(s) @ v
        self.head = nn.Linear(64, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.proj(x)))


def effective_weight(model: nn.Module) -> torch.Tensor:
    layer = model.base_model.model.proj
    eye = torch.eye(64)
    with torch.no_grad():
        return layer(eye).T - layer.get_base_layer().bias[:, None]  # columns: W_eff e_j


def first_step_change(model: nn.Module, optimizer: torch.optim.Optimizer) -> float:
    """Spectral norm of the change one optimizer step makes to the adapted layer's effective weight."""
    before = effective_weight(model)
    torch.manual_seed(1)
    x, y = torch.randn(32, 64), torch.randint(0, 2, (32,))
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    return torch.linalg.matrix_norm(effective_weight(model) - before, ord=2).item()


def lra(init_weights="principal") -> nn.Module:
    return get_peft_model(MLP(), LRAConfig(r=8, target_modules=["proj"], modules_to_save=["head"],
                                           init_weights=init_weights))


def test_principal_first_step_moves_w_about_as_much_as_lora_and_plain_adamw_does_not():
    lr = 2e-3
    lora = get_peft_model(MLP(), LoraConfig(r=8, lora_alpha=8, target_modules=["proj"], modules_to_save=["head"]))
    lora_change = first_step_change(lora, torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=lr))

    grouped = lra()
    grouped_change = first_step_change(grouped, create_lra_optimizer(grouped, lr=lr))
    plain = lra()
    plain_change = first_step_change(plain, torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad],
                                                              lr=lr))
    # U, V and λ all move (LoRA's first step moves only B) and UV_GAIN is 2 / (1/√3) ≈ 3.5× LoRA's first-step gain.
    assert grouped_change < 5 * lora_change
    assert plain_change > 20 * lora_change  # the failure the groups exist to prevent


def test_groups_scale_u_and_v_of_each_principal_layer_and_nothing_else():
    lr, decay = 1e-3, 0.01
    base = make_bert_seq_cls()
    with torch.no_grad():  # pretrained-like gains (tiny BERT's random init has singular values below 1/√3)
        for name, module in base.named_modules():
            if name.endswith(("query", "value")):
                module.weight.mul_(50.0)
    model = get_peft_model(base, LRAConfig(r=4, target_modules=["query", "value"], init_weights="principal",
                                           task_type="SEQ_CLS"))
    groups = lra_param_groups(model, lr, weight_decay=decay)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sorted(lr_of) == sorted(id(p) for p in trainable)  # every trainable parameter once, no frozen ones
    assert sum(len(g["params"]) for g in groups) == len(trainable)

    layers = [m for m in model.modules() if isinstance(m, LRALayer)]
    assert layers
    for layer in layers:
        gain = layer.lra_lambda0["default"].abs().max().item() * layer.scaling["default"]
        expected = lr * min(1.0, UV_GAIN / gain)
        assert expected < lr
        for param in (layer.lra_U["default"], layer.lra_V["default"]):
            assert lr_of[id(param)] == pytest.approx(expected)
            assert decay_of[id(param)] == decay
        assert lr_of[id(layer.lra_lambda["default"])] == lr
        assert decay_of[id(layer.lra_lambda["default"])] == 0.0
    head = model.base_model.model.classifier.modules_to_save["default"]
    assert lr_of[id(head.weight)] == lr and decay_of[id(head.weight)] == decay
    assert lr_of[id(head.bias)] == lr and decay_of[id(head.bias)] == 0.0


def test_factor_comes_from_the_initial_lambda_so_a_continued_run_gets_the_same_groups():
    model = get_peft_model(make_bert_seq_cls(), LRAConfig(r=4, target_modules=["query"], init_weights="principal"))
    before = [g["lr"] for g in lra_param_groups(model, 1e-3)]
    with torch.no_grad():
        for layer in (m for m in model.modules() if isinstance(m, LRALayer)):
            layer.lra_lambda["default"].mul_(3.0)
    assert [g["lr"] for g in lra_param_groups(model, 1e-3)] == before


def test_zero_initialised_adapters_and_a_fixed_scale():
    model = lra(init_weights=True)
    assert {g["lr"] for g in lra_param_groups(model, 1e-3)} == {1e-3}
    model = lra()
    layer = model.base_model.model.proj
    groups = lra_param_groups(model, 1e-3, uv_lr_scale=0.25)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert lr_of[id(layer.lra_U["default"])] == pytest.approx(2.5e-4)
    assert lr_of[id(layer.lra_lambda["default"])] == 1e-3


@pytest.mark.parametrize("kwargs, name", [
    (dict(lr=0.0), "lr"), (dict(lr=math.nan), "lr"), (dict(lr=1e-3, uv_lr_scale=2.0), "uv_lr_scale"),
    (dict(lr=1e-3, uv_lr_scale="big"), "uv_lr_scale"),
])
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        lra_param_groups(lra(), **kwargs)


def test_optimizer_state_round_trips_between_two_identically_built_optimizers():
    model = lra()
    optimizer = create_lra_optimizer(model, lr=1e-3, weight_decay=0.01)
    first_step_change(model, optimizer)
    again = create_lra_optimizer(model, lr=1e-3, weight_decay=0.01)
    again.load_state_dict(optimizer.state_dict())  # raises if the group layout differs
    assert [g["lr"] for g in again.param_groups] == [g["lr"] for g in optimizer.param_groups]

    # The state lands on the same parameters (a group order mix-up would hand λ's moments to U).
    import copy

    resumed_model = copy.deepcopy(model)
    resumed = create_lra_optimizer(resumed_model, lr=1e-3, weight_decay=0.01)
    resumed.load_state_dict(optimizer.state_dict())
    names = dict(model.named_parameters())
    resumed_names = dict(resumed_model.named_parameters())
    state_of = {name: optimizer.state[p] for name, p in names.items() if p in optimizer.state}
    assert len(state_of) == sum(p.requires_grad for p in names.values()) > 0
    for name, state in state_of.items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(resumed.state[resumed_names[name]][key], state[key]), (name, key)


def test_gain_argument_and_recipe_default():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
    from common.args import TaskDefaults, build_parser

    defaults = TaskDefaults(dataset="sst2")
    assert build_parser("x", defaults).parse_args([]).uv_gain == UV_GAIN  # the recipes' default is the API's
    model = lra()
    layer = model.base_model.model.proj
    gain = layer.lra_lambda0["default"].abs().max().item() * layer.scaling["default"]
    lr_of = {id(p): g["lr"] for g in lra_param_groups(model, 1e-3, uv_gain=4.0) for p in g["params"]}
    assert lr_of[id(layer.lra_U["default"])] == pytest.approx(1e-3 * 4.0 / gain)
    with pytest.raises(ValueError, match="uv_gain"):
        lra_param_groups(model, 1e-3, uv_gain=0.0)
