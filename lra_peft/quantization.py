"""bitsandbytes 8-bit and 4-bit base weights: quantization backends, SVD-init refinement and `quantized_load`.

An LRA layer on a `bnb.nn.Linear8bitLt` / `bnb.nn.Linear4bit` base reads and writes the frozen weight through a
backend: `get_base_weight()` dequantizes it, `set_base_weight()` requantizes (PEFT's backends, extended here for the
CPU kernels of bitsandbytes and for `quantize_dequantize`). SVD-initialised adapters (`"principal"` / `"minor"`) put
a quantized residual Q(W − ΔW₀) into the base (`decomposition.refine_quantized_init` refits ΔW₀ to it).

`quantized_load` loads a Transformers model in 8 or 4 bits, keeps freshly initialised task heads in full precision,
and remembers where each quantized weight's full-precision original lives, so that `"principal"` / `"minor"`
decompose W itself rather than its quantized copy Q(W).
"""

from __future__ import annotations

import json
import os
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from peft.utils.quantization_utils import Bnb4bitBackend, Bnb8bitBackend, QuantizationBackend
from peft.utils.quantization_utils import resolve_quantization_backend as _peft_resolve_backend
from safetensors import safe_open
from torch import nn
from transformers import BitsAndBytesConfig
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, cached_file

# Attribute set on a quantized bnb layer by `quantized_load`: where its full-precision weight can be read.
_SOURCE_ATTR = "_lra_full_precision_source"
# A checkpoint weight counts as the original of a quantized weight when quantizing it reproduces that weight up to
# this relative (Frobenius) difference; int8/nf4 kernels on different devices may round a few entries differently.
_SOURCE_MATCH_RTOL = 1e-3


# ---------------------------------------------------------------------------------------------------- backends
def _unpack_cpu_4bit(base_layer: nn.Module) -> None:
    """Undo bitsandbytes' AVX512-BF16 CPU repacking of a 4-bit weight (it happens on the first CPU inference).

    The repacked layout is neither what `dequantize_4bit` reads nor differentiable (a later training step fails),
    so LRA keeps its 4-bit bases in the standard layout. The repacking stores the block scales (absmax) as a
    transposed (blocks per row × rows) bfloat16 matrix; bitsandbytes' inverse (0.50) restores that layout only for
    double-quantized weights and otherwise leaves the scales transposed, which scrambles every row that spans more
    than one block. Here the scales go back to their flat row-major float32 layout (their bfloat16 rounding stays).
    """
    weight = base_layer.weight
    state = getattr(weight, "quant_state", None)
    if state is None or not getattr(state, "packing_format_for_cpu", False):
        return
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    nested = getattr(state, "original_nested", False)
    weight.data, state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
    if not nested and state.absmax.dim() == 2:
        state.absmax = state.absmax.T.contiguous().reshape(-1).to(torch.float32)
    weight.quant_state = state


