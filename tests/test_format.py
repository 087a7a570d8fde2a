"""`lra_peft.format`: the one description of the adapter format that LRAModel, snapshot, export and allocation share."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn

from lra_peft import LRAConfig
from lra_peft.format import exact_pattern_key, is_factor_key, layer_type, matrix_dims, split_factor_key
from lra_peft.snapshot import LayerFactors, describe_layers, module_kind


class ConvNet(nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, groups=groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_grouped_conv2d_matrix_view_is_its_weight_reshaped() -> None:
    """A Conv2d's weight is out × in/groups × kh × kw: the matrix view (what an adapter's V must match) has
    in/groups · kh · kw columns. LRAModel and snapshot used to disagree here (in · kh · kw vs in/groups · kh · kw)."""
    conv = nn.Conv2d(4, 8, 3, groups=2)
    assert layer_type(conv) == "conv2d"
    out_features, in_features = conv.weight.reshape(conv.weight.shape[0], -1).shape
    assert matrix_dims(conv, "conv2d") == (in_features, out_features) == (18, 8)
    assert module_kind(conv, "conv") == ("conv2d", 18, 8)


def test_adapter_of_an_ungrouped_conv_does_not_fit_a_grouped_one() -> None:
    """An adapter trained on conv (groups=1, in 4·3·3 = 36) checked against a base whose conv has groups=2 is named
    as not fitting (by size), and LRA itself refuses to adapt the grouped conv with its own clear error."""
    adapter = get_peft_model(ConvNet(groups=1), LRAConfig(r=2, target_modules=["conv"]))
    layer = adapter.base_model.model.conv
    factors = LayerFactors(name="conv", U=layer.lra_U["default"], lam=layer.lra_lambda["default"],
                           V=layer.lra_V["default"], scaling=1.0)
    assert factors.in_features == 36
    describe_layers({"conv": factors}, ConvNet(groups=1), base_desc="the base")
    assert factors.kind == "conv2d"
    with pytest.raises(ValueError, match=r"maps 18 -> 8 features but the adapter's factors are for 36 -> 8"):
        describe_layers({"conv": factors}, ConvNet(groups=2), base_desc="the base")
    with pytest.raises(ValueError, match="groups=2; LRA supports groups=1 only"):
        get_peft_model(ConvNet(groups=2), LRAConfig(r=2, target_modules=["conv"]))


@pytest.mark.parametrize(
    ("key", "adapter", "expected"),
    [
        ("base_model.model.encoder.query.lra_U", None, ("base_model.model.encoder.query", "lra_U")),
        ("base_model.model.encoder.query.lra_lambda0", None, ("base_model.model.encoder.query", "lra_lambda0")),
        ("encoder.query.lra_V.default", "default", ("encoder.query", "lra_V")),
        ("encoder.query.lra_V.other", "default", None),
        ("encoder.query.lra_V.default", None, None),
        ("lra_U.default", "default", ("", "lra_U")),
        ("classifier.weight", None, None),
        ("encoder.query.lra_Ux", None, None),
    ],
)
def test_split_factor_key(key: str, adapter: str, expected: tuple | None) -> None:
    assert split_factor_key(key, adapter) == expected


def test_is_factor_key_with_or_without_adapter_name() -> None:
    assert is_factor_key("a.b.lra_U0")
    assert is_factor_key("a.b.lra_U0.any_adapter")
    assert not is_factor_key("a.b.lra_U0.x.y")
    assert not is_factor_key("lra_U")
    assert not is_factor_key("a.classifier.weight")


def test_exact_pattern_key_anchors_only_names_that_end_another() -> None:
    names = ["model.layers.0.mlp", "vision.model.layers.0.mlp", "model.layers.1.mlp"]
    assert exact_pattern_key("model.layers.0.mlp", names) == "^model.layers.0.mlp"
    assert exact_pattern_key("vision.model.layers.0.mlp", names) == "vision.model.layers.0.mlp"
    assert exact_pattern_key("model.layers.1.mlp", names) == "model.layers.1.mlp"
