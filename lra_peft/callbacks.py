"""`LRARankCallback`: adaptive rank allocation under `transformers.Trainer`, which never calls `update_and_allocate`."""

from __future__ import annotations

import logging
import warnings
from typing import Any, Optional

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .model import LRAModel

logger = logging.getLogger(__name__)


def _find_lra_model(model: Optional[nn.Module]) -> LRAModel:
    tuner = getattr(model, "base_model", None)
    if isinstance(model, LRAModel):
        return model
    if isinstance(tuner, LRAModel):
        return tuner
    raise TypeError(
        f"LRARankCallback needs the Trainer's model to be a PeftModel with LRA adapters (get_peft_model(model, "
        f"lra_peft.LRAConfig(...))), got {type(model).__name__}."
    )


class LRARankCallback(TrainerCallback):
    """Runs LRA's adaptive rank allocation (`LRAConfig.target_r`) during `Trainer.train()`.

    After every optimizer step, while the gradients are still there, it calls
    `model.update_and_allocate(state.global_step + 1)` (steps whose fp16 gradients overflowed are skipped). At the start
    of training it fills `LRAConfig.total_step` from the Trainer's `max_steps` when it is None, and warns once if both
    are set and disagree.

    Example:
        >>> trainer = Trainer(model=peft_model, args=args, train_dataset=ds, callbacks=[lra_peft.LRARankCallback()])
    """

    def __init__(self) -> None:
        self._tuner: Optional[LRAModel] = None
        self._warned_mismatch = False

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None, **kwargs: Any
    ) -> None:
        tuner = _find_lra_model(model)
        adapters = tuner._allocating_adapters()
        if not adapters:
            self._tuner = None
            warnings.warn(
                "LRARankCallback: no active trainable LRA adapter sets LRAConfig.target_r, so there is no rank to "
                "allocate and the callback does nothing.",
                stacklevel=2,
            )
            return
        self._tuner = tuner
        for name in adapters:
            config = tuner.peft_config[name]
            if config.total_step is None:
                config.total_step = state.max_steps
                try:
                    config.validate()
                except ValueError:
                    config.total_step = None
                    raise
                logger.info("LRARankCallback: LRAConfig.total_step of adapter %r set to max_steps=%d.", name,
                            state.max_steps)
            elif config.total_step != state.max_steps and not self._warned_mismatch:
                self._warned_mismatch = True
                end = "stops before the budget reaches" if state.max_steps < config.total_step - config.final_warmup \
                    else "reaches"
                warnings.warn(
                    f"LRAConfig.total_step={config.total_step} of adapter {name!r} differs from the Trainer's "
                    f"max_steps={state.max_steps}: the rank schedule is laid out over total_step, so training {end} "
                    f"target_r={config.target_r} at a different point than its end. Set total_step=max_steps (or "
                    "leave it None and the callback sets it).",
                    stacklevel=2,
                )

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None,
        optimizer: Any = None, **kwargs: Any,
    ) -> None:
        if self._tuner is None:
            return
        # An fp16 step skipped by the loss scaler has inf/NaN gradients: they would poison the importance scores.
        if getattr(optimizer, "step_was_skipped", False):
            return
        # Trainer increments global_step after this event: + 1 is the number of optimizer steps taken.
        self._tuner.update_and_allocate(state.global_step + 1)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._tuner is None:
            return
        for name, allocator in self._tuner._rank_allocators().items():
            if not allocator.finalized:
                warnings.warn(
                    f"Training ended at step {state.global_step}, before adaptive rank allocation of adapter {name!r} "
                    f"reached its final budget at total_step - final_warmup = {allocator.final_step}: the adapter "
                    f"keeps {allocator.num_alive} ranks in total instead of {allocator.target_budget}.",
                    stacklevel=2,
                )
