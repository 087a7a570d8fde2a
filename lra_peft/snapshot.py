"""Read an LRA adapter's factors from a saved folder or from a live `PeftModel`, without needing the base weights.

A saved LRA adapter holds, per adapted module `<path>` (relative to the base model), the tensors
`base_model.model.<path>.lra_U` (out × r), `.lra_lambda` (r), `.lra_V` (in × r) and, for `"principal"`/`"minor"`
initialisation, `.lra_U0`, `.lra_lambda0`, `.lra_V0` (ΔW₀'s factors). Relative to the original base weight the
adapter adds

    ΔW = s · U · diag(λ) · Vᵀ − s · U₀ · diag(λ₀) · V₀ᵀ        (s = lra_alpha / r of that module)

in the out × in "matrix view" of the layer (see `LRALayer._to_matrix`).
"""

from __future__ import annotations

import importlib
import json
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
import transformers
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from torch import nn
from transformers import AutoConfig

from ._peft_type import LRA_PEFT_TYPE_NAME
from .config import LRAConfig
from .format import (
    CONFIG_NAME,
    KEY_PREFIX,
    METRICS_NAME,
    SAFETENSORS_WEIGHTS_NAME,
    TASKS,
    layer_type,
    matrix_dims,
    module_rank_alpha,
    split_factor_key,
)
from .layer import LRALayer
from .safety import find_weights_file, load_weights_file, not_a_file_error, read_config_file  # loading's errors

ModelOrDir = Union[str, os.PathLike, nn.Module]


