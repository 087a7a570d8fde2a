"""LRA tuner layers: a frozen base layer plus, per adapter, ΔW = s · U · diag(λ) · Vᵀ.

Shapes, in the "matrix view" of the base weight (out × in; see `_to_matrix`):
    lra_U[a]: out × r    lra_lambda[a]: r    lra_V[a]: in × r    scaling[a] = lra_alpha / r

SVD-initialised adapters (`"principal"` / `"minor"`, and the task-aware `"corda"` / `"gradient"`) also keep their
initial factors as buffers `lra_U0`, `lra_lambda0`, `lra_V0`, so that ΔW₀ = s · U₀ · diag(λ₀) · V₀ᵀ is known at any
time. At most one such adapter per layer, the *residual owner*, has ΔW₀ subtracted from the base weight (PiSSA's residual, which is what
makes quantized residuals and fast training possible). Every other SVD-initialised adapter, and every adapter loaded
from a checkpoint, subtracts its ΔW₀ in the forward pass instead. The original weight is therefore always
`base + ΔW₀(owner)`, which keeps the base model, other adapters, `"__base__"` rows, `unload()` and saved adapters
exact however many SVD-initialised adapters share a layer.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from peft.utils.quantization_utils import ForwardOnlyQuantizationBackend
from torch import nn

from .calibration import calibration_stats
from .config import DATA_AWARE_INITS, LRAConfig
from .decomposition import (
    corda_factors,
    gradient_factors,
    random_orthonormal,
    refine_quantized_init,
    top_or_bottom_svd,
)
from .format import matrix_dims
from .quantization import (
    full_precision_weight,
    has_full_precision_source,
    is_bnb_backend,
    quantization_backend_for,
    restore_quantized_storage,
    save_quantized_storage,
)


class LRALayer(BaseTunerLayer):
    adapter_layer_names = ("lra_U", "lra_lambda", "lra_V")
    other_param_names = ("r", "lra_alpha", "scaling", "lra_dropout", "lra_U0", "lra_lambda0", "lra_V0")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.quantization_backend = quantization_backend_for(self.get_base_layer())
        self.r: dict[str, int] = {}
        self.lra_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lra_dropout = nn.ModuleDict({})
        self.lra_U = nn.ParameterDict({})
        self.lra_lambda = nn.ParameterDict({})
        self.lra_V = nn.ParameterDict({})
        self.lra_U0 = BufferDict({}, persistent=True)
        self.lra_lambda0 = BufferDict({}, persistent=True)
        self.lra_V0 = BufferDict({}, persistent=True)
        self.residual_owner: Optional[str] = None
        self._disable_adapters = False
        self.merged_adapters = []
        self.in_features, self.out_features = self._matrix_shape()
        self.kwargs = kwargs

    # ----------------------------------------------------------------------------------------------- layout hooks
    def _matrix_shape(self) -> tuple[int, int]:
        in_features, out_features = _get_in_out_features(self.get_base_layer())
        if in_features is None or out_features is None:
            raise TypeError(f"LRA cannot adapt a layer of type {type(self.get_base_layer()).__name__}")
        return in_features, out_features

    def _to_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """Native weight layout -> out × in."""
        return weight

    def _from_matrix(self, matrix: torch.Tensor) -> torch.Tensor:
        """out × in -> native weight layout."""
        return matrix

    def _lowrank(
        self, x: torch.Tensor, U: torch.Tensor, lam: torch.Tensor, V: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """s · U · diag(λ) · Vᵀ applied to the input `x` (in the base layer's own way)."""
        raise NotImplementedError

    def _v_storage(self, V: torch.Tensor) -> torch.Tensor:
        """V (in × r) in the memory layout that `_lowrank` reads fastest; shape and values unchanged."""
        return V

    # ------------------------------------------------------------------------------------------ creating adapters
    def update_layer(
        self, adapter_name: str, r: int, lra_alpha: float, config: LRAConfig, inference_mode: bool = False
    ) -> None:
        if r <= 0:
            raise ValueError(f"`r` must be a positive integer, got {r}")
        self.r[adapter_name] = r
        self.lra_alpha[adapter_name] = lra_alpha
        self.scaling[adapter_name] = lra_alpha / r
        dropout = nn.Dropout(p=config.lra_dropout) if config.lra_dropout > 0.0 else nn.Identity()
        self.lra_dropout[adapter_name] = dropout

        # A task-aware adapter being loaded gets its factors from the checkpoint, like one read from its own config.
        restored = getattr(config, "_from_checkpoint", False) or (
            config.init_weights in DATA_AWARE_INITS and not config.needs_calibration)
        decompose = config.decomposes_base and not restored
        if decompose:
            U, lam, V = self._svd_factors(adapter_name, r, config)
        else:
            U = random_orthonormal(self.out_features, r)
            V = random_orthonormal(self.in_features, r)
            lam = torch.zeros(r) if config.init_weights is not False else torch.randn(r)
        self.lra_U[adapter_name] = nn.Parameter(U)
        self.lra_lambda[adapter_name] = nn.Parameter(lam)
        self.lra_V[adapter_name] = nn.Parameter(self._v_storage(V))
        if config.decomposes_base:
            # A restored adapter gets zeros here, overwritten by the checkpoint's ΔW₀ factors on load.
            self.lra_U0[adapter_name] = U.detach().clone() if decompose else torch.zeros_like(U)
            self.lra_lambda0[adapter_name] = lam.detach().clone() if decompose else torch.zeros_like(lam)
            self.lra_V0[adapter_name] = V.detach().clone() if decompose else torch.zeros_like(V)
        if decompose and self.residual_owner is None:
            self._subtract_init_from_base(adapter_name)

        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _svd_factors(self, adapter_name: str, r: int, config: LRAConfig) -> tuple[torch.Tensor, ...]:
        if isinstance(self.quantization_backend, ForwardOnlyQuantizationBackend):
            raise ValueError(
                f"init_weights={config.init_weights!r} cannot decompose this layer: its base weight is a "
                f"{self.quantization_backend.backend_name} quantized layer that cannot be dequantized. Use "
                "init_weights=True for it (e.g. exclude it via `exclude_modules`), or load the base unquantized."
            )
        quantized_owner = self.residual_owner is None and is_bnb_backend(self.quantization_backend)
        if quantized_owner and not has_full_precision_source(self.get_base_layer()):
            warnings.warn(
                f"init_weights={config.init_weights!r} on a bitsandbytes-quantized layer decomposes its dequantized "
                "weight Q(W), whose full-precision original is unknown. Load the model with "
                "`lra_peft.quantized_load(...)` to decompose W itself (lower quantization error).",
                stacklevel=2,
            )
        # With another adapter's ΔW₀ already subtracted, decompose the original weight, not that residual.
        weight = self._original_weight_matrix()
        if config.init_weights in DATA_AWARE_INITS:
            U, S, V = self._task_aware_factors(weight, r, config)
            return U, S / self.scaling[adapter_name], V
        U, S, V = top_or_bottom_svd(weight, r, config.init_weights, niter=config.svd_niter)
        if config.quant_refine_iters and quantized_owner:
            # This adapter's ΔW₀ will leave the base as Q(W − ΔW₀): fit ΔW₀ to what that quantization loses.
            dtype = self.get_base_weight().dtype
            base = self.get_base_layer()

            def quantize_dequantize(residual: torch.Tensor) -> torch.Tensor:
                native = self._from_matrix(residual).to(dtype)
                return self._to_matrix(self.quantization_backend.quantize_dequantize(base, native))

            U, S, V, _ = refine_quantized_init(
                weight, U, S, V, quantize_dequantize, config.quant_refine_iters, config.init_weights,
                niter=config.svd_niter,
            )
        return U, S / self.scaling[adapter_name], V

    def _task_aware_factors(self, weight: torch.Tensor, r: int, config: LRAConfig) -> tuple[torch.Tensor, ...]:
        """(U, S, V) of `"corda"` / `"gradient"` from the statistics `lra_peft.preprocess` left on the base layer."""
        stats = calibration_stats(self.get_base_layer(), config.init_weights)
        if stats is None:  # LRAModel checks every target before changing any; this guards direct use of the layer
            raise ValueError(f"init_weights={config.init_weights!r} needs statistics: call "
                             "lra_peft.preprocess(model, config, run_model) before get_peft_model.")
        matrix = stats.matrix.to(weight.device)
        if config.init_weights == "corda":
            return corda_factors(weight, matrix, r, config.corda_method)
        return gradient_factors(matrix, r, config.gradient_scale, niter=config.svd_niter)

    def _base_weight_matrix(self) -> torch.Tensor:
        return self._to_matrix(self.get_base_weight()).to(torch.float32)

    def _original_weight_matrix(self) -> torch.Tensor:
        if self.residual_owner is None and self.quantization_backend is not None:
            # A quantized base stores Q(W); where the checkpoint's W is known (lra_peft.quantized_load), use it.
            original = full_precision_weight(self.get_base_layer(), self.quantization_backend)
            if original is not None:
                return self._to_matrix(original).to(torch.float32)
        weight = self._base_weight_matrix()
        if self.residual_owner is not None:
            weight = weight + self._init_delta_matrix(self.residual_owner).float()
        return weight

    def _subtract_init_from_base(self, adapter_name: str) -> None:
        weight = self.get_base_weight()
        # The matrix that was decomposed: the base itself, or a quantized base's full-precision original.
        original = self._from_matrix(self._original_weight_matrix())
        delta = self._from_matrix(self._init_delta_matrix(adapter_name))
        self.set_base_weight((original.float() - delta.float()).to(weight.dtype))
        self.__dict__.pop("_lra_unmerged_storage", None)  # a base saved before this change must not come back
        self.residual_owner = adapter_name

    def release_residual(self) -> None:
        """Add the residual owner's ΔW₀ back into the base weight, so that the base is the original W again."""
        if self.residual_owner is None:
            return
        weight = self.get_base_weight()
        delta = self._from_matrix(self._init_delta_matrix(self.residual_owner))
        self.set_base_weight((weight.float() + delta.float()).to(weight.dtype))
        self.__dict__.pop("_lra_unmerged_storage", None)  # a base saved before this change must not come back
        self.residual_owner = None

    # --------------------------------------------------------------------------------------------- delta weights
    @staticmethod
    def _product(U: torch.Tensor, lam: torch.Tensor, V: torch.Tensor, scale: float) -> torch.Tensor:
        # Half precision on CPU is slow and inexact for matmuls: compute in fp32 there.
        if U.device.type == "cpu" and U.dtype in (torch.float16, torch.bfloat16):
            U, lam, V = U.float(), lam.float(), V.float()
        return (U * (lam * scale)) @ V.T

    def _init_delta_matrix(self, adapter: str) -> torch.Tensor:
        """ΔW₀ = s · U₀ · diag(λ₀) · V₀ᵀ (out × in)."""
        return self._product(
            self.lra_U0[adapter], self.lra_lambda0[adapter], self.lra_V0[adapter], self.scaling[adapter]
        )

    def delta_weight_matrix(self, adapter: str) -> torch.Tensor:
        """What the adapter adds to the *current* base weight, in the out × in view."""
        delta = self._product(self.lra_U[adapter], self.lra_lambda[adapter], self.lra_V[adapter], self.scaling[adapter])
        if adapter in self.lra_U0 and adapter != self.residual_owner:
            delta = delta - self._init_delta_matrix(adapter)
        return delta

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """ΔW of `adapter` relative to the current base weight, in the base layer's native layout."""
        weight_dtype = self.lra_U[adapter].dtype
        return self._from_matrix(self.delta_weight_matrix(adapter)).to(weight_dtype)

    # ------------------------------------------------------------------------------------------ merge / unmerge
    def check_merge(self, adapter_names: Optional[list[str]] = None, unload: bool = False) -> None:
        """Raise a ValueError, changing nothing, if merging `adapter_names` would put a non-finite value in W.

        With `unload=True` also check the next step of `merge_and_unload`: adding back the ΔW₀ of a residual owner
        that is not merged.
        """
        base = self.get_base_weight().float()
        merged = list(self.merged_adapters)
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.lra_U:
                continue
            if not torch.isfinite(base + self.get_delta_weight(adapter).float()).all():
                raise ValueError(
                    f"Merging adapter {adapter!r} would put NaN or Inf into the weights of this layer "
                    f"({type(self.get_base_layer()).__name__} {self.out_features}x{self.in_features}); the adapter "
                    "is broken (non-finite values, often from a diverged training run). Nothing was merged."
                )
            base = base + self.get_delta_weight(adapter).float()
            merged.append(adapter)
        owner = self.residual_owner
        if unload and owner is not None and owner not in merged:
            if not torch.isfinite(base + self._from_matrix(self._init_delta_matrix(owner)).float()).all():
                raise ValueError(
                    f"Unloading would put NaN or Inf into the weights of this layer "
                    f"({type(self.get_base_layer()).__name__} {self.out_features}x{self.in_features}): the initial "
                    f"factors lra_U0/lra_lambda0/lra_V0 of adapter {owner!r}, added back to restore the original "
                    "weight, are not finite. Nothing was changed."
                )

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Merge the active (or the given) adapters into the base weight.

        With `safe_merge=True` a non-finite result raises a ValueError and leaves the weight untouched.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        if safe_merge:
            self.check_merge(adapter_names)
        if is_bnb_backend(self.quantization_backend) and not self.merged_adapters:
            # Unmerging restores this storage instead of requantizing a second time (see save_quantized_storage).
            self.__dict__["_lra_unmerged_storage"] = save_quantized_storage(self.get_base_layer())
        for adapter in adapter_names:
            if adapter not in self.lra_U:
                continue
            weight = self.get_base_weight()
            self.set_base_weight((weight.float() + self.get_delta_weight(adapter).float()).to(weight.dtype))
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        storage = self.__dict__.pop("_lra_unmerged_storage", None)
        if storage is not None:
            # Bit-exact: the quantized weight as it was before the first merge, whatever the adapters hold now.
            restore_quantized_storage(self.get_base_layer(), storage)
            self.merged_adapters.clear()
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.lra_U:
                weight = self.get_base_weight()
                self.set_base_weight((weight.float() - self.get_delta_weight(adapter).float()).to(weight.dtype))

    def unload_and_optionally_merge_module(
        self, merge: bool, safe_merge: bool, adapter_names: Optional[list[str]]
    ) -> nn.Module:
        """Used by `merge_and_unload()` / `unload()`: never hand back a residual where W was."""
        if merge:
            self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        if self.residual_owner is not None and self.residual_owner not in self.merged_adapters:
            self.release_residual()
        return self.get_base_layer()

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name == self.residual_owner:
            self.release_residual()
        super().delete_adapter(adapter_name)

    # --------------------------------------------------------------------------------------------------- forward
    def _init_term(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        return self._lowrank(
            x, self.lra_U0[adapter], self.lra_lambda0[adapter], self.lra_V0[adapter], self.scaling[adapter]
        )

    def _adapter_term(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        """The adapter's contribution on top of the current base (its own ΔW₀ removed unless it owns the residual)."""
        out = self._lowrank(
            self.lra_dropout[adapter](x),
            self.lra_U[adapter],
            self.lra_lambda[adapter],
            self.lra_V[adapter],
            self.scaling[adapter],
        )
        if adapter in self.lra_U0 and adapter != self.residual_owner:
            out = out - self._init_term(x, adapter)
        return out

    def _check_forward_args(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        adapter_names = kwargs.get("adapter_names", None)
        if adapter_names is None:
            return
        if len(x) != len(adapter_names):
            raise ValueError(
                "Length of `adapter_names` should be the same as the number of inputs, but got "
                f"{len(adapter_names)} and {len(x)} respectively."
            )
        if self.merged:
            raise ValueError(
                "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
            )

    def _adapter_dtype(self, adapters: list[str]) -> Optional[torch.dtype]:
        for adapter in adapters:
            if adapter in self.lra_U:
                return self.lra_U[adapter].dtype
        if self.residual_owner is not None:
            return self.lra_U0[self.residual_owner].dtype
        return None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self._base_forward(x, [], *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        if self.merged:
            return self._base_forward(x, self.merged_adapters, *args, **kwargs)

        active = [a for a in self.active_adapters if a in self.lra_U]
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        if self.quantization_backend is not None:
            result = self.quantization_backend.maybe_clone_base_result(result)
        dtype = self._adapter_dtype(active)
        if dtype is None:
            return result
        x_cast = self._cast_input_dtype(x, dtype)
        for adapter in active:
            result = result + self._adapter_term(x_cast, adapter).to(result_dtype)
        if self.residual_owner is not None and self.residual_owner not in active:
            result = result + self._init_term(x_cast, self.residual_owner).to(result_dtype)
        return result.to(result_dtype)

    def _base_forward(self, x: torch.Tensor, in_effect: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base layer's output, with the residual owner's ΔW₀ added back unless the owner is `in_effect`."""
        result = self.base_layer(x, *args, **kwargs)
        owner = self.residual_owner
        if owner is None or owner in in_effect:
            return result
        x_cast = self._cast_input_dtype(x, self.lra_U0[owner].dtype)
        return result + self._init_term(x_cast, owner).to(result.dtype)

    def _mixed_batch_forward(
        self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any
    ) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        if self.quantization_backend is not None:
            result = self.quantization_backend.maybe_clone_base_result(result)
        dtype = self._adapter_dtype(list(dict.fromkeys(adapter_names)))
        if dtype is None:
            return result
        owner = self.residual_owner
        for adapter in dict.fromkeys(adapter_names):
            rows = [i for i, name in enumerate(adapter_names) if name == adapter]
            sub = self._cast_input_dtype(x[rows], dtype)
            term = None
            if adapter in self.lra_U:
                term = self._adapter_term(sub, adapter)
            if owner is not None and adapter != owner:
                owner_term = self._init_term(sub, owner)
                term = owner_term if term is None else term + owner_term
            if term is not None:
                result[rows] += term.to(result_dtype)
        return result



class _LRAModule(nn.Module, LRALayer):
    # nn.Module comes first so that its __init__/__setattr__ govern; take LRALayer's forward over nn.Module's stub.
    forward = LRALayer.forward

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        r: int,
        lra_alpha: float,
        config: LRAConfig,
        fan_in_fan_out: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        LRALayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = fan_in_fan_out  # only Linear reads it (GPT-2's Conv1D stores W as in × out)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lra_alpha, config)

    def __repr__(self) -> str:
        return "lra." + nn.Module.__repr__(self)


class Linear(_LRAModule):
    """LRA on `nn.Linear`, Transformers' `Conv1D` (`fan_in_fan_out=True`) and bitsandbytes 8/4-bit linear layers."""

    def _to_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T if self.fan_in_fan_out else weight

    def _from_matrix(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.T if self.fan_in_fan_out else matrix

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        # peft.convert_to_lora writes Linear LoRA keys: exact for Linear / Conv1D through lra_peft.conversion.
        return True

    def _v_storage(self, V: torch.Tensor) -> torch.Tensor:
        # V keeps its in × r shape but is stored as r × in (a transposed view), so that x·V below is the same GEMM as
        # LoRA's lora_A (x·Aᵀ with A row-major r × in). For small r, BLAS runs x·V with V row-major up to ~1.4× slower
        # on CPU (benchmarks/hotpath.py). A V loaded or resized into row-major storage stays correct, just slower.
        return V.T.contiguous().T

    def _lowrank(
        self, x: torch.Tensor, U: torch.Tensor, lam: torch.Tensor, V: torch.Tensor, scale: float
    ) -> torch.Tensor:
        # Scaling the r-wide hidden vector is cheaper than scaling the out-wide result (as LoRA does).
        return F.linear(F.linear(x, V.T) * (lam * scale), U)


class Embedding(_LRAModule):
    """LRA on `nn.Embedding`: the matrix view is Wᵀ (embedding_dim × num_embeddings), as in PEFT's LoRA."""

    def _matrix_shape(self) -> tuple[int, int]:
        base = self.get_base_layer()
        return base.num_embeddings, base.embedding_dim

    def _to_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T

    def _from_matrix(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.T

    def _lowrank(
        self, x: torch.Tensor, U: torch.Tensor, lam: torch.Tensor, V: torch.Tensor, scale: float
    ) -> torch.Tensor:
        base = self.get_base_layer()
        hidden = F.embedding(x, V, padding_idx=base.padding_idx, max_norm=base.max_norm,
                             norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq,
                             sparse=base.sparse)
        return F.linear(hidden * (lam * scale), U)

    def _cast_input_dtype(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return x  # token ids stay integers


class Conv2d(_LRAModule):
    """LRA on `nn.Conv2d` (groups=1): V is a conv to r channels, U a 1×1 conv back to out_channels."""

    def _matrix_shape(self) -> tuple[int, int]:
        base = self.get_base_layer()
        if base.groups != 1:
            raise ValueError(
                f"LRA supports Conv2d with groups=1 only, got groups={base.groups}; exclude this layer via "
                "`exclude_modules`."
            )
        return matrix_dims(base, "conv2d")

    def _to_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.reshape(weight.shape[0], -1)

    def _from_matrix(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.reshape(self.get_base_layer().weight.shape)

    def _lowrank(
        self, x: torch.Tensor, U: torch.Tensor, lam: torch.Tensor, V: torch.Tensor, scale: float
    ) -> torch.Tensor:
        base = self.get_base_layer()
        r = lam.shape[0]
        kernel = V.T.reshape(r, base.in_channels, *base.kernel_size)
        hidden = F.conv2d(x, kernel, None, base.stride, base.padding, base.dilation)
        hidden = hidden * (lam * scale).view(1, r, 1, 1)
        return F.conv2d(hidden, U.reshape(U.shape[0], r, 1, 1))
