"""Optimizer parameter groups that let SVD-initialised LRA adapters train at LoRA's learning rates.

Adam moves every coordinate of a tensor by about the learning rate per step, whatever the tensor's scale. A
`"principal"` adapter's U and V have unit columns, and column i is multiplied by λᵢ·scaling, a singular value of W
(2–11 in MiniLM's Linear layers). So at a learning rate that suits LoRA (whose B starts at zero and meets A rows of
norm ≈ 1/√3, PEFT's Kaiming-uniform init) a principal adapter turns W's leading directions 10–20× faster than LoRA
moves W, and a fine-tuning run can collapse within its first steps (Banking77 at 2e-3: chance accuracy).

`lra_param_groups` gives each adapter's U and V the learning rate `lr · min(1, UV_GAIN / max|λ₀ᵢ · scaling|)`; λ, task
heads and everything else keep `lr`. Adapters that start with λ = 0 (`init_weights=True`) get factor 1, i.e. plain
`lr`. `create_lra_optimizer` builds the optimizer from those groups, in the manner of
`peft.optimizers.create_loraplus_optimizer`.
"""

from __future__ import annotations

import math
from typing import Any, Union

import torch
from torch import nn

from .layer import LRALayer

# The largest λ·scaling whose U and V still train at the full learning rate. 1/√3 (the row norm of PEFT's LoRA A at
# init) would match LoRA's first step, but LoRA's steps grow as B grows, and it trained NER too slowly. Chosen on the
# validation splits of the NER and intent recipes among 1/√3, 2 and 4 (docs/recipes.md): 2 was best on average.
UV_GAIN = 2.0


def uv_lr_factor(layer: LRALayer, adapter_name: str, uv_gain: float = UV_GAIN) -> float:
    """The factor on the learning rate of `layer`'s U and V for `adapter_name` (1 for adapters that start at λ = 0).

    Uses the initial λ₀ where the adapter keeps it (principal / minor), so the factor does not depend on how far
    training has moved λ (a resumed or continued run gets the same groups).
    """
    lam = layer.lra_lambda0[adapter_name] if adapter_name in layer.lra_lambda0 else layer.lra_lambda[adapter_name]
    gain = float(lam.detach().abs().max()) * abs(layer.scaling[adapter_name]) if lam.numel() else 0.0
    return min(1.0, uv_gain / gain) if gain > 0 else 1.0


def lra_param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0,
                     uv_lr_scale: Union[str, float] = "auto", uv_gain: float = UV_GAIN) -> list[dict[str, Any]]:
    """Parameter groups over `model`'s trainable parameters for a torch optimizer.

    Args:
        model: a `PeftModel` (or any module) holding LRA layers; parameters with `requires_grad=False` are left out.
        lr: the learning rate of λ and of every non-LRA trainable parameter (task heads, `modules_to_save`).
        weight_decay: applied to parameters with two or more dimensions (U, V, head weights), not to λ, biases or
            LayerNorm weights, as Transformers' examples do.
        uv_lr_scale: `"auto"` (the per-layer rule in the module docstring) or a number in (0, 1] used for every
            layer's U and V; 1.0 gives every parameter `lr`.
        uv_gain: with `"auto"`, the largest max|λ₀ᵢ·scaling| whose U and V keep the full `lr` (default `UV_GAIN`).

    Returns:
        A list of dicts with `params`, `lr` and `weight_decay`, in a deterministic order (model traversal order), so
        optimizer state saved by one run loads into another built the same way.
    """
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr={lr!r} must be a positive number")
    if uv_lr_scale != "auto" and not (isinstance(uv_lr_scale, (int, float)) and 0 < uv_lr_scale <= 1):
        raise ValueError(f'uv_lr_scale={uv_lr_scale!r} must be "auto" or a number in (0, 1]')
    if not (isinstance(uv_gain, (int, float)) and uv_gain > 0 and math.isfinite(uv_gain)):
        raise ValueError(f"uv_gain={uv_gain!r} must be a positive number")
    scaled: dict[int, float] = {}
    for module in model.modules():
        if not isinstance(module, LRALayer):
            continue
        for name in module.lra_U:
            factor = uv_lr_factor(module, name, uv_gain) if uv_lr_scale == "auto" else float(uv_lr_scale)
            for param in (module.lra_U[name], module.lra_V[name]):
                if param.requires_grad:
                    scaled[id(param)] = factor

    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        key = (lr * scaled.get(id(param), 1.0), weight_decay if param.dim() >= 2 else 0.0)
        groups.setdefault(key, []).append(param)
    return [{"params": params, "lr": group_lr, "weight_decay": decay} for (group_lr, decay), params in groups.items()]


def create_lra_optimizer(model: nn.Module, optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW, *,
                         lr: float, weight_decay: float = 0.0, uv_lr_scale: Union[str, float] = "auto",
                         uv_gain: float = UV_GAIN,
                         **kwargs: Any) -> torch.optim.Optimizer:
    """`optimizer_cls(lra_param_groups(model, lr, weight_decay, uv_lr_scale, uv_gain), lr=lr, **kwargs)`.

    With `transformers.Trainer`: `Trainer(..., optimizers=(create_lra_optimizer(model, lr=2e-3), None))`.
    """
    return optimizer_cls(lra_param_groups(model, lr, weight_decay, uv_lr_scale, uv_gain), lr=lr, **kwargs)
