"""PEFT's own LoRA initialisations in the recipes (`--method lora --init_lora_weights pissa|corda|lora_ga`), so that
LRA is compared with the best LoRA that PEFT offers, not only with its default init.

PiSSA, CorDA and LoRA-GA move part of W into the adapter (W = W_res + B₀A₀), so the trained adapter is only right on
top of W_res. PEFT's answer, used here: keep the initial adapter (saved right after `get_peft_model`) and save with
`path_initial_model_for_weight_conversion`, which writes ΔW = BA − B₀A₀ as an ordinary rank-2r LoRA for the
*original* base (`PeftModel.save_pretrained`). Checkpoints hold the trained factors only; a resumed run rebuilds the
same W_res from the same init, as LRA's own data-aware inits do.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import torch
from peft import LoraConfig, LoraGAConfig, get_peft_model_state_dict, preprocess_loraga
from peft.tuners.lora.config import CordaConfig
from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import RecipeError

LORA_INITS = ("true", "pissa", "corda", "lora_ga")
# Inits whose adapter holds part of W at step 0 (so saving converts), and those that read calibration batches.
MUTATING_LORA_INITS = ("pissa", "corda", "lora_ga")
DATA_AWARE_LORA_INITS = ("corda", "lora_ga")
_INITIAL_DIRS: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


def lora_init_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """`LoraConfig` keyword arguments of `--init_lora_weights` (PEFT's defaults for each init's own settings:
    CorDA's instruction-previewed mode, LoRA-GA's "ArB2r" directions with "stable" scale)."""
    init = args.init_lora_weights
    if init == "true":
        return {}
    kwargs: dict[str, Any] = {"init_lora_weights": init}
    if init == "corda":
        kwargs["corda_config"] = CordaConfig(corda_method="ipm")
    if init == "lora_ga":
        kwargs["lora_ga_config"] = LoraGAConfig()
    return kwargs


def preprocess_lora(model: nn.Module, config: LoraConfig, run_model: Any) -> None:
    """PEFT's preprocessing for a data-aware LoRA init: `run_model()` runs the calibration batches (forward for
    CorDA; forward and backward for LoRA-GA)."""
    if config.init_lora_weights == "corda":
        try:  # imported here: PEFT 0.21's corda.py needs `attrs`, which PEFT does not declare (pyproject's recipes extra does)
            from peft.tuners.lora.corda import preprocess_corda
        except ImportError as exc:
            raise RecipeError(f"--init_lora_weights corda: PEFT's CorDA could not be imported ({exc}); "
                              "`pip install attrs` (or `pip install -e '.[recipes]'`)") from None
        with _vectors_as_sequences(model, config):
            preprocess_corda(model, config, run_model=run_model)
    else:
        preprocess_loraga(model, config, train_step=run_model)


@contextlib.contextmanager
def _vectors_as_sequences(model: nn.Module, config: LoraConfig) -> Iterator[None]:
    """PEFT's CorDA hook takes each target's input as one (tokens × features) matrix (it squeezes a batch of one);
    a layer fed one vector per sequence (BERT's pooler sees the [CLS] token) would give it a vector. Such an input
    is passed as a one-token sequence while calibrating, and the output shaped back."""
    def as_sequence(module: nn.Module, inputs: tuple) -> Optional[tuple]:
        x = inputs[0]
        return (x.unsqueeze(0), *inputs[1:]) if x.dim() == 2 and x.size(0) == 1 else None

    def shaped_back(module: nn.Module, inputs: tuple, output: torch.Tensor) -> Optional[torch.Tensor]:
        return output.squeeze(0) if inputs[0].dim() == 3 and output.dim() == 3 and output.size(0) == 1 \
            and output.size(1) == 1 else None

    from peft.tuners.lora.corda import target_modules as corda_targets

    handles = []
    for _, module in corda_targets(model, config):
        handles += [module.register_forward_pre_hook(as_sequence), module.register_forward_hook(shaped_back)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def keep_initial_adapter(peft_model: nn.Module) -> None:
    """Save the freshly initialised adapter of a PiSSA / CorDA / LoRA-GA model to a private temporary folder (removed
    with the model or at exit), for `save_adapter`. Other models are left alone."""
    config = peft_model.peft_config["default"]
    init = getattr(config, "init_lora_weights", None)
    if not isinstance(config, LoraConfig) or init not in MUTATING_LORA_INITS:
        return
    folder = tempfile.mkdtemp(prefix="lra-peft-initial-lora-")
    # As PEFT's PiSSA example: the initial adapter is saved as a plain LoRA (init True) so that loading it for the
    # conversion does not run the init again.
    config.init_lora_weights = True
    try:
        peft_model.save_pretrained(folder, save_embedding_layers=False)
    finally:
        config.init_lora_weights = init
    _INITIAL_DIRS[peft_model] = folder
    weakref.finalize(peft_model, shutil.rmtree, folder, True)


def save_adapter(peft_model: nn.Module, folder: Path, **kwargs: Any) -> None:
    """`peft_model.save_pretrained(folder, safe_serialization=True, **kwargs)`; a PiSSA / CorDA / LoRA-GA adapter is
    saved converted, as the LoRA it amounts to on the original base.

    PEFT's conversion keeps only the lora_A / lora_B tensors and so drops a trained task head (`modules_to_save`,
    e.g. the classifier): those are added back from the adapter's own state dict, unchanged.
    """
    initial = _INITIAL_DIRS.get(peft_model)
    if initial is None:
        peft_model.save_pretrained(str(folder), safe_serialization=True, **kwargs)
        return
    peft_model.save_pretrained(str(folder), safe_serialization=True, path_initial_model_for_weight_conversion=initial,
                               **kwargs)
    weights = Path(folder) / SAFETENSORS_WEIGHTS_NAME
    converted = load_file(weights)
    own = get_peft_model_state_dict(peft_model, state_dict=kwargs.get("state_dict"),
                                    save_embedding_layers=kwargs.get("save_embedding_layers", "auto"))
    heads = {k: v.detach().contiguous() for k, v in own.items() if k not in converted and ".lora_" not in k}
    if heads:
        save_file({**converted, **heads}, str(weights), metadata={"format": "pt"})


def is_converted_on_save(peft_model: nn.Module) -> bool:
    return peft_model in _INITIAL_DIRS
