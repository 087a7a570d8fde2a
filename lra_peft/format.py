"""The LRA adapter format: what every reader and writer of LRA adapters must agree on, in one place.

A saved adapter folder holds `adapter_config.json` (`CONFIG_NAME`) and `adapter_model.safetensors`
(`SAFETENSORS_WEIGHTS_NAME`; a pickle `adapter_model.bin`, `WEIGHTS_NAME`, only on request), with PEFT's names. Per
adapted module `<path>` (relative to the base model) the weights file holds

    base_model.model.<path>.lra_U       out × r
    base_model.model.<path>.lra_lambda  r
    base_model.model.<path>.lra_V       in × r
    base_model.model.<path>.lra_U0 / .lra_lambda0 / .lra_V0   ΔW₀'s factors ("principal", "minor", "corda", "gradient")

in the out × in matrix view of the layer (`matrix_dims`); inside a live model PEFT appends `.<adapter_name>`. The
module's r and lra_alpha are `config.r` / `config.lra_alpha` unless `rank_pattern` / `alpha_pattern` name it
(`module_rank_alpha`), and s = lra_alpha / r.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from peft.tuners.tuners_utils import _get_in_out_features
from peft.utils import resolve_quantization_backend
from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from peft.utils.other import get_pattern_key
from torch import nn
from transformers.pytorch_utils import Conv1D

__all__ = [
    "ALL_FACTORS",
    "CONFIG_NAME",
    "FACTORS",
    "INIT_FACTORS",
    "KEY_PREFIX",
    "METRICS_NAME",
    "SAFETENSORS_WEIGHTS_NAME",
    "TASKS",
    "WEIGHTS_NAME",
    "Task",
    "exact_pattern_key",
    "is_factor_key",
    "layer_type",
    "matrix_dims",
    "module_rank_alpha",
    "split_factor_key",
]

# What the recipes write next to an adapter: the metrics that model cards list.
METRICS_NAME = "metrics.json"
# The prefix PEFT puts in front of the tuner's module names in a saved adapter (and a PeftModel's state dict).
KEY_PREFIX = "base_model.model."
FACTORS = ("lra_U", "lra_lambda", "lra_V")  # trained
INIT_FACTORS = ("lra_U0", "lra_lambda0", "lra_V0")  # ΔW₀, buffers of SVD-initialised adapters
ALL_FACTORS = FACTORS + INIT_FACTORS


# ------------------------------------------------------------------------------------------------ factor keys
def split_factor_key(key: str, adapter_name: Optional[str] = None) -> Optional[tuple[str, str]]:
    """`(module, factor)` of the state-dict key `<module>.<factor>` (as in a saved file), or, with `adapter_name`,
    of `<module>.<factor>.<adapter_name>` (as inside a model); None for any other key. `module` keeps any prefix
    (`base_model.model.`) the key has, and is "" for a bare `<factor>`."""
    if adapter_name is not None:
        suffix = f".{adapter_name}"
        if not key.endswith(suffix):
            return None
        key = key[: -len(suffix)]
    module, _, factor = key.rpartition(".")
    return (module, factor) if factor in ALL_FACTORS else None


def is_factor_key(key: str) -> bool:
    """Whether `key` names an LRA factor of some module, with or without an adapter name after it."""
    for candidate in (key, key.rpartition(".")[0]):
        parsed = split_factor_key(candidate)
        if parsed is not None and parsed[0]:
            return True
    return False


# ------------------------------------------------------------------------------------- per-module r and alpha
def exact_pattern_key(name: str, names: object) -> str:
    """A rank_pattern / alpha_pattern key that matches module `name` alone.

    PEFT matches a key as a dotted suffix, so `model.layers.0.mlp` would also match `vision.model.layers.0.mlp`; the
    key is anchored with `^` where such a longer name is among `names` (the modules that get a key).
    """
    if any(other != name and other.endswith("." + name) for other in names):
        return "^" + name
    return name


def module_rank_alpha(config: object, key: str) -> tuple[int, float]:
    """`(r, lra_alpha)` of module `key`: its `rank_pattern` / `alpha_pattern` entry, else the config's own, resolved
    as PEFT resolves LoRA's patterns (`get_pattern_key`)."""
    r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), key), config.r)
    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), key), config.lra_alpha)
    return r, alpha


# ------------------------------------------------------------------------------------------------ layer types
def layer_type(module: nn.Module) -> Optional[str]:
    """Which LRA layer class adapts `module` ("linear", "conv1d", "embedding", "conv2d"), or None if none does."""
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, Conv1D):
        return "conv1d"
    if isinstance(module, nn.Linear):
        return "linear"
    backend = resolve_quantization_backend(module)
    if backend is not None and backend.layer_type == "linear":
        return "linear"
    return None


def matrix_dims(module: nn.Module, kind: str) -> tuple[int, int]:
    """`(in, out)` of the out × in matrix view of `module`'s weight, for its `layer_type` `kind`.

    A Conv2d's weight is out_channels × (in_channels / groups) × kh × kw, so its matrix view has
    in_channels / groups · kh · kw columns (LRA itself adapts groups=1 only; export checks adapters against any base).
    """
    if kind == "embedding":
        return module.num_embeddings, module.embedding_dim
    if kind == "conv2d":
        kh, kw = module.kernel_size
        return module.in_channels // module.groups * kh * kw, module.out_channels
    in_features, out_features = _get_in_out_features(module)
    return in_features, out_features


# ----------------------------------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class Task:
    """How a PEFT task type is named and loaded: in words, as a Hub pipeline tag, and by the Transformers /
    PEFT Auto classes (`AutoPeftModelFor<task>` builds its base with `auto_class`)."""

    description: str
    pipeline_tag: str
    auto_class: str
    auto_peft_class: str


TASKS: dict[str, Task] = {
    "SEQ_CLS": Task("sequence classification", "text-classification", "AutoModelForSequenceClassification",
                    "AutoPeftModelForSequenceClassification"),
    "TOKEN_CLS": Task("token classification", "token-classification", "AutoModelForTokenClassification",
                      "AutoPeftModelForTokenClassification"),
    "CAUSAL_LM": Task("causal language modelling", "text-generation", "AutoModelForCausalLM",
                      "AutoPeftModelForCausalLM"),
    "SEQ_2_SEQ_LM": Task("sequence-to-sequence generation", "text2text-generation", "AutoModelForSeq2SeqLM",
                         "AutoPeftModelForSeq2SeqLM"),
    "QUESTION_ANS": Task("extractive question answering", "question-answering", "AutoModelForQuestionAnswering",
                         "AutoPeftModelForQuestionAnswering"),
    "FEATURE_EXTRACTION": Task("feature extraction", "feature-extraction", "AutoModel",
                               "AutoPeftModelForFeatureExtraction"),
}
