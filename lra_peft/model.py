"""`LRAModel`: injects LRA layers into a model, as PEFT's `LoraModel` does for LoRA."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, resolve_quantization_backend
from peft.utils.error import NoMatchingPeftModuleError
from peft.utils.other import get_pattern_key
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import LRAConfig
from .layer import Conv2d, Embedding, Linear, LRALayer
from .regularization import orthogonal_loss

SUPPORTED_LAYERS = "torch.nn.Linear, transformers' Conv1D, torch.nn.Embedding, torch.nn.Conv2d and bitsandbytes Linear8bitLt/Linear4bit"


def _adapter_names_pre_forward_hook(target: nn.Module, args: Any, kwargs: dict, adapter_names: list[str]) -> Any:
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


class LRAModel(BaseTuner):
    """Creates an LRA model (ΔW = s · U · diag(λ) · Vᵀ per adapted layer) from a pretrained model.

    Use it through PEFT: `get_peft_model(model, LRAConfig(...))` after `import lra_peft`.

    Example:
        >>> import lra_peft
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base_model, lra_peft.LRAConfig(r=8, target_modules=["query", "value"]))
    """

    prefix: str = "lra_"
    tuner_layer_cls = LRALayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _prepare_adapter_config(self, peft_config: LRAConfig, model_config: dict) -> LRAConfig:
        if peft_config.target_modules is None:
            target_modules = self.target_module_mapping.get(model_config.get("model_type"))
            if target_modules is None:
                raise ValueError(
                    "LRAConfig.target_modules=None, and PEFT has no default targets for model type "
                    f"{model_config.get('model_type')!r}: pass target_modules, e.g. ['query', 'value'] or 'all-linear'."
                )
            peft_config.target_modules = target_modules if isinstance(target_modules, str) else set(target_modules)
        return peft_config

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        except NoMatchingPeftModuleError as exc:
            config = self.peft_config[adapter_name]
            names = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                            if isinstance(m, (nn.Linear, Conv1D, nn.Embedding, nn.Conv2d))})
            raise ValueError(
                f"LRAConfig.target_modules={config.target_modules!r} matched no module of the model. Module names "
                f"that LRA can adapt here include: {', '.join(names[:20]) or '(none)'}. Pass some of these (or "
                "'all-linear')."
            ) from exc

    def _create_and_replace(
        self,
        config: LRAConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        if current_key is None:
            raise ValueError("current_key must not be None")
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), current_key), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), current_key), config.lra_alpha)
        if isinstance(target, LRALayer):
            target.update_layer(adapter_name, r, alpha, config, inference_mode=config.inference_mode)
            return
        new_module = self._create_new_module(config, adapter_name, target, r, alpha, current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _create_new_module(
        config: LRAConfig, adapter_name: str, target: nn.Module, r: int, alpha: float, key: str
    ) -> nn.Module:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base, nn.Embedding):
            return Embedding(target, adapter_name, r, alpha, config)
        if isinstance(base, nn.Conv2d):
            return Conv2d(target, adapter_name, r, alpha, config)
        if isinstance(base, Conv1D):
            if not config.fan_in_fan_out:
                warnings.warn(f"{key} is a Conv1D, which stores its weight as (in, out): setting fan_in_fan_out=True.", stacklevel=2)
                config.fan_in_fan_out = True
            return Linear(target, adapter_name, r, alpha, config, fan_in_fan_out=True)
        backend = resolve_quantization_backend(base)
        if isinstance(base, nn.Linear) or (backend is not None and backend.layer_type == "linear"):
            if config.fan_in_fan_out:
                warnings.warn(f"{key} is a Linear, which stores its weight as (out, in): setting fan_in_fan_out=False.", stacklevel=2)
                config.fan_in_fan_out = False
            return Linear(target, adapter_name, r, alpha, config, fan_in_fan_out=False)
        raise ValueError(
            f"Target module {key} ({type(base).__name__}) is not supported by LRA. Supported: {SUPPORTED_LAYERS}. "
            "Narrow LRAConfig.target_modules so that it does not match this module."
        )

    # ---------------------------------------------------------------------------------------------- regularizer
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        outputs = self.model.forward(*args, **kwargs)
        loss = getattr(outputs, "loss", None)
        if isinstance(loss, torch.Tensor):
            weights = {self.peft_config[a].orth_reg_weight for a in self.active_adapters if a in self.peft_config}
            weight = max(weights, default=0.0)
            if weight > 0:
                outputs.loss = loss + weight * orthogonal_loss(self.model, self.active_adapters)
        return outputs

    # --------------------------------------------------------------------------------------- mixed-batch inference
    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        known = set()
        for module in self.modules():
            if isinstance(module, LRALayer):
                known |= set(module.lra_U.keys())
        unknown = {name for name in adapter_names if name != "__base__"} - known
        if unknown:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unknown))}")
        num_beams = kwargs.get("num_beams", None)
        if isinstance(num_beams, int) and num_beams > 1:
            adapter_names = [name for name in adapter_names for _ in range(num_beams)]
        handles = []
        for module in self.modules():
            if isinstance(module, LRALayer):
                hook = partial(_adapter_names_pre_forward_hook, adapter_names=adapter_names)
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    # ------------------------------------------------------------------------------------------ merging, loading
    def _lra_layers(self) -> list[LRALayer]:
        return [m for m in self.model.modules() if isinstance(m, LRALayer)]

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        if safe_merge:
            # Check every layer before touching any, so that a broken adapter leaves the whole model unchanged.
            for layer in self._lra_layers():
                layer.check_merge(adapter_names)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: Optional[list[str]] = None,
    ) -> nn.Module:
        if merge and safe_merge:
            for layer in self._lra_layers():
                layer.check_merge(adapter_names)
        return super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: LRAConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        modules = dict(model.named_modules())
        pattern = re.compile(rf"^(.*)\.(lra_U0|lra_lambda0|lra_V0)\.{re.escape(adapter_name)}$")
        for key, tensor in remapped.items():
            match = pattern.match(key)
            if not match or not isinstance(modules.get(match.group(1)), LRALayer):
                continue
            layer: LRALayer = modules[match.group(1)]
            if layer.residual_owner == adapter_name:
                # This adapter was just initialised by an SVD (its config was not read from a checkpoint): put W back,
                # so that the checkpoint's own ΔW₀, loaded next, is what gets subtracted.
                layer.release_residual()
            buffers = getattr(layer, match.group(2))
            current = buffers[adapter_name]
            if current.shape != tensor.shape:
                # ΔW₀'s rank is the checkpoint's: it can differ from r (adaptive rank cuts U, λ, V but not ΔW₀).
                buffers[adapter_name] = torch.zeros(tensor.shape, dtype=current.dtype, device=current.device)
        return remapped
