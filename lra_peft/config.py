"""`LRAConfig`: the configuration of an LRA adapter, ΔW = s · U · diag(λ) · Vᵀ with s = lra_alpha / r."""

from __future__ import annotations

import contextvars
import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig

from ._peft_type import ensure_peft_type

# True while PeftModel.from_pretrained / load_adapter loads an LRA adapter (set by lra_peft.safety): its U₀, λ₀, V₀
# come from the checkpoint, so a data-aware init needs no statistics.
LOADING_LRA_ADAPTER: contextvars.ContextVar[bool] = contextvars.ContextVar("lra_peft_lra_load", default=False)

INIT_WEIGHTS_CHOICES = (True, False, "principal", "minor", "corda", "gradient")
# Inits whose factors come from statistics that `lra_peft.preprocess` collects on the task's data.
DATA_AWARE_INITS = ("corda", "gradient")
CORDA_METHODS = ("ipm", "kpm")
BIAS_CHOICES = ("none", "all", "lra_only")


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    # NaN and Inf are never a valid setting: they would silently turn every output into NaN.
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _is_str_list(value: object) -> bool:
    return isinstance(value, (list, tuple, set)) and all(isinstance(v, str) for v in value)


@dataclass
class LRAConfig(PeftConfig):
    """Configuration of an [`LRAModel`]: low-rank adaptation ΔW = s · U · diag(λ) · Vᵀ.

    U is `out_features × r`, V is `in_features × r` and λ is a vector of `r` values; all three are trainable and the
    pretrained weight W stays frozen. The scale is `s = lra_alpha / r`.

    Args:
        r: Rank of the adapter (columns of U and V, entries of λ).
        lra_alpha: Scale numerator; defaults to `r`, so that `s = 1`.
        lra_dropout: Dropout applied to the adapter's input.
        target_modules: Module names (list, suffix match), a regex (str), or `"all-linear"`. `None` uses PEFT's
            per-architecture defaults (the same as LoRA's).
        exclude_modules: Module names or regex to leave alone.
        init_weights: `True`: ΔW = 0 (λ = 0, U and V random with orthonormal columns). `False`: a random non-zero ΔW
            (for tests). `"principal"`: U, λ, V are the top-r singular triplets of W and the frozen base becomes the
            residual W − ΔW (PiSSA). `"minor"`: the r smallest singular triplets (MiLoRA). `"corda"` and
            `"gradient"`: task-aware SVD inits that need `lra_peft.preprocess(model, config, run_model)` first (CorDA:
            SVD of W·C with C the inputs' second moment; LoRA-GA-style: singular vectors of the task gradient); they
            own the residual like `"principal"`. See docs/initialisation.md.
        corda_method: For `"corda"`: `"ipm"` (instruction-previewed: the adapter takes the r largest components of
            W·C) or `"kpm"` (knowledge-preserving: the r smallest, so the frozen base keeps what the data uses most).
        gradient_scale: For `"gradient"`: every singular value of the initial ΔW₀ = gradient_scale · U₀V₀ᵀ.
        svd_niter: `None` computes an exact SVD for `"principal"`; an integer uses a randomized SVD with that many
            power iterations (for large matrices).
        orth_reg_weight: Weight of `‖UᵀU − I‖²_F + ‖VᵀV − I‖²_F` (averaged over adapted layers) added to the loss that
            the model's forward returns.
        fan_in_fan_out: Set for layers that store their weight as `(in, out)` (GPT-2's `Conv1D`).
        bias: `"none"`, `"all"` or `"lra_only"`: which biases to train.
        modules_to_save: Extra modules to train and save in full (e.g. a classifier head).
        layers_to_transform, layers_pattern: Restrict adaptation to some layer indices.
        rank_pattern, alpha_pattern: Per-module overrides of `r` / `lra_alpha` (keys are regex or module names).
        quant_refine_iters: For `"principal"`/`"minor"` on 8/4-bit bases: alternations of "quantize the residual,
            re-fit the top-r part to what quantization lost" (as QPiSSA/LoftQ). 0 turns it off.
        target_r: Average rank per layer to end with when adaptive rank allocation prunes λ (`None`: off).
        init_warmup, final_warmup, mask_interval, total_step, beta1, beta2: The allocation schedule and the EMA factors
            of the importance score (AdaLoRA's meaning and defaults).
    """

    r: int = field(default=8, metadata={"help": "Rank of the adapter."})
    lra_alpha: Optional[float] = field(default=None, metadata={"help": "Scale numerator; defaults to r."})
    lra_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names, a regex, or 'all-linear'."}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex to exclude."}
    )
    init_weights: Union[bool, Literal["principal", "minor", "corda", "gradient"]] = field(
        default=True, metadata={"help": "True, False, 'principal', 'minor', 'corda' or 'gradient'."}
    )
    corda_method: Literal["ipm", "kpm"] = field(
        default="ipm", metadata={"help": "For init_weights='corda': 'ipm' (largest components) or 'kpm' (smallest)."}
    )
    gradient_scale: float = field(
        default=1.0, metadata={"help": "For init_weights='gradient': the singular values of the initial ΔW₀."}
    )
    svd_niter: Optional[int] = field(
        default=None, metadata={"help": "None: exact SVD; an int: randomized SVD with that many power iterations."}
    )
    orth_reg_weight: float = field(default=0.0, metadata={"help": "Weight of the orthogonality regulariser."})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "True for layers storing (in, out) weights."})
    bias: str = field(default="none", metadata={"help": "'none', 'all' or 'lra_only'."})
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules besides the adapters to train and save."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Layer indices to adapt."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer ModuleList, used with layers_to_transform."}
    )
    rank_pattern: Optional[dict] = field(default_factory=dict, metadata={"help": "Per-module rank overrides."})
    alpha_pattern: Optional[dict] = field(default_factory=dict, metadata={"help": "Per-module lra_alpha overrides."})
    quant_refine_iters: int = field(
        default=0, metadata={"help": "Residual quantization refinement iterations for principal/minor init."}
    )
    target_r: Optional[int] = field(
        default=None, metadata={"help": "Average final rank per layer for adaptive allocation; None: off."}
    )
    init_warmup: int = field(default=0, metadata={"help": "Steps before pruning starts."})
    final_warmup: int = field(default=0, metadata={"help": "Steps at the end with a fixed budget."})
    mask_interval: int = field(default=1, metadata={"help": "Steps between two budget allocations."})
    total_step: Optional[int] = field(default=None, metadata={"help": "Total training steps of the schedule."})
    beta1: float = field(default=0.85, metadata={"help": "EMA factor of the sensitivity."})
    beta2: float = field(default=0.85, metadata={"help": "EMA factor of the uncertainty."})

    def __post_init__(self) -> None:
        # A config read back from adapter_config.json arrives with `peft_type` already set; one built by a user
        # does not. A restored adapter gets its weights (and its SVD factors) from the checkpoint, so it must not
        # decompose or change the base weights again (see LRALayer.update_layer).
        self._from_checkpoint = self.peft_type is not None
        super().__post_init__()
        self.peft_type = ensure_peft_type()
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple)):
            self.exclude_modules = set(self.exclude_modules)
        if self.lra_alpha is None and _is_number(self.r):
            self.lra_alpha = self.r
        for name in ("rank_pattern", "alpha_pattern"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), dict):
                raise ValueError(f"LRAConfig.{name}={getattr(self, name)!r} is invalid: use a dict mapping module "
                                 "names (or regexes) to values.")
        self.rank_pattern = dict(self.rank_pattern or {})
        self.alpha_pattern = dict(self.alpha_pattern or {})
        self.validate()

    def validate(self) -> None:
        """Raise a `ValueError` naming the first bad field, its value and what is accepted."""

        def bad(name: str, accepted: str) -> ValueError:
            return ValueError(f"LRAConfig.{name}={getattr(self, name)!r} is invalid: {accepted}.")

        if not _is_int(self.r) or self.r <= 0:
            raise bad("r", "use a positive integer such as 8")
        if not _is_number(self.lra_alpha) or self.lra_alpha <= 0:
            raise bad("lra_alpha", "use a positive number (or None for lra_alpha = r)")
        if not _is_number(self.lra_dropout) or not 0.0 <= self.lra_dropout < 1.0:
            raise bad("lra_dropout", "use a probability in [0, 1)")
        if not any(self.init_weights is c or (isinstance(c, str) and self.init_weights == c)
                   for c in INIT_WEIGHTS_CHOICES):
            raise bad("init_weights", "accepted values are True, False, 'principal', 'minor', 'corda' and 'gradient'")
        if self.corda_method not in CORDA_METHODS:
            raise bad("corda_method", "use 'ipm' (instruction-previewed) or 'kpm' (knowledge-preserving)")
        if not _is_number(self.gradient_scale) or self.gradient_scale <= 0:
            raise bad("gradient_scale", "use a positive number such as 1.0")
        if self.svd_niter is not None:
            if not _is_int(self.svd_niter) or self.svd_niter < 0:
                raise bad("svd_niter", "use None for an exact SVD or a non-negative number of power iterations")
            if self.init_weights in ("minor", "corda"):
                raise bad(
                    "svd_niter",
                    f"a randomized SVD only finds the largest singular values; init_weights={self.init_weights!r} "
                    "needs svd_niter=None (exact SVD)",
                )
        if not _is_number(self.orth_reg_weight) or self.orth_reg_weight < 0:
            raise bad("orth_reg_weight", "use a number >= 0")
        if not isinstance(self.fan_in_fan_out, bool):
            raise bad("fan_in_fan_out", "use True or False")
        if self.bias not in BIAS_CHOICES:
            raise bad("bias", f"accepted values are {', '.join(repr(b) for b in BIAS_CHOICES)}")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str) and not (
                isinstance(value, set) and all(isinstance(v, str) for v in value)
            ):
                raise bad(name, "use None, a regex string, 'all-linear', or a list of module names")
        if self.modules_to_save is not None and not _is_str_list(self.modules_to_save):
            raise bad("modules_to_save", "use None or a list of module names, e.g. ['classifier']")
        if self.layers_pattern is not None and not (isinstance(self.layers_pattern, str) or _is_str_list(
                self.layers_pattern)):
            raise bad("layers_pattern", "use None, a module-list name such as 'layers', or a list of them")
        if not isinstance(self.inference_mode, bool):
            raise bad("inference_mode", "use True or False")
        for name in ("base_model_name_or_path", "revision"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise bad(name, "use None or a string")
        if self.layers_pattern and self.layers_to_transform is None:
            raise bad("layers_pattern", "it needs layers_to_transform as well")
        if self.layers_to_transform is not None:
            indices = [self.layers_to_transform] if _is_int(self.layers_to_transform) else self.layers_to_transform
            if not isinstance(indices, (list, tuple)) or not all(_is_int(i) and i >= 0 for i in indices):
                raise bad("layers_to_transform", "use a non-negative int or a list of them")
        for key, value in self.rank_pattern.items():
            if not _is_int(value) or value <= 0:
                raise ValueError(
                    f"LRAConfig.rank_pattern[{key!r}]={value!r} is invalid: ranks must be positive integers."
                )
        for key, value in self.alpha_pattern.items():
            if not _is_number(value) or value <= 0:
                raise ValueError(
                    f"LRAConfig.alpha_pattern[{key!r}]={value!r} is invalid: lra_alpha values must be positive."
                )
        if not _is_int(self.quant_refine_iters) or self.quant_refine_iters < 0:
            raise bad("quant_refine_iters", "use an integer >= 0 (0 turns refinement off)")
        if self.quant_refine_iters > 0 and self.init_weights not in ("principal", "minor"):
            raise bad("quant_refine_iters", "refinement needs init_weights='principal' or 'minor'")
        if self.target_r is not None and (not _is_int(self.target_r) or not 0 < self.target_r <= self.r):
            raise bad("target_r", f"use None (no allocation) or an integer in [1, r={self.r}]")
        for name in ("init_warmup", "final_warmup"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise bad(name, "use an integer >= 0")
        if not _is_int(self.mask_interval) or self.mask_interval < 1:
            raise bad("mask_interval", "use an integer >= 1")
        if self.total_step is not None:
            if not _is_int(self.total_step) or self.total_step <= 0:
                raise bad("total_step", "use None or a positive number of training steps")
            if self.target_r is not None and self.init_warmup + self.final_warmup >= self.total_step:
                raise bad(
                    "total_step",
                    f"it must exceed init_warmup + final_warmup = {self.init_warmup + self.final_warmup} so that "
                    "there are steps in which to prune",
                )
        for name in ("beta1", "beta2"):
            if not _is_number(getattr(self, name)) or not 0.0 <= getattr(self, name) < 1.0:
                raise bad(name, "use a number in [0, 1)")

    @property
    def decomposes_base(self) -> bool:
        """True when initialisation comes from an SVD of the base weight (or of a task statistic) and the adapter owns
        the residual W − ΔW₀."""
        return self.init_weights in ("principal", "minor", *DATA_AWARE_INITS)

    @property
    def needs_calibration(self) -> bool:
        """True for inits built from `lra_peft.preprocess` statistics. A restored adapter needs none: one whose config
        was read from adapter_config.json, or one that `PeftModel.from_pretrained` / `load_adapter` loads with a config
        the user built (its U₀, λ₀, V₀ come from the checkpoint)."""
        return self.init_weights in DATA_AWARE_INITS and not self._from_checkpoint and not LOADING_LRA_ADAPTER.get()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs) -> LRAConfig:
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        # Remember a local source folder: model cards read the recipe's metrics.json there (see lra_peft.hub).
        source = os.path.join(pretrained_model_name_or_path, subfolder or "")
        config._source_dir = source if os.path.isdir(source) else None
        return config
