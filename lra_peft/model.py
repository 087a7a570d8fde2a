"""`LRAModel`: injects LRA layers into a model, as PEFT's `LoraModel` does for LoRA."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import (
    BaseTuner,
    BaseTunerLayer,
    _maybe_include_all_linear_layers,
)
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, resolve_quantization_backend
from peft.utils.error import NoMatchingPeftModuleError
from peft.utils.quantization_utils import ForwardOnlyQuantizationBackend
from peft.utils.save_and_load import _peft_key_to_original_key
from torch import nn

from .allocation import RankAllocator, check_not_loading_cut_into_full_rank, cut_adapter_state_dict
from .calibration import calibration_stats, release_calibration
from .config import LRAConfig
from .format import (
    FACTORS,
    INIT_FACTORS,
    KEY_PREFIX,
    is_factor_key,
    layer_type,
    matrix_dims,
    module_rank_alpha,
    split_factor_key,
)
from .layer import Conv2d, Embedding, Linear, LRALayer
from .quantization import is_bnb_backend
from .regularization import orthogonal_loss
from .safety import AdapterContentError, checkpoint_shapes

SUPPORTED_LAYERS = "torch.nn.Linear, transformers' Conv1D, torch.nn.Embedding, torch.nn.Conv2d and bitsandbytes Linear8bitLt/Linear4bit"


def _header_mismatches(
    shapes: dict[str, tuple[int, ...]], key: str, r: int, in_features: int, out_features: int
) -> list[str]:
    """The factors of layer `key` whose shape in a checkpoint header (`shapes`) differs from what the layer will be
    built with (U: out × r, λ: r, V: in × r; ΔW₀'s rank is the checkpoint's own), as the load-time check words them."""
    prefix = f"{KEY_PREFIX}{key}."
    expected = {"lra_U": (out_features, r), "lra_lambda": (r,), "lra_V": (in_features, r),
                "lra_U0": (out_features, r), "lra_lambda0": (r,), "lra_V0": (in_features, r)}
    wrong = []
    for factor, want in expected.items():
        found = shapes.get(prefix + factor)
        if found is None:
            continue  # missing factors are reported after loading, with the others (see _check_checkpoint_factors)
        fits = len(found) == len(want) and (found[:-1] == want[:-1] if factor.endswith("0") else found == want)
        if not fits:
            wrong.append(f"{key}.{factor}: {found} in the checkpoint, {want} in the model")
    return wrong


def _shape_error(adapter_name: str, config: LRAConfig, wrong_shape: list[str]) -> ValueError:
    more = f" (and {len(wrong_shape) - 5} more)" if len(wrong_shape) > 5 else ""
    return ValueError(
        f"The LRA adapter {adapter_name!r} does not fit this model: {'; '.join(wrong_shape[:5])}{more}. It was "
        f"saved from a model with other layer sizes (base_model_name_or_path="
        f"{config.base_model_name_or_path!r}) or its adapter_config.json was edited; load it onto the base "
        "model it was trained on. Nothing was loaded."
    )


def _same_factors(layer: LRALayer, adapter_name: str, factors: dict[str, torch.Tensor]) -> bool:
    """Whether the checkpoint's ΔW₀ factors (attribute name -> tensor) are exactly the layer's current ones."""
    for attr, tensor in factors.items():
        current = getattr(layer, attr)[adapter_name]
        if current.shape != tensor.shape or not torch.equal(current, tensor.to(current)):
            return False
    return True


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
        # Validate every target before changing any: a bad target found half-way would otherwise leave earlier layers
        # replaced (and, for principal init, their weights rewritten).
        self._validate_targets(model, adapter_name)
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        except NoMatchingPeftModuleError as exc:
            raise self._no_match_error(model, adapter_name) from exc
        except Exception:
            self._remove_partial_adapter(model, adapter_name)
            raise
        if self.peft_config[adapter_name].needs_calibration:
            release_calibration(model)  # consumed: U₀, λ₀, V₀ now hold what the adapter needs

    def _matched_targets(self, model: nn.Module, adapter_name: str) -> list[tuple[str, nn.Module]]:
        config = copy.deepcopy(self.peft_config[adapter_name])
        config = self._prepare_adapter_config(config, self.get_model_config(model))
        config = _maybe_include_all_linear_layers(config, model)
        matched = []
        for key, module in model.named_modules():
            if not key or ".base_layer" in key or ".lra_" in key:
                continue
            if self._check_target_module_exists(config, key):
                matched.append((key, module))
        return matched

    def _validate_targets(self, model: nn.Module, adapter_name: str) -> None:
        config = self.peft_config[adapter_name]
        # Compared before any layer is built: an edited r (say 10⁶) would otherwise allocate r-sized factors first.
        shapes = checkpoint_shapes() if config._from_checkpoint else None
        wrong_shape: list[str] = []
        owners_of_weight: dict[int, list[str]] = {}
        if config.decomposes_base and not config._from_checkpoint:
            for name, mod in model.named_modules():
                weight = getattr(mod, "weight", None)
                if isinstance(weight, torch.Tensor) and not isinstance(mod, BaseTunerLayer):
                    owners_of_weight.setdefault(id(weight), []).append(name)
        for key, module in self._matched_targets(model, adapter_name):
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            if isinstance(module, BaseTunerLayer) and not isinstance(module, LRALayer):
                continue  # another method's layer: PEFT reports that itself
            kind = layer_type(base)
            if kind is None:
                if isinstance(module, (nn.ModuleList, nn.ModuleDict, nn.Sequential)) or not list(
                    base.parameters(recurse=False)
                ):
                    continue  # containers are skipped by PEFT's own matching for non-leaf regexes
                raise ValueError(
                    f"Target module {key} ({type(base).__name__}) is not supported by LRA. Supported: "
                    f"{SUPPORTED_LAYERS}. Narrow LRAConfig.target_modules so that it does not match this module."
                )
            if config.needs_calibration and calibration_stats(base, config.init_weights) is None:
                raise ValueError(
                    f"LRAConfig.init_weights={config.init_weights!r} needs task statistics on {key}, and it has none: "
                    "call lra_peft.preprocess(model, config, run_model) with this config before get_peft_model "
                    "(each get_peft_model / add_adapter consumes them)."
                )
            if kind == "conv2d" and base.groups != 1:
                raise ValueError(
                    f"Target module {key} is a Conv2d with groups={base.groups}; LRA supports groups=1 only. "
                    "Exclude it via LRAConfig.exclude_modules."
                )
            r, _ = module_rank_alpha(config, key)
            in_features, out_features = matrix_dims(base, kind)
            if shapes is not None:
                wrong_shape += _header_mismatches(shapes, key, r, in_features, out_features)
            if config.decomposes_base and not config._from_checkpoint:
                # The base layer of an already adapted module (`key.base_layer`) is that module itself, not a tie.
                sharing = [n for n in owners_of_weight.get(id(getattr(base, "weight", None)), [])
                           if n != key and not n.startswith(f"{key}.base_layer")]
                if sharing:
                    # Turning W into the residual would silently change every module that shares (ties) W.
                    raise ValueError(
                        f"LRAConfig.init_weights={config.init_weights!r} cannot decompose {key}: its weight is shared "
                        f"with {', '.join(sharing)} (tied weights), which would change too. Untie them (e.g. "
                        "tie_word_embeddings=False when loading the model), exclude the module, or use "
                        "init_weights=True."
                    )
                backend = resolve_quantization_backend(base)
                if isinstance(backend, ForwardOnlyQuantizationBackend):
                    raise ValueError(
                        f"LRAConfig.init_weights={config.init_weights!r} cannot decompose {key}: it is a "
                        f"{backend.backend_name} quantized layer whose weight cannot be dequantized. Use "
                        "init_weights=True, exclude the layer via exclude_modules, or load the base unquantized."
                    )
                if r > min(in_features, out_features):
                    raise ValueError(
                        f"LRAConfig.r={r} exceeds the rank of {key} ({out_features}x{in_features}), so "
                        f"init_weights={config.init_weights!r} has no {r} singular triplets to take. Lower r or set "
                        "a smaller rank for this module in rank_pattern."
                    )
        if wrong_shape:
            raise _shape_error(adapter_name, config, wrong_shape)

    def _no_match_error(self, model: nn.Module, adapter_name: str) -> ValueError:
        config = self.peft_config[adapter_name]
        names = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if layer_type(m) is not None})
        return ValueError(
            f"LRAConfig.target_modules={config.target_modules!r} matched no module of the model. Module names that "
            f"LRA can adapt here include: {', '.join(names[:20]) or '(none)'}. Pass some of these (or 'all-linear')."
        )

    def _remove_partial_adapter(self, model: nn.Module, adapter_name: str) -> None:
        """Undo a failed injection: drop the adapter from every layer, unwrap layers left with no adapter."""
        for key, module in list(model.named_modules()):
            if not isinstance(module, LRALayer) or adapter_name not in module.lra_U:
                continue
            module.delete_adapter(adapter_name)
            if not module.lra_U:
                parent_key, _, child = key.rpartition(".")
                parent = model.get_submodule(parent_key) if parent_key else model
                setattr(parent, child, module.get_base_layer())

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
        r, alpha = module_rank_alpha(config, current_key)
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
        kind = layer_type(base)
        if kind == "embedding":
            return Embedding(target, adapter_name, r, alpha, config)
        if kind == "conv2d":
            return Conv2d(target, adapter_name, r, alpha, config)
        if kind == "conv1d":
            if not config.fan_in_fan_out:
                warnings.warn(f"{key} is a Conv1D, which stores its weight as (in, out): setting fan_in_fan_out=True.", stacklevel=2)
                config.fan_in_fan_out = True
            return Linear(target, adapter_name, r, alpha, config, fan_in_fan_out=True)
        if kind == "linear":
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

    def _check_no_tied_merge(self, adapter_names: Optional[list[str]]) -> None:
        """Raise a ValueError, changing nothing, if merging would write into a weight another module shares.

        GPT-2's lm_head shares wte's weight: merging an adapter of wte would silently move the logits too.
        """
        layers = [(name, m) for name, m in self.model.named_modules() if isinstance(m, LRALayer)]
        wrapped = {id(m.get_base_layer()) for _, m in layers}
        owners: dict[int, list[str]] = {}
        for name, module in self.model.named_modules():
            weight = module._parameters.get("weight")  # own parameters only: tuner layers forward `.weight`
            if weight is not None and id(module) not in wrapped:
                owners.setdefault(id(weight), []).append(name)
        for name, layer in layers:
            sharing = owners.get(id(layer.get_base_layer().weight))
            if not sharing:
                continue
            names = adapter_names if adapter_names is not None else layer.active_adapters
            merging = [a for a in names if a in layer.lra_U and a not in layer.merged_adapters]
            if any(layer.get_delta_weight(a).any() for a in merging):
                raise ValueError(
                    f"Merging adapter(s) {merging} into {name} would also change {', '.join(sharing)}, which shares "
                    "(ties) its weight. Nothing was merged. Untie them first (load the model with "
                    "tie_word_embeddings=False and copy the weight into the output layer), or use "
                    "lra_peft.export_merged, which unties adapted weights before merging."
                )

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        self._check_no_tied_merge(adapter_names)
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
        if merge:
            self._check_no_tied_merge(adapter_names)
        if merge and safe_merge:
            for layer in self._lra_layers():
                layer.check_merge(adapter_names, unload=True)
        return super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )

    @staticmethod
    def _check_checkpoint_factors(
        modules: dict[str, nn.Module], config: LRAConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> None:
        """Raise a ValueError naming each layer whose checkpoint factors do not fit the model or are not finite."""
        wrong_shape, not_finite, extra, wrong_type, seen = [], [], [], [], set()
        for key, tensor in state_dict.items():
            parsed = split_factor_key(key, adapter_name)
            layer = None
            if parsed is not None:
                name, factor = parsed
                layer = modules.get(name, modules.get(name.removeprefix(KEY_PREFIX)))
            if layer is None or not isinstance(layer, LRALayer) or adapter_name not in getattr(layer, factor):
                if is_factor_key(key):
                    # PEFT maps only keys the model has: a factor of a layer (or kind) the adapter lacks is left over.
                    extra.append(key.removesuffix(f".{adapter_name}").removeprefix(KEY_PREFIX))
                continue
            short = name.removeprefix(KEY_PREFIX)
            seen.add((id(layer), factor))
            if not tensor.is_floating_point():
                # load_state_dict would cast an int or bool λ silently: not what was trained.
                wrong_type.append(f"{short}.{factor} ({str(tensor.dtype).removeprefix('torch.')})")
                continue
            expected, found = tuple(getattr(layer, factor)[adapter_name].shape), tuple(tensor.shape)
            # ΔW₀'s rank is the checkpoint's own (see below); only its out/in sizes must match.
            fits = found[:-1] == expected[:-1] if factor in ("lra_U0", "lra_V0") else found == expected
            if factor == "lra_lambda0":
                fits = tensor.dim() == 1
            if not fits:
                wrong_shape.append(f"{short}.{factor}: {found} in the checkpoint, {expected} in the model")
            elif tensor.is_floating_point() and not torch.isfinite(tensor).all():
                not_finite.append(f"{short}.{factor}")
        missing = []
        for name, layer in modules.items():
            if isinstance(layer, LRALayer) and adapter_name in layer.lra_U:
                factors = FACTORS + (INIT_FACTORS if adapter_name in layer.lra_U0 else ())
                missing += [f"{name.removeprefix(KEY_PREFIX)}.{f}" for f in factors
                            if (id(layer), f) not in seen]
        if missing or extra or wrong_type:
            problems = [f"{label}: {', '.join(keys[:4])}{f' (and {len(keys) - 4} more)' if len(keys) > 4 else ''}"
                        for label, keys in (("missing", missing), ("not in this adapter's layers", extra),
                                            ("not floating point", wrong_type)) if keys]
            raise AdapterContentError(
                f"The LRA adapter {adapter_name!r} does not hold the tensors its adapter_config.json describes "
                f"({'; '.join(problems)}). The file is damaged or was edited, or the config belongs to another "
                "adapter; save or download the adapter again. Nothing was loaded."
            )
        if wrong_shape:
            raise _shape_error(adapter_name, config, wrong_shape)
        if not_finite:
            raise ValueError(
                f"The LRA adapter {adapter_name!r} holds NaN or Inf values in {', '.join(not_finite[:5])}; it is "
                "broken (often saved from a diverged training run). Nothing was loaded."
            )

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: LRAConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        modules = dict(model.named_modules())
        check_not_loading_cut_into_full_rank(modules, config, adapter_name, remapped)
        # Check before anything below, or load_state_dict (which copies what fits, then reports the rest), changes it.
        cls._check_checkpoint_factors(modules, config, adapter_name, remapped)
        incoming: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in remapped.items():
            parsed = split_factor_key(key, adapter_name)
            if parsed and parsed[1] in INIT_FACTORS and isinstance(modules.get(parsed[0]), LRALayer):
                incoming.setdefault(parsed[0], {})[parsed[1]] = tensor
        for layer_name, factors in incoming.items():
            layer: LRALayer = modules[layer_name]
            if layer.residual_owner == adapter_name and not _same_factors(layer, adapter_name, factors):
                # The adapter was just initialised by an SVD (a config not read from a checkpoint): put W back, so
                # that the checkpoint's own ΔW₀, loaded next, is what the forward subtracts. When the checkpoint's
                # ΔW₀ is the one already subtracted (resuming the same run), the residual base stays as it is.
                layer.release_residual()
            for attr, tensor in factors.items():
                buffers = getattr(layer, attr)
                current = buffers[adapter_name]
                if current.shape != tensor.shape:
                    # ΔW₀'s rank is the checkpoint's: it can differ from r (adaptive rank cuts U, λ, V, not ΔW₀).
                    buffers[adapter_name] = torch.zeros(tensor.shape, dtype=current.dtype, device=current.device)
        return remapped

    # ----------------------------------------------------------------------------------- adaptive rank allocation
    def _rank_allocators(self) -> dict[str, RankAllocator]:
        # Kept in __dict__ directly: BaseTuner.__getattr__ would forward a missing attribute to the wrapped model.
        return self.__dict__.setdefault("_lra_rank_allocators", {})

    def _allocating_adapters(self) -> list[str]:
        """The active, trainable adapters whose config sets `target_r`."""
        return [
            name for name in self.active_adapters
            if name in self.peft_config and self.peft_config[name].target_r is not None
            and not self.peft_config[name].inference_mode
        ]

    def update_and_allocate(self, global_step: int) -> None:
        """Update the importance of every (λᵢ, Uᵢ, Vᵢ) triplet and prune to the scheduled rank budget.

        Call it after every `optimizer.step()` and before `optimizer.zero_grad()`, with `global_step` the number of
        optimizer steps taken so far (1 after the first). It also keeps pruned λ at exactly zero, which the optimizer
        (e.g. Adam's momentum) would otherwise undo. With `transformers.Trainer`, use `lra_peft.LRARankCallback`.

        Example:
            >>> for step, batch in enumerate(loader, start=1):
            ...     accelerator.backward(model(**batch).loss)
            ...     optimizer.step()
            ...     model.update_and_allocate(step)
            ...     optimizer.zero_grad()
        """
        if isinstance(global_step, bool) or not isinstance(global_step, int) or global_step < 0:
            raise ValueError(f"update_and_allocate(global_step={global_step!r}): pass the number of optimizer steps "
                             "taken so far, an integer >= 0.")
        adapters = self._allocating_adapters()
        if not adapters:
            raise ValueError(
                f"update_and_allocate: adaptive rank allocation is off for the active adapter(s) "
                f"{list(self.active_adapters)}. Set LRAConfig.target_r (the average rank per layer to end with) and "
                "total_step to use it; an adapter loaded with is_trainable=False never allocates."
            )
        allocators = self._rank_allocators()
        for name in adapters:
            config = self.peft_config[name]
            if config.total_step is None:
                raise ValueError(
                    f"update_and_allocate: LRAConfig.total_step is None for adapter {name!r}, so the rank budget has "
                    "no schedule. Set total_step to the number of optimizer steps of training (LRARankCallback fills "
                    "it from the Trainer's max_steps)."
                )
            if name not in allocators:
                allocators[name] = RankAllocator(self.model, name, config)
            allocators[name].step(global_step)

    def allocated_ranks(self, adapter_name: Optional[str] = None) -> dict[str, int]:
        """Per adapted layer (module name): the rank of `adapter_name` (default: the active one) after allocation so
        far. Layers keep their full rank while allocation has not run."""
        adapter_name = adapter_name or self.active_adapters[0]
        allocator = self._rank_allocators().get(adapter_name)
        ranks = {name: module.r[adapter_name] for name, module in self.model.named_modules()
                 if isinstance(module, LRALayer) and adapter_name in module.r}
        if allocator is not None:
            ranks.update(allocator.ranks())
        return ranks

    def delete_adapter(self, adapter_name: str) -> None:
        self._rank_allocators().pop(adapter_name, None)
        super().delete_adapter(adapter_name)

    @classmethod
    def _get_adapter_state_dict(
        cls,
        model: nn.Module,
        config: LRAConfig,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
        unwanted_adapter_names: list[str],
    ) -> dict[str, torch.Tensor]:
        to_return = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        tuner = model.base_model if isinstance(getattr(model, "base_model", None), LRAModel) else model
        if not isinstance(tuner, LRAModel):
            return to_return
        layers = {name: m for name, m in tuner.model.named_modules() if isinstance(m, LRALayer)}
        # Allocation zeroed the pruned λ: save only the triplets left, with their ranks in rank_pattern.
        return cut_adapter_state_dict(tuner._rank_allocators().get(adapter_name), layers, config, adapter_name,
                                      to_return)


# ------------------------------------------------------------------------------------ continuing training
def restore_quantized_residual(model: nn.Module, adapter_name: str = "default") -> int:
    """Make a loaded SVD-initialised adapter (`"principal"`, `"minor"`, `"corda"`, `"gradient"`) own its quantized
    residual again, as during its training.

    A saved SVD-initialised adapter stores ΔW₀ (`lra_U0`, `lra_lambda0`, `lra_V0`). Loaded onto the quantized
    pretrained model, whose base holds Q(W), it subtracts ΔW₀ in the forward pass: Q(W) − ΔW₀ + ΔW. The model it
    was trained with held Q(W − ΔW₀) + ΔW instead. This puts Q(W − ΔW₀) back into every quantized base (from the
    checkpoint's full-precision W when the model came from `quantized_load`, which makes the result bit-identical to
    the training-time base) and makes the adapter the layer's residual owner.

    Args:
        model: A `PeftModel` (or any module) holding LRA layers with the adapter `adapter_name`.
        adapter_name: The SVD-initialised adapter to restore.

    Returns:
        The number of quantized layers whose base weight was replaced.
    """
    layers = [m for m in model.modules() if isinstance(m, LRALayer) and adapter_name in m.lra_U0]
    if not layers:
        raise ValueError(
            f"restore_quantized_residual: no LRA layer holds an SVD-initialised adapter {adapter_name!r} "
            "(init_weights 'principal', 'minor', 'corda' or 'gradient'); pass the name the adapter was loaded "
            "under."
        )
    changed = 0
    for layer in layers:
        if not is_bnb_backend(layer.quantization_backend) or layer.residual_owner == adapter_name:
            continue
        if layer.residual_owner is not None:
            raise ValueError(
                f"restore_quantized_residual: adapter {layer.residual_owner!r} already owns the residual of a layer; "
                f"delete it (or load {adapter_name!r} into a fresh model) first."
            )
        if layer.merged:
            raise ValueError("restore_quantized_residual: unmerge the adapters first (`unmerge_adapter()`).")
        layer._subtract_init_from_base(adapter_name)
        changed += 1
    return changed


# ------------------------------------------------------------------------------------- base model state dict
def init_deltas(model: nn.Module) -> dict[str, torch.Tensor]:
    """Original (pre-PEFT) weight key -> ΔW₀ in the weight's native layout, for every layer whose base holds
    the residual W − ΔW₀ of a principal/minor adapter that is not merged. Quantized bases are left out: their
    residual Q(W − ΔW₀) has no exact full-precision original to hand back."""
    inner = getattr(getattr(model, "base_model", None), "model", None)
    if not isinstance(getattr(model, "base_model", None), LRAModel) or inner is None:
        return {}
    names = {id(m): name for name, m in inner.named_modules()}
    deltas = {}
    for module in inner.modules():
        if not isinstance(module, LRALayer) or module.quantization_backend is not None:
            continue
        owner = module.residual_owner
        if owner is None or owner in module.merged_adapters:
            continue  # a merged owner's weight is W + its learned ΔW, as a merged LoRA model's
        key = _peft_key_to_original_key(model, f"{names[id(module.get_base_layer())]}.weight")
        deltas[key] = module._from_matrix(module._init_delta_matrix(owner)).detach()
    return deltas
