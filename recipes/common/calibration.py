"""Calibration batches for the task-aware inits: LRA's `--init_weights corda|gradient` (`lra_peft.preprocess`) and
LoRA's `--init_lora_weights corda|lora_ga` (PEFT's `preprocess_corda` / `preprocess_loraga`).

`--calibration_samples N` examples are drawn from the training split only (with the run's `--seed`, from a generator
of their own, so the global RNG that drives dropout and the data order is untouched) and run through the model before
`get_peft_model`, in batches of `--per_device_train_batch_size`. For "gradient" / "lora_ga" each batch's loss is the
recipe's own training loss (`compute_loss`), so G is the gradient of the task that will be trained.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Optional

import torch
from peft import LoraConfig
from torch import nn

import lra_peft
from lra_peft.config import DATA_AWARE_INITS

from .lora_inits import preprocess_lora

__all__ = ["DATA_AWARE_INITS", "DEFAULT_CALIBRATION_SAMPLES", "CalibrationData", "calibrate", "calibration_subset"]

DEFAULT_CALIBRATION_SAMPLES = 256


@dataclass
class CalibrationData:
    """What a recipe hands `apply_method` for a task-aware init.

    features: the training examples (as the train loop gets them; an `index` key is dropped);
    collate_fn: the training collator; compute_loss(model, batch) -> loss: the training loss;
    wrap: turns the adapted module into the model `compute_loss` takes (the recommender's bi-encoder), or None;
    sequences(batch) -> the adapted module's inputs for each sequence of a batch alone, for tasks whose example is
    several sequences (the recommender's profile and movies), or None.
    """

    features: list[dict]
    collate_fn: Callable[[list[dict]], dict]
    compute_loss: Callable[[nn.Module, dict], torch.Tensor]
    wrap: Optional[Callable[[nn.Module], nn.Module]] = None
    sequences: Optional[Callable[[dict], Iterable[dict]]] = None


def calibration_subset(features: list[dict], samples: int, seed: int) -> list[dict]:
    """`samples` examples of `features` (all of them if fewer), drawn without replacement with `seed`."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(features), generator=generator)[: min(samples, len(features))].tolist()
    return [{k: v for k, v in features[i].items() if k != "index"} for i in order]


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def calibrate(model: nn.Module, config: Any, args: argparse.Namespace, data: CalibrationData) -> None:
    """Run the preprocessing of `config`'s init (LRA's or PEFT's LoRA's) on `--calibration_samples` training examples."""
    subset = calibration_subset(data.features, args.calibration_samples, args.seed)
    device = next(model.parameters()).device
    loss_model = data.wrap(model) if data.wrap is not None else model
    kind = config.init_lora_weights if isinstance(config, LoraConfig) else config.init_weights
    # PEFT's CorDA hook reads one sequence per forward pass (it squeezes the batch dimension).
    one_sequence = kind == "corda" and isinstance(config, LoraConfig)
    batch_size = 1 if one_sequence else args.per_device_train_batch_size

    def run_model() -> None:
        for start in range(0, len(subset), batch_size):
            batch = _to_device(data.collate_fn(subset[start:start + batch_size]), device)
            if one_sequence and data.sequences is not None:
                with torch.no_grad():
                    for inputs in data.sequences(batch):
                        model(**inputs)
                continue
            loss = data.compute_loss(loss_model, batch)
            if kind in ("gradient", "lora_ga"):
                loss.backward()

    if isinstance(config, LoraConfig):
        preprocess_lora(model, config, run_model)
    else:
        lra_peft.preprocess(model, config, run_model)
