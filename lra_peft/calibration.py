"""`preprocess(model, config, run_model)`: the task statistics that `init_weights="corda"` / `"gradient"` start from.

Modelled on PEFT's `preprocess_corda` / `preprocess_loraga`: hooks on every layer that `config` targets collect, over
the batches that `run_model()` runs,

- `"corda"`: C = Σ xᵀx, the uncentred second moment of the layer's inputs (in × in; O(in²) memory per layer);
- `"gradient"`: G = Σ ∂L/∂W = Σ (∂L/∂y)ᵀ x, the gradient of the task loss with respect to the layer's weight in its
  out × in matrix view (O(out · in) memory per layer), from the backward passes that `run_model()` runs.

The statistics are kept on the layers (attribute `lra_calibration`, never in a state dict) until
`get_peft_model(model, config)` turns them into U₀, λ₀, V₀ and frees them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Optional

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer, _maybe_include_all_linear_layers, check_target_module_exists
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, resolve_quantization_backend
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import DATA_AWARE_INITS, LRAConfig

ATTRIBUTE = "lra_calibration"


@dataclass
class CalibrationStats:
    """What `preprocess` leaves on a layer: `kind` ("corda" / "gradient"), the statistic and how many tokens fed it.

    `matrix` is C (in × in) for "corda" and G (out × in, the matrix view of W) for "gradient", in float32.
    """

    kind: str
    matrix: torch.Tensor
    tokens: int = 0


def _is_linear(module: nn.Module) -> bool:
    if isinstance(module, (nn.Linear, Conv1D)):
        return True
    backend = resolve_quantization_backend(module)
    return backend is not None and backend.layer_type == "linear"


def target_layers(model: nn.Module, config: LRAConfig) -> Iterator[tuple[str, nn.Module]]:
    """(name, base layer) for every layer `get_peft_model(model, config)` would adapt (an LRA layer's own base)."""
    if isinstance(model, PeftModel):
        model = model.get_base_model()
    config = copy.deepcopy(config)
    if config.target_modules is None:
        model_config = getattr(model, "config", None)
        model_type = getattr(model_config, "model_type", None)
        targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
        if targets is None:
            raise ValueError(f"LRAConfig.target_modules=None, and PEFT has no default targets for model type "
                             f"{model_type!r}: pass target_modules.")
        config.target_modules = set(targets)
    config = _maybe_include_all_linear_layers(config, model)
    for name, module in model.named_modules():
        if not name or ".base_layer" in name or ".lra_" in name or not check_target_module_exists(config, name):
            continue
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        if list(base.parameters(recurse=False)) or isinstance(module, BaseTunerLayer):
            yield name, base


def calibration_stats(layer: nn.Module, kind: str) -> Optional[CalibrationStats]:
    """The statistics `preprocess` left on `layer` for `kind`, or None."""
    stats = getattr(layer, ATTRIBUTE, None)
    return stats if isinstance(stats, CalibrationStats) and stats.kind == kind else None


def release_calibration(model: nn.Module) -> None:
    """Free every statistic `preprocess` left on `model`'s layers."""
    for module in model.modules():
        if ATTRIBUTE in module.__dict__:
            delattr(module, ATTRIBUTE)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """tokens × features in float32 (any leading batch / sequence dimensions flattened)."""
    return t.detach().reshape(-1, t.shape[-1]).to(torch.float32)


def preprocess(model: nn.Module, config: LRAConfig, run_model: Callable[[], Any]) -> None:
    """Collect the statistics that `config.init_weights` ("corda" or "gradient") needs; call before `get_peft_model`.

    Args:
        model: the model to adapt (a plain model, or a `PeftModel` to which another adapter will be added).
        config: the `LRAConfig` that `get_peft_model(model, config)` will use; its targets are hooked.
        run_model: runs the calibration batches through `model`: forward passes for "corda" (run under
            `torch.no_grad()`), forward *and* `loss.backward()` for "gradient". Batches should come from the
            training data; a few hundred examples are enough.

    The model runs in eval mode (no dropout) and, for "gradient", with every parameter frozen, so the backward
    passes leave no `.grad` behind; training flags and `requires_grad` are restored afterwards. Nothing is stored on
    the model unless every target layer got its statistic. Memory: one in × in matrix per layer for "corda", one
    out × in matrix per layer for "gradient" (float32), freed by `get_peft_model`.
    """
    kind = config.init_weights
    if kind not in DATA_AWARE_INITS:
        raise ValueError(f"lra_peft.preprocess: LRAConfig.init_weights={kind!r} needs no statistics; it is for "
                         f"init_weights in {DATA_AWARE_INITS}.")
    if not callable(run_model):
        raise ValueError(f"lra_peft.preprocess: run_model={run_model!r} must be a function that runs the calibration "
                         "batches through the model.")
    layers = dict(target_layers(model, config))
    if not layers:
        raise ValueError(f"lra_peft.preprocess: LRAConfig.target_modules={config.target_modules!r} matched no layer "
                         "of the model.")
    unsupported = [name for name, layer in layers.items() if not _is_linear(layer)]
    if unsupported:
        raise ValueError(f"lra_peft.preprocess: init_weights={kind!r} supports Linear layers (nn.Linear, Conv1D, "
                         f"bitsandbytes) only, not {', '.join(unsupported)}; exclude them via exclude_modules.")

    stats: dict[str, CalibrationStats] = {}
    handles = []

    def corda_hook(name: str, layer: nn.Module, args: tuple, output: Any) -> None:
        x = _rows(args[0])
        entry = stats.setdefault(name, CalibrationStats(kind, torch.zeros(x.shape[1], x.shape[1], device=x.device)))
        entry.matrix.addmm_(x.T, x)
        entry.tokens += x.shape[0]

    def make_leaf(name: str, layer: nn.Module, args: tuple) -> Optional[tuple]:
        # With every parameter frozen, nothing upstream of the first targets needs a gradient: give their input one
        # so that the backward pass reaches them (an input that already requires grad is left alone).
        x = args[0]
        if torch.is_grad_enabled() and torch.is_floating_point(x) and not x.requires_grad:
            return (x.detach().requires_grad_(True), *args[1:])
        return None

    def gradient_hook(name: str, layer: nn.Module, args: tuple, output: Any) -> None:
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            return
        x = _rows(args[0])

        def accumulate(grad_output: torch.Tensor) -> None:
            g = _rows(grad_output)
            entry = stats.setdefault(name, CalibrationStats(
                kind, torch.zeros(g.shape[1], x.shape[1], device=g.device)))
            entry.matrix.addmm_(g.T, x.to(g.device))  # ∂L/∂W (out × in) = Σ_tokens (∂L/∂y)ᵀ x
            entry.tokens += x.shape[0]

        output.register_hook(accumulate)

    training = {module: module.training for module in model.modules()}
    requires_grad = {param: param.requires_grad for param in model.parameters()}
    try:
        model.eval()
        for name, layer in layers.items():
            if kind == "corda":
                handles.append(layer.register_forward_hook(lambda m, a, o, n=name: corda_hook(n, m, a, o)))
            else:
                handles.append(layer.register_forward_pre_hook(lambda m, a, n=name: make_leaf(n, m, a)))
                handles.append(layer.register_forward_hook(lambda m, a, o, n=name: gradient_hook(n, m, a, o)))
        if kind == "gradient":
            for param in requires_grad:
                param.requires_grad_(False)
            run_model()
        else:
            with torch.no_grad():
                run_model()
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in training.items():
            module.training = flag
        for param, flag in requires_grad.items():
            param.requires_grad_(flag)

    missing = [name for name in layers if name not in stats or stats[name].tokens == 0]
    if missing:
        what = ("saw no input: run_model() must run the model on the calibration batches" if kind == "corda" else
                "got no gradient: run_model() must run the model and call loss.backward() on the task loss")
        raise ValueError(f"lra_peft.preprocess: {len(missing)} target layer(s) ({', '.join(missing[:5])}) {what}. "
                         "Nothing was stored.")
    bad = [name for name, entry in stats.items() if not torch.isfinite(entry.matrix).all()]
    if bad:
        raise ValueError(f"lra_peft.preprocess: the statistics of {', '.join(bad[:5])} are not finite (NaN/Inf in the "
                         "calibration inputs or loss). Nothing was stored.")
    for name, layer in layers.items():
        setattr(layer, ATTRIBUTE, stats[name])
