"""Deploy LRA adapters: as a standard LoRA adapter, as a merged model, or re-factored to a lower rank.

LRA's ΔW = s · U · diag(λ) · Vᵀ is a LoRA product B · A with B = s · U · diag(λ) and A = Vᵀ, so a LoRA adapter with
`lora_alpha = r` (LoRA scale 1) reproduces it exactly. Adapters that own a residual (`"principal"`, `"minor"`,
`"corda"`, `"gradient"`) export their residual-free form, relative to the original base weight:
B = [s·U·diag(λ) | −s·U₀·diag(λ₀)], A = [V | V₀]ᵀ (rank 2r).
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import safetensors.torch
import torch
from peft import LoraConfig, PeftModel
from peft.utils import resolve_quantization_backend
from torch import nn
from transformers import AutoConfig

from ._io import PathLike, atomic_output_dir, same_folder, save_tokenizer
from .config import LRAConfig
from .format import KEY_PREFIX, SAFETENSORS_WEIGHTS_NAME, exact_pattern_key
from .hub import lora_export_card, write_card
from .layer import LRALayer
from .snapshot import (
    AdapterSnapshot,
    LayerFactors,
    ModelOrDir,
    base_model_class,
    describe_layers,
    head_num_labels,
    layer_scaling,
    load_snapshot,
)

LRA_TO_LORA_BIAS = {"none": "none", "all": "all", "lra_only": "lora_only"}


# --------------------------------------------------------------------------------------------------- to LoRA
def export_lora(
    model_or_adapter_dir: ModelOrDir,
    out_dir: PathLike,
    *,
    adapter_name: str = "default",
    base: Optional[Union[PathLike, nn.Module]] = None,
) -> Path:
    """Write a standard PEFT LoRA adapter (`peft_type: "LORA"`) that reproduces the LRA adapter exactly.

    Stock PEFT (and servers that load LoRA adapters: vLLM, TGI, ...) loads the result without `lra_peft`, onto the
    original base model, including for adapters trained from `"principal"`/`"minor"` initialisation.

    Args:
        model_or_adapter_dir: A `PeftModel` with an LRA adapter, or the folder of a saved LRA adapter.
        out_dir: Output folder (created; written atomically). Must not be the adapter's own folder.
        adapter_name: Which adapter of a model to export.
        base: Only for an adapter folder that adapts Embedding or Conv2d modules: the base model (or a folder with
            its config.json) when the config's `base_model_name_or_path` is neither local nor in the HF cache.

    Returns:
        The output folder.

    Example:
        >>> lra_peft.export_lora("out/adapter", "out/adapter-lora")
        >>> model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_id), "out/adapter-lora")
    """
    snapshot = load_snapshot(model_or_adapter_dir, adapter_name)
    _check_distinct(snapshot, out_dir)
    snapshot.check_finite()  # stock PEFT would load NaN factors silently
    if not snapshot.resolve_kinds(base):
        base_id = base or snapshot.base_model_name_or_path
        where = (
            f"could not read the config of base model {str(base_id)!r} (neither a local folder nor in the Hugging "
            "Face cache)" if base_id else "the adapter config records no base model"
        )
        warnings.warn(
            f"{where}, so every adapted module is written as a Linear LoRA layer. If the adapter adapts Embedding "
            "or Conv2d modules, pass base=<the base model or its local folder>.",
            stacklevel=2,
        )
    state: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for name, layer in snapshot.layers.items():
        tensors = _lora_tensors(layer)
        ranks[name] = next(iter(tensors.values())).shape[0]
        state.update(tensors)
    state.update(snapshot.extra)
    config = _lora_config(snapshot, ranks)

    with atomic_output_dir(out_dir) as tmp:
        config.save_pretrained(str(tmp), auto_mapping_dict=snapshot.auto_mapping)
        safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / "README.md").write_text(lora_export_card(snapshot, ranks))
        save_tokenizer(snapshot.source_dir, tmp)
    return Path(out_dir)


def _lora_tensors(layer: LayerFactors) -> dict[str, torch.Tensor]:
    """The LoRA tensors of one module, keyed as in a saved LoRA adapter."""
    key = f"{KEY_PREFIX}{layer.name}"
    dtype = layer.U.dtype
    if layer.kind == "embedding" and layer.max_norm is not None:
        # F.embedding renormalises the rows of A when max_norm is set: only the untouched V gives the same rows.
        if layer.has_init or layer.rank() != layer.r:
            raise ValueError(
                f"module {layer.name!r} is an Embedding with max_norm={layer.max_norm}: LoRA renormalises its A "
                "matrix, so a LoRA copy of this adapter (principal/minor or pruned) would not give the same output. "
                "Deploy it with export_merged instead."
            )
        B = (layer.U.float() * (layer.scaling * layer.lam.float())).contiguous()
        A = layer.V.float().T.contiguous()
    else:
        B, A = layer.residual_free_factors()
    k = B.shape[1]
    B, A = B.to(dtype), A.to(dtype)
    if layer.kind == "embedding":
        # LoRA's Embedding keeps raw parameters: A is r × num_embeddings, B is embedding_dim × r.
        return {f"{key}.lora_embedding_A": A.contiguous(), f"{key}.lora_embedding_B": B.contiguous()}
    if layer.kind == "conv2d":
        if layer.groups != 1 or any(d != 1 for d in layer.dilation or (1,)):
            raise ValueError(
                f"module {layer.name!r} is a Conv2d with dilation={layer.dilation}, groups={layer.groups}: LoRA's "
                "Conv2d adapter always uses dilation 1 and groups 1, so it cannot reproduce this layer's update. "
                "Deploy with export_merged, or train without this module (exclude_modules)."
            )
        out_channels, in_channels, kh, kw = layer.weight_shape
        return {
            f"{key}.lora_A.weight": A.reshape(k, in_channels, kh, kw).contiguous(),
            f"{key}.lora_B.weight": B.reshape(out_channels, k, 1, 1).contiguous(),
        }
    # Linear and Conv1D: LoRA keeps A (r × in) and B (out × r) in the out × in view for both.
    return {f"{key}.lora_A.weight": A.contiguous(), f"{key}.lora_B.weight": B.contiguous()}


def _lora_config(snapshot: AdapterSnapshot, ranks: dict[str, int]):
    config = snapshot.config
    common = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {exact_pattern_key(name, ranks): k for name, k in ranks.items() if k != common}
    kinds = {layer.kind for layer in snapshot.layers.values()}
    fan_in_fan_out = config.fan_in_fan_out if None in kinds else ("conv1d" in kinds and "linear" not in kinds)
    return LoraConfig(
        task_type=config.task_type,
        base_model_name_or_path=config.base_model_name_or_path,
        revision=config.revision,
        inference_mode=True,
        r=common,
        lora_alpha=common,  # LoRA scale 1: s is folded into B
        lora_dropout=config.lra_dropout,
        # Exact module paths: the layers that the file holds, nothing more (adaptive rank may have dropped some).
        target_modules=sorted(ranks),
        fan_in_fan_out=fan_in_fan_out,
        bias=LRA_TO_LORA_BIAS[config.bias],
        modules_to_save=copy.copy(config.modules_to_save),
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        init_lora_weights=True,
    )


# ----------------------------------------------------------------------------------------------- merged model
def export_merged(
    model_or_adapter_dir: ModelOrDir,
    out_dir: PathLike,
    base: Optional[Union[PathLike, nn.Module]] = None,
    *,
    adapter_name: str = "default",
    tokenizer: Any = None,
    safe_merge: bool = True,
) -> Path:
    """Merge the adapter into its base model and `save_pretrained` the result (safetensors), plus its tokenizer.

    Plain Transformers loads the output (`AutoModelFor*.from_pretrained(out_dir)`) and reproduces the adapter model.

    Args:
        model_or_adapter_dir: A `PeftModel` with an LRA adapter (left unchanged: a copy is merged), or the folder
            of a saved LRA adapter.
        out_dir: Output folder (created; written atomically). Must not be the adapter's own folder.
        base: Only with an adapter folder: the base model, as a local folder (or cached Hub id), or a loaded model
            (which is modified in place). Defaults to the adapter config's `base_model_name_or_path`.
        adapter_name: Which adapter of a model to merge.
        tokenizer: A tokenizer to save along. By default the tokenizer files found next to the adapter or in the
            base model's folder are copied.
        safe_merge: Check every merged weight for NaN/Inf before writing (a broken adapter raises, nothing written).

    Returns:
        The output folder.
    """
    if isinstance(model_or_adapter_dir, nn.Module):
        if base is not None:
            raise ValueError("base= is only used with an adapter folder: a PeftModel already holds its base model")
        snapshot = load_snapshot(model_or_adapter_dir, adapter_name)
        snapshot.check_finite()  # also with safe_merge=False: a NaN weight is never what was meant
        _check_not_quantized(model_or_adapter_dir)
        peft_model = copy.deepcopy(model_or_adapter_dir)
        _untie_adapted_weights(peft_model)
        merged = peft_model.merge_and_unload(safe_merge=safe_merge, adapter_names=[adapter_name])
        sources = [snapshot.base_model_name_or_path]
    else:
        snapshot = load_snapshot(model_or_adapter_dir)
        _check_distinct(snapshot, out_dir)
        snapshot.check_finite()  # before the base model is loaded
        base_model, base_id = load_base_model(snapshot, base)
        _check_not_quantized(base_model)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
            peft_model = PeftModel.from_pretrained(base_model, str(snapshot.source_dir))
        _untie_adapted_weights(peft_model)
        merged = peft_model.merge_and_unload(safe_merge=safe_merge)
        sources = [snapshot.source_dir, base_id]

    with atomic_output_dir(out_dir) as tmp:
        merged.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        else:
            _copy_or_save_tokenizer(sources, tmp)
    return Path(out_dir)


def load_base_model(snapshot: AdapterSnapshot, base: Optional[Union[PathLike, nn.Module]]) -> tuple[nn.Module, Any]:
    """Load (or take) the base model of an adapter folder and check that every adapted module fits it."""
    if isinstance(base, nn.Module):
        describe_layers(snapshot.layers, base, base_desc=f"the base model ({type(base).__name__})")
        return base, getattr(base, "name_or_path", None)
    from_config = base is None
    base_id = snapshot.base_model_name_or_path if from_config else str(Path(base).expanduser())
    if not base_id:
        raise ValueError("the adapter config names no base model (base_model_name_or_path); pass the base model")
    if not from_config and not Path(base_id).exists():
        raise FileNotFoundError(f"base model folder {base_id!r} does not exist")
    cls = base_model_class(snapshot)
    _check_model_type(cls, base_id)
    kwargs: dict[str, Any] = {"dtype": "auto", "local_files_only": True}
    if from_config and snapshot.config.revision:
        kwargs["revision"] = snapshot.config.revision
    kwargs.update(_head_overrides(snapshot, base_id))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = cls.from_pretrained(base_id, **kwargs)
    except (OSError, ValueError) as exc:
        where = "the adapter config's base_model_name_or_path" if from_config else "base"
        raise ValueError(
            f"cannot load base model {base_id!r} ({where}) as a local model: {str(exc).splitlines()[0]} "
            "Pass the folder of the base model."
        ) from exc
    describe_layers(snapshot.layers, model, base_desc=f"base model {base_id!r}")
    return model, base_id


def _check_model_type(cls: type, base_id: str) -> None:
    """An adapter saved from a concrete class (auto_mapping) must not be merged into another architecture."""
    expected = getattr(getattr(cls, "config_class", None), "model_type", None)
    if not expected:
        return  # an Auto class: the architecture follows the base model, and the module checks do the rest
    try:
        found = AutoConfig.from_pretrained(base_id, local_files_only=True).model_type
    except (OSError, ValueError):
        return  # from_pretrained below reports an unreadable base model
    if found != expected:
        raise ValueError(
            f"base model {base_id!r} is a {found!r} model, but the adapter was trained on a {cls.__name__} "
            f"({expected!r}); pass the base model the adapter was trained on"
        )


def _head_overrides(snapshot: AdapterSnapshot, base_id: str) -> dict[str, Any]:
    """A classification adapter brings its own head (modules_to_save): size the base's head to it, and name the
    labels from the labels.json that recipes save next to the adapter."""
    num_labels = head_num_labels(snapshot)
    if num_labels is None:
        return {}
    overrides: dict[str, Any] = {}
    try:
        if AutoConfig.from_pretrained(base_id, local_files_only=True).num_labels != num_labels:
            overrides = {"num_labels": num_labels, "ignore_mismatched_sizes": True}
    except (OSError, ValueError):
        return {}
    labels = _read_labels(snapshot.source_dir)
    if labels is not None and len(labels) == num_labels:
        overrides["id2label"] = dict(enumerate(labels))
        overrides["label2id"] = {label: i for i, label in enumerate(labels)}
    return overrides


def _read_labels(folder: Optional[Path]) -> Optional[list[str]]:
    path = folder / "labels.json" if folder is not None else None
    if path is None or not path.is_file():
        return None
    try:
        labels = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return labels if isinstance(labels, list) and all(isinstance(x, str) for x in labels) else None


def _untie_adapted_weights(peft_model: nn.Module) -> None:
    """Give modules that share an adapted weight (GPT-2's lm_head shares wte's) their own copy before merging.

    The adapter changes only the module it wraps; merging into a shared tensor would change the other module too.
    Tying is turned off in the config so that the saved model keeps the two weights apart.
    """
    base = peft_model.get_base_model()
    layers = [m for m in base.modules() if isinstance(m, LRALayer)]
    adapted = {id(m.get_base_layer().weight) for m in layers}
    wrapped = {id(m.get_base_layer()) for m in layers}
    untied = False
    for module in base.modules():
        weight = module._parameters.get("weight")  # own parameters only: tuner layers forward `.weight`
        if weight is not None and id(weight) in adapted and id(module) not in wrapped:
            module.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
            untied = True
    config = getattr(base, "config", None)
    if untied and config is not None:
        for cfg in {id(c): c for c in (config, config.get_text_config())}.values():
            if hasattr(cfg, "tie_word_embeddings"):
                cfg.tie_word_embeddings = False


def _check_not_quantized(model: nn.Module) -> None:
    for name, module in model.named_modules():
        base = module.get_base_layer() if isinstance(module, LRALayer) else module
        if isinstance(base, nn.Module) and resolve_quantization_backend(base) is not None:
            raise ValueError(
                f"module {name.removeprefix('base_model.model.')!r} of the model is quantized: merging into it "
                "would bake quantization error into the export. Merge onto the unquantized base instead: "
                "export_merged(<adapter folder>, out_dir, base=<unquantized base model>)"
            )


def _copy_or_save_tokenizer(sources: list, dst: Path) -> None:
    """The first tokenizer found among `sources` (folders, or Hub ids already in the local cache: never downloaded
    here), saved into `dst`; none found is fine, the model is written without one."""
    for source in sources:
        if source is not None and save_tokenizer(source, dst):
            return


# ---------------------------------------------------------------------------------------------- compression
@dataclass
class CompressionReport:
    """Relative Frobenius errors ‖ΔW − ΔW_r‖ / ‖ΔW‖ of a rank-r re-factoring, per layer and over all layers."""

    r: int
    errors: dict[str, float] = field(default_factory=dict)
    source_ranks: dict[str, int] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)
    total_error: float = 0.0
    out_dir: Optional[Path] = None

    def __str__(self) -> str:
        width = max((len(name) for name in self.errors), default=6)
        lines = [f"{'module':<{width}}  {'rank':>9}  {'rel. error':>10}"]
        for name, error in self.errors.items():
            ranks = f"{self.source_ranks[name]} -> {self.ranks[name]}"
            lines.append(f"{name:<{width}}  {ranks:>9}  {error:>10.3e}")
        lines.append(f"{'total':<{width}}  {'':>9}  {self.total_error:>10.3e}")
        return "\n".join(lines)


def compress(
    model_or_adapter_dir: ModelOrDir, out_dir: PathLike, r: int, *, adapter_name: str = "default"
) -> CompressionReport:
    """Re-factor every layer's learned ΔW (relative to the original base) to its best rank-`r` approximation.

    The truncated SVD is optimal (Eckart–Young): no rank-r adapter is closer to ΔW in Frobenius norm. The output is
    a plain LRA adapter (`init_weights=True`-style, no ΔW₀ buffers) with rank `r` (capped at each layer's
    min(out, in)) that loads onto the original base model. Scales s = lra_alpha / r are kept.

    Returns:
        A `CompressionReport` with the relative error of each layer and the total over all layers.
    """
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"r={r!r} is invalid: use a positive integer rank")
    snapshot = load_snapshot(model_or_adapter_dir, adapter_name)
    _check_distinct(snapshot, out_dir)
    snapshot.check_finite()  # an SVD of NaN fails deep in LAPACK, naming neither file nor layer
    old = snapshot.config
    largest = full_rank(snapshot)
    if r > largest:
        # ΔW of every layer has rank <= `largest`: a rank-r adapter would be larger (zero-padded) and no closer.
        raise ValueError(
            f"r={r} does not compress this adapter: every layer's ΔW has rank at most {largest} (the adapter's r"
            f"{' plus the rank of ΔW₀' if any(layer.has_init for layer in snapshot.layers.values()) else ''}), so a "
            f"rank-{r} adapter would be larger and exactly as accurate. Pass a rank below {largest} to shrink it "
            f"(r={largest} re-factors it losslessly), or copy the folder to keep it as it is."
        )
    scale = old.lra_alpha / old.r
    capped = {name: min(r, layer.out_features, layer.in_features) for name, layer in snapshot.layers.items()}
    pattern = {exact_pattern_key(name, capped): k for name, k in capped.items() if k != r}
    config = LRAConfig(
        task_type=old.task_type,
        base_model_name_or_path=old.base_model_name_or_path,
        revision=old.revision,
        inference_mode=True,
        r=r,
        lra_alpha=_tidy(scale * r),
        lra_dropout=old.lra_dropout,
        target_modules=sorted(snapshot.layers),
        init_weights=True,
        orth_reg_weight=old.orth_reg_weight,
        fan_in_fan_out=old.fan_in_fan_out,
        bias=old.bias,
        modules_to_save=copy.copy(old.modules_to_save),
        rank_pattern=pattern,
        alpha_pattern={name: _tidy(scale * k) for name, k in pattern.items()},
    )
    report = CompressionReport(r=r)
    state: dict[str, torch.Tensor] = {}
    tail_total = norm_total = 0.0
    for name, layer in snapshot.layers.items():
        U, S, V = _delta_svd(layer)
        k = capped[name]
        tail, norm = float((S[k:] ** 2).sum()), float((S**2).sum())
        tail_total, norm_total = tail_total + tail, norm_total + norm
        report.errors[name] = math.sqrt(tail / norm) if norm > 0 else 0.0
        report.source_ranks[name] = int((S > 0).sum())
        report.ranks[name] = k
        U, S, V = _pad_to_rank(U[:, :k], S[:k], V[:, :k], k)
        dtype, key = layer.U.dtype, f"{KEY_PREFIX}{name}"
        state[f"{key}.lra_U"] = U.to(dtype).contiguous()
        state[f"{key}.lra_lambda"] = (S / layer_scaling(config, name)).to(dtype).contiguous()
        state[f"{key}.lra_V"] = V.to(dtype).contiguous()
    report.total_error = math.sqrt(tail_total / norm_total) if norm_total > 0 else 0.0
    state.update(snapshot.extra)

    with atomic_output_dir(out_dir) as tmp:
        config.save_pretrained(str(tmp), auto_mapping_dict=snapshot.auto_mapping)
        safetensors.torch.save_file(state, str(tmp / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
        note = (
            f"Compressed with `lra-peft compress` to rank {r} (truncated SVD of each layer's ΔW); relative error of "
            f"ΔW over all layers: {report.total_error:.3e}."
        )
        write_card(tmp, load_snapshot(tmp), notes=[note])
        save_tokenizer(snapshot.source_dir, tmp)
    report.out_dir = Path(out_dir)
    return report


def full_rank(snapshot: AdapterSnapshot) -> int:
    """The largest rank a layer's residual-free ΔW can have: r, plus ΔW₀'s rank for SVD-initialised adapters.
    `compress` to this rank is lossless; to a lower one it drops directions."""
    return max(layer.r + (layer.lam0.numel() if layer.has_init else 0) for layer in snapshot.layers.values())


def _delta_svd(layer: LayerFactors) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of ΔW = B·A from its thin factors (QR of each, SVD of a k × k core), in float64: U, S, V (V is in × k)."""
    B, A = layer.residual_free_factors()
    qb, rb = torch.linalg.qr(B.double())
    qa, ra = torch.linalg.qr(A.double().T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    return qb @ u, s, qa @ vh.T


def _pad_to_rank(U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """Append orthonormal directions with λ = 0 so that every layer has exactly k columns (as init_weights=True)."""
    missing = k - S.numel()
    if missing <= 0:
        return U, S, V
    generator = torch.Generator().manual_seed(0)

    def complete(Q: torch.Tensor) -> torch.Tensor:
        random = torch.randn(Q.shape[0], missing, generator=generator, dtype=Q.dtype)
        full, _ = torch.linalg.qr(torch.cat([Q, random], dim=1))
        return torch.cat([Q, full[:, Q.shape[1]:]], dim=1)

    return complete(U), torch.cat([S, S.new_zeros(missing)]), complete(V)


def _tidy(value: float) -> Union[int, float]:
    return int(round(value)) if abs(value - round(value)) < 1e-9 else value


def _check_distinct(snapshot: AdapterSnapshot, out_dir: PathLike) -> None:
    if snapshot.source_dir is not None and same_folder(snapshot.source_dir, out_dir):
        raise ValueError(f"the output folder {str(out_dir)!r} is the adapter folder itself; choose another folder")

