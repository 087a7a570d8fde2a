"""The orthogonality regulariser ‖UᵀU − I‖²_F + ‖VᵀV − I‖²_F, averaged over adapted layers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import nn

from .layer import LRALayer


def _gram_error(factor: torch.Tensor) -> torch.Tensor:
    gram = factor.T @ factor
    identity = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return (gram - identity).pow(2).sum()


def orthogonal_loss(model: nn.Module, adapter_names: Optional[Sequence[str]] = None) -> torch.Tensor:
    """Unweighted orthogonality regulariser of an LRA model, for custom training loops.

    Returns the mean over adapted (layer, adapter) pairs of ‖UᵀU − I‖²_F + ‖VᵀV − I‖²_F, differentiable with respect
    to U and V. `adapter_names` defaults to each layer's active adapters.
    """
    total: Optional[torch.Tensor] = None
    count = 0
    for module in model.modules():
        if not isinstance(module, LRALayer):
            continue
        names = module.active_adapters if adapter_names is None else adapter_names
        for name in names:
            if name not in module.lra_U:
                continue
            term = _gram_error(module.lra_U[name]) + _gram_error(module.lra_V[name])
            total = term if total is None else total + term
            count += 1
    if total is None:
        raise ValueError("orthogonal_loss: the model has no LRA layers for the requested adapters.")
    return total / count
