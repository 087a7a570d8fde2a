"""Helpers of the reliability tests: record a model and assert that a failed operation left it exactly as it was."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import AuxiliaryTrainingWrapper
from torch import nn


@dataclass
class ModelRecord:
    tensors: dict[str, torch.Tensor]
    requires_grad: dict[str, bool]
    module_types: list[tuple[str, type]]
    attributes: set[str]


def record(model: nn.Module) -> ModelRecord:
    """Every parameter and buffer (values), requires_grad flags, the module tree and the root's attributes."""
    return ModelRecord(
        tensors={k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        requires_grad={n: p.requires_grad for n, p in model.named_parameters()},
        module_types=[(n, type(m)) for n, m in model.named_modules()],
        attributes=set(model.__dict__),
    )


def assert_unchanged(model: nn.Module, before: ModelRecord, *, plain_base: bool = True) -> None:
    """`model` has the same tensors (bit for bit), flags, module tree and attributes as when `before` was taken."""
    after = record(model)
    assert after.module_types == before.module_types
    assert set(after.tensors) == set(before.tensors)
    for key, value in before.tensors.items():
        assert after.tensors[key].dtype == value.dtype, key
        # Bit for bit; a NaN planted by a test must still be there (NaN != NaN for torch.equal).
        torch.testing.assert_close(after.tensors[key], value, rtol=0, atol=0, equal_nan=True, msg=f"{key} changed")
    assert after.requires_grad == before.requires_grad
    assert after.attributes == before.attributes
    if plain_base:
        assert not any(isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper)) for m in model.modules())
        assert "peft_config" not in model.__dict__ and not hasattr(model, "peft_config")