class LRABnb8bitBackend(Bnb8bitBackend):
    """PEFT's 8-bit backend plus `quantize_dequantize`, the round trip that `set_base_weight` applies."""

    def quantize_dequantize(self, base_layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        """dequant(Q(weight)) with the row-wise absmax int8 scheme of `Int8Params` (out × in in, float32 out)."""
        import bitsandbytes.functional as bnbF

        # Int8Params quantizes from a float16 copy, so must the simulation.
        CB, SCB, _ = bnbF.int8_vectorwise_quant(weight.contiguous().to(torch.float16))
        return bnbF.int8_vectorwise_dequant(CB, SCB).to(torch.float32)


class LRABnb4bitBackend(Bnb4bitBackend):
    """PEFT's 4-bit backend, safe with bitsandbytes' CPU repacking, plus `quantize_dequantize`."""

    @staticmethod
    def prepare(base_layer: nn.Module) -> None:
        """Keep the weight in the standard 4-bit layout from now on (see `_unpack_cpu_4bit`)."""
        _unpack_cpu_4bit(base_layer)
        if hasattr(base_layer, "support_avx512bf16_for_cpu"):
            base_layer.support_avx512bf16_for_cpu = False

    def get_base_weight(self, base_layer: nn.Module) -> torch.Tensor:
        _unpack_cpu_4bit(base_layer)
        return super().get_base_weight(base_layer)

    def set_base_weight(self, peft_layer: nn.Module, weight_data: torch.Tensor) -> None:
        _unpack_cpu_4bit(peft_layer.get_base_layer())
        super().set_base_weight(peft_layer, weight_data)

    def quantize_dequantize(self, base_layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        """dequant(Q(weight)) with the layer's own blocksize, quant_type (nf4/fp4), double quantization and dtype."""
        import bitsandbytes.functional as bnbF

        _unpack_cpu_4bit(base_layer)
        params = base_layer.weight
        dtype = params.quant_state.dtype if params.quant_state is not None else weight.dtype
        packed, state = bnbF.quantize_4bit(
            weight.contiguous().to(dtype),
            blocksize=params.blocksize,
            compress_statistics=params.compress_statistics,
            quant_type=params.quant_type,
            quant_storage=params.quant_storage,
        )
        return bnbF.dequantize_4bit(packed, state).to(torch.float32)


def quantization_backend_for(base_layer: nn.Module) -> Optional[QuantizationBackend]:
    """The backend through which an LRA layer reads and writes `base_layer`'s weight (`None`: not quantized).

    bitsandbytes layers get LRA's backends (and a 4-bit layer is switched to the standard weight layout for good);
    anything else gets PEFT's own backend.
    """
    backend = _peft_resolve_backend(base_layer)
    if type(backend) is Bnb8bitBackend:
        return LRABnb8bitBackend()
    if type(backend) is Bnb4bitBackend:
        LRABnb4bitBackend.prepare(base_layer)
        return LRABnb4bitBackend()
    return backend


def is_bnb_backend(backend: Optional[QuantizationBackend]) -> bool:
    return isinstance(backend, (LRABnb8bitBackend, LRABnb4bitBackend))


# ------------------------------------------------------------------------------- exact merge / unmerge storage
@dataclass
class QuantizedStorage:
    """A bitsandbytes layer's quantized weight as it was before a merge: the Parameter object (Int8Params or
    Params4bit) with its attributes, and the int8 row scales (8-bit) or the quant state (4-bit)."""

    weight: Any
    attributes: dict
    CB: Optional[torch.Tensor] = None
    SCB: Optional[torch.Tensor] = None


def save_quantized_storage(base_layer: nn.Module) -> QuantizedStorage:
    """Keep `base_layer`'s current quantized weight, so that `restore_quantized_storage` can put it back bit-exactly.

    Merging requantizes Q(dequant(W_q) + ΔW), and unmerging would requantize again: each cycle adds quantization
    error (an nf4 layer drifts by tens of % over three cycles). PEFT's backends replace the Parameter rather than
    write into it, so keeping the old one costs only a reference (plus the 8-bit scales, which a forward moves).
    """
    weight = base_layer.weight
    storage = QuantizedStorage(weight=weight, attributes=dict(weight.__dict__))
    if type(weight).__name__ == "Int8Params":
        # A forward moves CB/SCB from the weight into the layer's matmul state (`init_8bit_state`).
        state = getattr(base_layer, "state", None)
        storage.CB = weight.CB if weight.CB is not None else getattr(state, "CB", None)
        storage.SCB = weight.SCB if weight.SCB is not None else getattr(state, "SCB", None)
        storage.CB = weight.data if storage.CB is None else storage.CB
    return storage


def restore_quantized_storage(base_layer: nn.Module, storage: QuantizedStorage) -> None:
    """Put back the quantized weight saved by `save_quantized_storage` (the exact bytes and scales it had)."""
    weight = storage.weight
    weight.__dict__.update(storage.attributes)  # PEFT's 4-bit backend flips `bnb_quantized` on the old object
    if storage.SCB is not None:
        weight.data, weight.CB, weight.SCB = storage.CB, storage.CB, storage.SCB
        base_layer.weight = weight
        base_layer.state.reset_grads()  # the next forward takes CB/SCB from the weight again
        return
    base_layer.weight = weight
    if getattr(weight, "quant_state", None) is not None and hasattr(base_layer, "quant_state"):
        base_layer.quant_state = weight.quant_state


# ------------------------------------------------------------------------------ full-precision weight sources
@dataclass
class _CheckpointWeight:
    """Where the full-precision original of a quantized weight lives, valid while that exact weight is in place."""

    file: str
    key: str
    weight_ref: Any  # weakref to the quantized Parameter this describes: requantizing replaces it

    def __getstate__(self) -> dict:
        # A weakref cannot be pickled; a copied or unpickled model has new weight objects anyway.
        return {**self.__dict__, "weight_ref": None}

    def describes(self, weight: Any) -> bool:
        return self.weight_ref is not None and self.weight_ref() is weight

    def load(self, base_layer: nn.Module) -> Optional[torch.Tensor]:
        if not self.describes(base_layer.weight):
            return None
        with safe_open(self.file, framework="pt", device="cpu") as handle:
            return handle.get_tensor(self.key)


def has_full_precision_source(base_layer: nn.Module) -> bool:
    """Whether `quantized_load` recorded where `base_layer`'s current quantized weight came from."""
    source = getattr(base_layer, _SOURCE_ATTR, None)
    return source is not None and source.describes(getattr(base_layer, "weight", None))


def full_precision_weight(base_layer: nn.Module, backend: QuantizationBackend) -> Optional[torch.Tensor]:
    """The float32 original W of a quantized `base_layer` (native layout, on its device), if `quantized_load` knows it.

    `None` when it is unknown, when the base weight was changed since loading (a merge, a residual), or when
    quantizing the checkpoint's tensor does not reproduce the weight in place.
    """
    source = getattr(base_layer, _SOURCE_ATTR, None)
    if source is None or not is_bnb_backend(backend):
        return None
    original = source.load(base_layer)
    if original is None:
        return None
    in_place = backend.get_base_weight(base_layer).to(torch.float32)
    original = original.to(device=in_place.device, dtype=torch.float32)
    if original.shape != in_place.shape:
        return None
    requantized = backend.quantize_dequantize(base_layer, original.to(in_place.dtype))
    mismatch = torch.linalg.norm(requantized - in_place) / torch.linalg.norm(in_place).clamp_min(1e-12)
    if mismatch > _SOURCE_MATCH_RTOL:
        warnings.warn(
            f"The checkpoint tensor {source.key!r} in {source.file} does not quantize to the weight in place "
            f"(relative difference {mismatch.item():.2e}); decomposing the dequantized weight instead.",
            stacklevel=2,
        )
        return None
    return original


def _safetensors_index(path: Union[str, os.PathLike], **hub_kwargs: Any) -> dict[str, str]:
    """Tensor name -> safetensors file of a local folder (or a cached Hub repo); {} for other formats."""

    def locate(name: str) -> Optional[str]:
        if os.path.isdir(path):
            candidate = os.path.join(path, hub_kwargs.get("subfolder") or "", name)
            return candidate if os.path.isfile(candidate) else None
        try:
            return cached_file(path, name, _raise_exceptions_for_missing_entries=False, **hub_kwargs)
        except (OSError, ValueError):
            return None

    single = locate(SAFE_WEIGHTS_NAME)
    if single is not None:
        with safe_open(single, framework="pt") as handle:
            return dict.fromkeys(handle.keys(), single)
    index_file = locate(SAFE_WEIGHTS_INDEX_NAME)
    if index_file is None:
        return {}
    with open(index_file) as handle:
        weight_map = json.load(handle)["weight_map"]
    folder = os.path.dirname(index_file)
    return {key: os.path.join(folder, file) for key, file in weight_map.items()}


def _checkpoint_key(module_name: str, prefix: str, index: dict[str, str]) -> Optional[str]:
    # A task model (prefix "bert.") may be loaded from a base model's checkpoint (no prefix), and vice versa.
    candidates = [f"{module_name}.weight"]
    if prefix and module_name.startswith(prefix + "."):
        candidates.append(f"{module_name[len(prefix) + 1:]}.weight")
    elif prefix:
        candidates.append(f"{prefix}.{module_name}.weight")
    return next((key for key in candidates if key in index), None)


# ----------------------------------------------------------------------------------------------- loading
_HUB_KWARGS = ("cache_dir", "revision", "subfolder", "token", "local_files_only")


def _is_quantized_bnb_param(weight: torch.Tensor) -> bool:
    name = type(weight).__name__
    if name == "Params4bit":
        return bool(getattr(weight, "bnb_quantized", False))
    if name == "Int8Params":
        return weight.dtype == torch.int8
    return False


def quantized_load(
    model_class: Any,
    pretrained_model_name_or_path: Union[str, os.PathLike],
    quantization_config: Any,
    **kwargs: Any,
) -> nn.Module:
    """`model_class.from_pretrained(path, quantization_config=...)` that is ready for LRA in 8 or 4 bits.

    Differences from a plain `from_pretrained`:

    * Linear layers that are *not* in the checkpoint (the freshly initialised head of `AutoModelForSequenceClassification`
      or `...TokenClassification` loaded from a base checkpoint) stay `nn.Linear` in full precision, with
      Transformers' own initialisation: bitsandbytes cannot run a layer whose weight was never quantized (8-bit fails
      with `'Parameter' object has no attribute 'CB'`), and a trained head belongs in `modules_to_save` anyway.
      They are added to `config.quantization_config.llm_int8_skip_modules`.
    * 4-bit layers keep bitsandbytes' standard weight layout on the CPU (no AVX512-BF16 repacking on the first
      inference, which would round the block scales to bfloat16): the weights stay exactly as loaded.
    * Each quantized layer remembers where its full-precision weight lives (safetensors checkpoints only; nothing is
      read now). `LRAConfig(init_weights="principal" | "minor")` then decomposes W rather than Q(W), and the base
      becomes Q(W − ΔW₀): lower quantization error (QPiSSA), further lowered by `quant_refine_iters`.

    Args:
        model_class: A Transformers model class or `AutoModelFor*` class.
        pretrained_model_name_or_path: A local folder, or a Hub id already in the local cache.
        quantization_config: A `transformers.BitsAndBytesConfig` with `load_in_8bit=True` or `load_in_4bit=True`.
        **kwargs: Passed on to `from_pretrained` (`num_labels`, `device_map`, `dtype`, ...). With
            `output_loading_info=True` the result is `(model, loading_info)`, as in Transformers.

    Example:
        >>> from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig
        >>> model = lra_peft.quantized_load(AutoModelForSequenceClassification, "bert-base-uncased",
        ...                                 BitsAndBytesConfig(load_in_8bit=True), num_labels=2)
    """
    if not isinstance(quantization_config, BitsAndBytesConfig) or not (
        quantization_config.load_in_8bit or quantization_config.load_in_4bit
    ):
        raise ValueError(
            f"quantized_load(quantization_config={quantization_config!r}) needs a transformers.BitsAndBytesConfig "
            "with load_in_8bit=True or load_in_4bit=True, e.g. BitsAndBytesConfig(load_in_4bit=True, "
            "bnb_4bit_quant_type='nf4')."
        )
    if "quantization_config" in kwargs or "load_in_8bit" in kwargs or "load_in_4bit" in kwargs:
        raise ValueError("quantized_load: pass the quantization settings once, as its `quantization_config` argument.")
    return_info = kwargs.pop("output_loading_info", False)
    model, info = model_class.from_pretrained(
        pretrained_model_name_or_path, quantization_config=quantization_config, output_loading_info=True, **kwargs
    )

    missing = set(info.get("missing_keys", ()))
    kept = []
    for name, module in list(model.named_modules()):
        weight = getattr(module, "weight", None)
        if (f"{name}.weight" in missing and _peft_resolve_backend(module) is not None
                and weight is not None and not _is_quantized_bnb_param(weight)):
            model.set_submodule(name, _as_full_precision_linear(module))
            kept.append(name)
    if kept:
        config = model.config.quantization_config
        skip = list(config.llm_int8_skip_modules or getattr(model.hf_quantizer, "modules_to_not_convert", None) or [])
        config.llm_int8_skip_modules = skip + [name for name in kept if name not in skip]

    hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
    index = _safetensors_index(pretrained_model_name_or_path, **hub_kwargs)
    prefix = getattr(model, "base_model_prefix", "")
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if weight is None or not _is_quantized_bnb_param(weight):
            continue
        if hasattr(module, "support_avx512bf16_for_cpu"):
            # A CPU inference would repack the 4-bit weight with bfloat16 scales (see `_unpack_cpu_4bit`): the weight
            # would no longer be the checkpoint's Q(W), and principal / minor init would lose the full-precision W.
            module.support_avx512bf16_for_cpu = False
        key = _checkpoint_key(name, prefix, index)
        if key is not None:
            setattr(module, _SOURCE_ATTR, _CheckpointWeight(index[key], key, weakref.ref(weight)))
    return (model, info) if return_info else model


def _as_full_precision_linear(module: nn.Module) -> nn.Linear:
    """An `nn.Linear` holding the (unquantized, freshly initialised) weight and bias of a bnb linear layer."""
    weight = module.weight
    linear = nn.Linear(
        module.in_features, module.out_features, bias=module.bias is not None, device=weight.device, dtype=weight.dtype
    )
    with torch.no_grad():
        linear.weight.copy_(weight.data)
        if module.bias is not None:
            linear.bias.copy_(module.bias.data)
    linear.requires_grad_(weight.requires_grad)
    return linear