@dataclass
class LayerFactors:
    """The factors of one adapted module. Matrix view: U is out × r, lam is r, V is in × r (as in `LRALayer`)."""

    name: str
    U: torch.Tensor
    lam: torch.Tensor
    V: torch.Tensor
    scaling: float
    U0: Optional[torch.Tensor] = None
    lam0: Optional[torch.Tensor] = None
    V0: Optional[torch.Tensor] = None
    # What the base module is: "linear", "conv1d", "embedding", "conv2d", or None when unknown (no base config).
    kind: Optional[str] = None
    # Native base weight shape, and the attributes an exact LoRA copy depends on.
    weight_shape: Optional[tuple[int, ...]] = None
    dilation: Optional[tuple[int, ...]] = None
    groups: int = 1
    max_norm: Optional[float] = None

    @property
    def out_features(self) -> int:
        return self.U.shape[0]

    @property
    def in_features(self) -> int:
        return self.V.shape[0]

    @property
    def r(self) -> int:
        return self.lam.numel()

    @property
    def has_init(self) -> bool:
        """True for SVD-initialised adapters (principal, minor, corda, gradient), whose ΔW₀ must be subtracted to get the residual-free delta."""
        return self.U0 is not None

    def rank(self, tol: float = 0.0) -> int:
        """The number of entries of λ with |λ| > tol (pruned entries are exactly zero)."""
        return int((self.lam.detach().abs() > tol).sum())

    def residual_free_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(B, A)` in float32 with `B @ A` = the delta relative to the original base weight (out × in).

        B = [s·U·diag(λ) | −s·U₀·diag(λ₀)] (out × k), A = [V | V₀]ᵀ (k × in). Columns whose λ is exactly zero are
        dropped (they add nothing), keeping at least one so that the result is a valid rank ≥ 1 factorisation.
        """
        parts_b, parts_a = [], []
        for U, lam, V, sign in ((self.U, self.lam, self.V, 1.0), (self.U0, self.lam0, self.V0, -1.0)):
            if U is None:
                continue
            U, lam, V = U.detach().float(), lam.detach().float(), V.detach().float()
            keep = lam != 0
            parts_b.append(U[:, keep] * (sign * self.scaling * lam[keep]))
            parts_a.append(V[:, keep].T)
        B = torch.cat(parts_b, dim=1)
        A = torch.cat(parts_a, dim=0)
        if B.shape[1] == 0:
            B = torch.zeros(self.out_features, 1)
            A = torch.zeros(1, self.in_features)
        return B.contiguous(), A.contiguous()

    def delta(self) -> torch.Tensor:
        """The residual-free ΔW (out × in, float32)."""
        B, A = self.residual_free_factors()
        return B @ A

    def num_trainable(self) -> int:
        return self.U.numel() + self.lam.numel() + self.V.numel()


@dataclass
class AdapterSnapshot:
    """An LRA adapter as data: its config, per-module factors, and the other saved tensors."""

    config: LRAConfig
    layers: dict[str, LayerFactors]
    # Every other tensor of the adapter file (modules_to_save, biases, saved embeddings), keyed as in the file.
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    auto_mapping: Optional[dict] = None
    source_dir: Optional[Path] = None
    weights_file: Optional[Path] = None
    adapter_name: str = "default"

    @property
    def base_model_name_or_path(self) -> Optional[str]:
        return self.config.base_model_name_or_path

    @property
    def kinds_known(self) -> bool:
        return all(layer.kind is not None for layer in self.layers.values())

    def file_size(self) -> Optional[int]:
        return self.weights_file.stat().st_size if self.weights_file is not None else None

    def num_trainable(self) -> int:
        """U, λ, V of every layer plus the other saved trainable tensors (modules_to_save, trained biases)."""
        factors = sum(layer.num_trainable() for layer in self.layers.values())
        return factors + sum(t.numel() for t in self.extra.values())

    def non_finite(self) -> list[str]:
        """`<module>.<factor>` of every LRA factor (U, λ, V and ΔW₀'s) that holds a NaN or ±Inf."""
        bad = []
        for name, layer in self.layers.items():
            for factor, tensor in (("lra_U", layer.U), ("lra_lambda", layer.lam), ("lra_V", layer.V),
                                   ("lra_U0", layer.U0), ("lra_lambda0", layer.lam0), ("lra_V0", layer.V0)):
                if tensor is not None and tensor.is_floating_point() and not torch.isfinite(tensor).all():
                    bad.append(f"{name}.{factor}")
        return bad

    def check_finite(self) -> None:
        """Raise the ValueError that loading gives (naming the file and the layers) if any factor is not finite."""
        bad = self.non_finite()
        if bad:
            where = f"{self.weights_file}: " if self.weights_file is not None else ""
            more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
            raise ValueError(
                f"{where}The LRA adapter {self.adapter_name!r} holds NaN or Inf values in {', '.join(bad[:5])}{more}; "
                "it is broken (often saved from a diverged training run). Nothing was written."
            )

    def resolve_kinds(self, base: Optional[ModelOrDir] = None) -> bool:
        """Fill in each layer's base module kind from `base` (a model, or a local folder / cached Hub id whose
        config.json is read; the weights are never loaded). Returns False when no base config is available."""
        if self.kinds_known:
            return True
        model = base if isinstance(base, nn.Module) else skeleton_model(self, base)
        if model is None:
            return False
        describe_layers(self.layers, model, base_desc=_base_desc(base, self))
        return True


# --------------------------------------------------------------------------------------------------- loading
def load_snapshot(model_or_dir: ModelOrDir, adapter_name: str = "default") -> AdapterSnapshot:
    """Read an LRA adapter from a saved folder, or from a `PeftModel` (the adapter `adapter_name`)."""
    if isinstance(model_or_dir, (str, os.PathLike)):
        return snapshot_from_dir(model_or_dir)
    if isinstance(model_or_dir, nn.Module):
        return snapshot_from_model(model_or_dir, adapter_name)
    raise TypeError(
        f"expected a PeftModel with an LRA adapter or the path of a saved adapter folder, got "
        f"{type(model_or_dir).__name__}"
    )


def read_adapter_config(adapter_dir: Union[str, os.PathLike]) -> dict:
    """adapter_config.json of `adapter_dir` as a dict, with clear errors for a missing folder or file."""
    path = Path(adapter_dir).expanduser()
    if not path.exists():
        if path.is_symlink():
            raise FileNotFoundError(f"adapter folder {str(path)!r} is a symbolic link to {os.readlink(path)}, which "
                                    "does not exist (a broken link)")
        raise FileNotFoundError(f"adapter folder {str(path)!r} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"{str(path)!r} is a file; pass the adapter folder that holds {CONFIG_NAME}")
    config_file = path / CONFIG_NAME
    problem = not_a_file_error(config_file)
    if problem is not None:
        raise problem
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} has no {CONFIG_NAME}, so it is not a saved PEFT adapter (save one with "
            "PeftModel.save_pretrained)"
        )
    return read_config_file(config_file)


def snapshot_from_dir(adapter_dir: Union[str, os.PathLike]) -> AdapterSnapshot:
    path = Path(adapter_dir).expanduser()
    raw = read_adapter_config(path)
    peft_type = raw.get("peft_type")
    if peft_type != LRA_PEFT_TYPE_NAME:
        raise ValueError(
            f"{str(path)!r} holds a {peft_type} adapter, not an LRA adapter (its adapter_config.json has "
            f"peft_type={peft_type!r}); this works on adapters saved from an LRA model"
        )
    config = LRAConfig.from_pretrained(str(path))
    weights_file = find_weights_file(path)
    if weights_file is None:
        raise not_a_file_error(path / SAFETENSORS_WEIGHTS_NAME) or FileNotFoundError(
            f"{str(path)!r} has {CONFIG_NAME} but no {SAFETENSORS_WEIGHTS_NAME}")
    # Safetensors only, with a clear error for a damaged file; a pickle .bin needs LRA_PEFT_ALLOW_BIN=1.
    state = load_weights_file(weights_file)
    layers, extra = _split_state_dict(state, str(path))
    for layer in layers.values():
        layer.scaling = layer_scaling(config, layer.name)
    return AdapterSnapshot(
        config=config,
        layers=layers,
        extra=extra,
        auto_mapping=raw.get("auto_mapping"),
        source_dir=path,
        weights_file=weights_file,
    )


def snapshot_from_model(model: nn.Module, adapter_name: str = "default") -> AdapterSnapshot:
    if not isinstance(model, PeftModel):
        raise TypeError(
            f"expected a PeftModel (from get_peft_model or PeftModel.from_pretrained), got {type(model).__name__}"
        )
    if adapter_name not in model.peft_config:
        raise ValueError(f"the model has no adapter {adapter_name!r}; its adapters are {sorted(model.peft_config)}")
    config = model.peft_config[adapter_name]
    if not isinstance(config, LRAConfig):
        raise ValueError(f"adapter {adapter_name!r} is a {config.peft_type} adapter, not an LRA adapter")
    # save_embedding_layers=False: what the adapter itself holds, and no Hub look-up for the base config.
    state = get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)
    state = {k: v.detach() for k, v in state.items()}
    layers, extra = _split_state_dict(state, f"adapter {adapter_name!r}")
    base = model.get_base_model()
    describe_layers(layers, base, base_desc="the model")
    for name, layer in layers.items():
        module = base.get_submodule(name)
        if isinstance(module, LRALayer):
            layer.scaling = float(module.scaling[adapter_name])
    auto_mapping = None
    if config.task_type is None:
        cls = model._get_base_model_class(is_prompt_tuning=False)
        auto_mapping = {"base_model_class": cls.__name__, "parent_library": cls.__module__}
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = getattr(base, "name_or_path", None) or None
    return AdapterSnapshot(
        config=config, layers=layers, extra=extra, auto_mapping=auto_mapping, adapter_name=adapter_name
    )


def _split_state_dict(
    state: dict[str, torch.Tensor], where: str
) -> tuple[dict[str, LayerFactors], dict[str, torch.Tensor]]:
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    extra = {}
    for key, tensor in state.items():
        parsed = split_factor_key(key)
        if parsed is None or not parsed[0].startswith(KEY_PREFIX) or len(parsed[0]) == len(KEY_PREFIX):
            extra[key] = tensor
            continue
        module, factor = parsed
        grouped.setdefault(module[len(KEY_PREFIX):], {})[factor] = tensor
    if not grouped:
        raise ValueError(f"{where} holds no LRA factors (no '*.lra_U' / '*.lra_lambda' / '*.lra_V' tensors)")
    layers = {}
    for name, factors in sorted(grouped.items()):
        missing = [f for f in ("lra_U", "lra_lambda", "lra_V") if f not in factors]
        init = [f for f in ("lra_U0", "lra_lambda0", "lra_V0") if f in factors]
        if missing or len(init) not in (0, 3):
            lacking = ", ".join(missing) or "some of lra_U0/lra_lambda0/lra_V0"
            raise ValueError(f"{where}: module {name!r} lacks {lacking}")
        U, lam, V = factors["lra_U"], factors["lra_lambda"].reshape(-1), factors["lra_V"]
        if U.dim() != 2 or V.dim() != 2 or U.shape[1] != lam.numel() or V.shape[1] != lam.numel():
            raise ValueError(
                f"{where}: module {name!r} has inconsistent factor shapes U {tuple(U.shape)}, λ {tuple(lam.shape)}, "
                f"V {tuple(V.shape)} (expected out×r, r, in×r)"
            )
        layer = LayerFactors(name=name, U=U, lam=lam, V=V, scaling=1.0)
        if init:
            U0, lam0, V0 = factors["lra_U0"], factors["lra_lambda0"].reshape(-1), factors["lra_V0"]
            if U0.shape[0] != U.shape[0] or V0.shape[0] != V.shape[0] or U0.shape[1] != lam0.numel() != V0.shape[1]:
                raise ValueError(f"{where}: module {name!r} has ΔW₀ factors that do not match its U and V")
            layer.U0, layer.lam0, layer.V0 = U0, lam0, V0
        layers[name] = layer
    return layers, extra


def head_num_labels(snapshot: AdapterSnapshot) -> Optional[int]:
    """The number of labels of the classification head saved with the adapter (`modules_to_save`), if any: the base
    model has to be built with that many to load the adapter."""
    if str(snapshot.config.task_type) not in ("SEQ_CLS", "TOKEN_CLS"):
        return None
    for head in snapshot.config.modules_to_save or []:
        for suffix in (f"{head}.weight", f"{head}.out_proj.weight"):
            tensor = snapshot.extra.get(f"{KEY_PREFIX}{suffix}")
            if tensor is not None and tensor.dim() == 2:
                return int(tensor.shape[0])
    return None


def layer_scaling(config: LRAConfig, name: str) -> float:
    """s = lra_alpha / r of module `name`, resolved from rank_pattern / alpha_pattern exactly as `LRAModel` does."""
    r, alpha = module_rank_alpha(config, name)
    return float(alpha) / float(r)


# ----------------------------------------------------------------------------------------------- base models
def base_model_class(snapshot: AdapterSnapshot) -> type:
    """The transformers class that `AutoPeftModel*` would load this adapter's base model with."""
    task_type = snapshot.config.task_type
    if task_type is not None and str(task_type) in TASKS:
        return getattr(transformers, TASKS[str(task_type)].auto_class)
    mapping = snapshot.auto_mapping or {}
    library = mapping.get("parent_library", "")
    if library == "transformers" or library.startswith("transformers."):
        module = importlib.import_module(library)
        cls = getattr(module, mapping.get("base_model_class", ""), None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def skeleton_model(snapshot: AdapterSnapshot, base: Optional[Union[str, os.PathLike]] = None) -> Optional[nn.Module]:
    """The base model's module tree on the meta device (no weights), from a local config.json; None if unavailable."""
    base_id = str(base) if base is not None else snapshot.base_model_name_or_path
    if not base_id:
        return None
    try:
        # local_files_only: a local folder or the Hugging Face cache; never the network.
        model_config = AutoConfig.from_pretrained(base_id, revision=snapshot.config.revision, local_files_only=True)
    except (OSError, ValueError):
        return None
    cls = base_model_class(snapshot)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if hasattr(cls, "from_config"):
            return cls.from_config(model_config)
        return cls(model_config)


def describe_layers(layers: dict[str, LayerFactors], model: nn.Module, base_desc: str) -> None:
    """Set each layer's `kind` (and conv/embedding attributes) from `model`'s modules; check the shapes agree."""
    for name, layer in layers.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"{base_desc} has no module {name!r}, which the adapter adapts: the adapter was trained on a "
                "different base model"
            ) from None
        if isinstance(module, LRALayer):
            module = module.get_base_layer()
        kind, in_features, out_features = module_kind(module, name)
        if (out_features, in_features) != (layer.out_features, layer.in_features):
            raise ValueError(
                f"module {name!r} of {base_desc} maps {in_features} -> {out_features} features but the adapter's "
                f"factors are for {layer.in_features} -> {layer.out_features}: the adapter was trained on a "
                "different base model"
            )
        layer.kind = kind
        weight = getattr(module, "weight", None)
        layer.weight_shape = tuple(weight.shape) if weight is not None else None
        if kind == "conv2d":
            layer.dilation, layer.groups = tuple(module.dilation), module.groups
        if kind == "embedding":
            layer.max_norm = module.max_norm


def module_kind(module: nn.Module, name: str) -> tuple[str, int, int]:
    """`(kind, in_features, out_features)` of a base module in LRA's matrix view (`format.layer_type`,
    `format.matrix_dims`)."""
    kind = layer_type(module)
    if kind is None:
        raise ValueError(f"module {name!r} is a {type(module).__name__}, which LRA does not adapt")
    in_features, out_features = matrix_dims(module, kind)
    return kind, in_features, out_features


def _base_desc(base: Optional[ModelOrDir], snapshot: AdapterSnapshot) -> str:
    if isinstance(base, nn.Module):
        return f"the base model ({type(base).__name__})"
    return f"base model {str(base or snapshot.base_model_name_or_path)!r}"


def read_metrics(folders: Iterable[Optional[Union[str, os.PathLike]]]) -> Optional[dict[str, Any]]:
    """The first readable metrics.json (a JSON object) among `folders`, or None."""
    for folder in folders:
        if folder is None:
            continue
        path = Path(folder) / METRICS_NAME
        if path.is_file():
            try:
                metrics = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if isinstance(metrics, dict):
                return metrics
    return None
