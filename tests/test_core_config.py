"""Bad configs raise a ValueError naming the field and what is accepted; failures leave the model untouched."""

from __future__ import annotations

import pytest
import torch
from conftest import make_bert_seq_cls, make_mlp
from peft import get_peft_model
from peft.utils.quantization_utils import ForwardOnlyQuantizationBackend
from torch import nn

import lra_peft.format
import lra_peft.model
from lra_peft import LRAConfig, LRALayer


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(r=0), "r"),
        (dict(r=-2), "r"),
        (dict(r=2.5), "r"),
        (dict(init_weights="pissa"), "init_weights"),
        (dict(init_weights="gaussian"), "init_weights"),
        (dict(lra_alpha=0), "lra_alpha"),
        (dict(lra_alpha=-1.0), "lra_alpha"),
        (dict(svd_niter=-1), "svd_niter"),
        (dict(init_weights="minor", svd_niter=4), "svd_niter"),
        (dict(lra_dropout=1.5), "lra_dropout"),
        (dict(orth_reg_weight=-0.1), "orth_reg_weight"),
        (dict(bias="some"), "bias"),
        (dict(rank_pattern={"query": 0}), "rank_pattern"),
        (dict(quant_refine_iters=2), "quant_refine_iters"),
        (dict(target_r=16), "target_r"),
        (dict(layers_pattern="layer"), "layers_pattern"),
    ],
)
def test_bad_config_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"LRAConfig\.{field}"):
        LRAConfig(target_modules=["query"], **kwargs)


def test_unknown_init_weights_lists_accepted_values() -> None:
    with pytest.raises(ValueError, match="True, False, 'principal', 'minor', 'corda' and 'gradient'"):
        LRAConfig(init_weights="pissa")


def test_target_modules_matching_nothing_lists_module_names() -> None:
    base = make_bert_seq_cls()
    with pytest.raises(ValueError, match=r"LRAConfig\.target_modules.*matched no module.*query") as info:
        get_peft_model(base, LRAConfig(target_modules=["q_proj"]))
    assert "value" in str(info.value) and "dense" in str(info.value)


def test_rank_larger_than_matrix_for_principal_raises_before_any_change() -> None:
    base = make_mlp()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match=r"LRAConfig\.r=8 exceeds the rank of lin1 \(4x32\)"):
        get_peft_model(base, LRAConfig(r=8, target_modules=["lin0", "lin1"], init_weights="principal"))
    assert not any(isinstance(m, LRALayer) for m in base.modules())
    for key, value in base.state_dict().items():
        assert torch.equal(value, state[key]), key


class FakeGPTQLinear(nn.Module):
    """Stands in for a quantized layer whose weights cannot be dequantized (GPTQ/AWQ/EETQ in PEFT's terms)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.qweight = nn.Parameter(torch.randn(out_features, in_features), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.qweight.T


@pytest.fixture
def fake_gptq(monkeypatch: pytest.MonkeyPatch):
    original = lra_peft.model.resolve_quantization_backend

    def resolve(module, **kwargs):
        if isinstance(module, FakeGPTQLinear):
            return ForwardOnlyQuantizationBackend("gptq")
        return original(module, **kwargs)

    monkeypatch.setattr(lra_peft.model, "resolve_quantization_backend", resolve)
    monkeypatch.setattr(lra_peft.format, "resolve_quantization_backend", resolve)  # layer_type() looks it up there
    model = make_mlp()
    model.lin1 = FakeGPTQLinear(32, 4)
    return model


def test_principal_on_a_layer_that_cannot_be_decomposed(fake_gptq: nn.Module, mlp_inputs: dict) -> None:
    state = {k: v.clone() for k, v in fake_gptq.state_dict().items()}
    with pytest.raises(ValueError, match=r"init_weights='principal' cannot decompose lin1: it is a gptq"):
        get_peft_model(fake_gptq, LRAConfig(r=2, target_modules=["lin0", "lin1"], init_weights="principal"))
    assert not any(isinstance(m, LRALayer) for m in fake_gptq.modules())
    for key, value in fake_gptq.state_dict().items():
        assert torch.equal(value, state[key]), key
    # the same layer trains fine with the default initialisation
    model = get_peft_model(fake_gptq, LRAConfig(r=2, target_modules=["lin0", "lin1"]))
    assert isinstance(model.base_model.model.lin1, LRALayer)
    model(**mlp_inputs).sum().backward()


def test_unsupported_layer_type_is_named() -> None:
    base = make_mlp()
    with pytest.raises(ValueError, match=r"Target module relu \(ReLU\) is not supported"):
        get_peft_model(base, LRAConfig(r=2, target_modules=["relu", "lin0"]))


def test_config_round_trip_and_defaults(tmp_path) -> None:
    config = LRAConfig(r=6, target_modules=["query"], init_weights="principal", svd_niter=4)
    assert config.lra_alpha == 6 and config.peft_type == "LRA"
    config.save_pretrained(tmp_path)
    loaded = LRAConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded._from_checkpoint and not config._from_checkpoint


def test_newer_config_keys_load_with_a_warning_naming_them(tmp_path) -> None:
    import json

    from peft import PeftConfig

    LRAConfig(r=4, target_modules=["query"]).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    data["future_option"] = 3
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="future_option"):
        loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, LRAConfig) and loaded.r == 4


def test_principal_on_tied_weights_is_refused_before_any_change() -> None:
    from conftest import make_gpt2

    base = make_gpt2()
    head = base.lm_head.weight.clone()
    with pytest.raises(ValueError, match=r"cannot decompose transformer\.wte: its weight is shared with lm_head"):
        get_peft_model(base, LRAConfig(r=4, init_weights="principal", target_modules=["wte", "c_attn"]))
    assert torch.equal(base.lm_head.weight, head)
    assert not any(isinstance(m, LRALayer) for m in base.modules())
    get_peft_model(base, LRAConfig(r=4, init_weights=True, target_modules=["wte"]))  # ΔW-only init is fine
