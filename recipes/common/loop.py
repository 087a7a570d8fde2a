"""The training loop every recipe and method shares (Accelerate), with per-epoch validation, checkpoints, resuming,
best-epoch selection, early stopping and the warning on a model that learnt nothing."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from lra_peft import lra_param_groups

from .batching import LengthGroupedSampler
from .checkpoint import (
    BEST_STATE_FILE,
    CHECKPOINT_PREFIX,
    EPOCH_CHECKPOINT_PREFIX,
    PROGRESS_FILE,
    find_checkpoint,
    load_trainable_state,
    register_adapter_checkpointing,
    save_checkpoint,
    trainable_state,
)
from .errors import RecipeError
from .methods import rank_allocator
from .schedule import Schedule

# The validation metric --load_best_model_at_end and --early_stopping_patience compare by default, per task (higher is
# better for all): the figure each recipe's result tables report.
MAIN_METRICS = {"ner": "f1", "sentiment": "accuracy", "intent": "accuracy", "recommend": "ndcg_at_10"}
# Below this validation entity F1 a NER model finds almost nothing (the 1-epoch run on 3,400 sentences: 1.4).
USELESS_NER_F1 = 0.10
# An accuracy within this of the majority-class rate is what always answering the most frequent class gets.
USELESS_ACCURACY_MARGIN = 0.02


@dataclass
class TrainResult:
    history: list[dict]
    train_loss: float
    train_runtime_s: float
    train_samples_per_second: float
    completed_steps: int
    epochs_run: int
    eval_metrics: dict = field(default_factory=dict)  # validation metrics of the model kept (best or last epoch)
    train_length: dict = field(default_factory=dict)  # epochs and steps planned and run, and why (metrics.json)
    warnings: list[str] = field(default_factory=list)


EvalFn = Callable[[nn.Module, str], tuple[dict, str]]
LossFn = Callable[[nn.Module, dict], torch.Tensor]


def _batch_examples(batch: dict) -> int:
    for key in ("index", "input_ids", "profile_input_ids"):
        if key in batch:
            return len(batch[key])
    return len(next(iter(batch.values())))


def default_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(**batch).loss


def useless_model_warning(metrics: dict, args: argparse.Namespace, steps: int, epochs: int) -> Optional[str]:
    """One warning when a validation score is near what a model that learnt nothing gets, else None.

    Recognised by the metric names: entity F1 (`f1` with `token_accuracy`, NER) below `USELESS_NER_F1`; `accuracy`
    within `USELESS_ACCURACY_MARGIN` of `majority_class_accuracy`; `ndcg_at_10` at or below `popularity_ndcg_at_10`.
    """
    if "ndcg_at_10" in metrics and "popularity_ndcg_at_10" in metrics:
        if metrics["ndcg_at_10"] > metrics["popularity_ndcg_at_10"]:
            return None
        what = (f"validation NDCG@10 {metrics['ndcg_at_10']:.4f} is no better than ranking by popularity "
                f"({metrics['popularity_ndcg_at_10']:.4f})")
    elif "f1" in metrics and "token_accuracy" in metrics:
        if metrics["f1"] >= USELESS_NER_F1:
            return None
        what = f"validation entity F1 is {100 * metrics['f1']:.2f}: the model finds almost no entities"
    elif "accuracy" in metrics and "majority_class_accuracy" in metrics:
        if metrics["accuracy"] > metrics["majority_class_accuracy"] + USELESS_ACCURACY_MARGIN:
            return None
        what = (f"validation accuracy {metrics['accuracy']:.4f} is at the majority-class rate "
                f"({metrics['majority_class_accuracy']:.4f}): the model does no better than always answering the "
                "most frequent class")
    else:
        return None
    return (f"{what}, after {steps} optimizer steps ({epochs} epoch(s)). Most likely it trained too little for this "
            f"data: raise --num_train_epochs (now {args.num_train_epochs}) or --max_train_steps, or change "
            f"--learning_rate (now {args.learning_rate:g}).")


def _resume_key(args: argparse.Namespace, accelerator: Any) -> dict:
    """The settings a checkpoint is only valid for: they fix the model's shape and which batches were seen."""
    keys = ("method", "r", "target_modules", "model_name_or_path", "per_device_train_batch_size",
            "gradient_accumulation_steps", "seed", "max_train_samples", "group_by_length", "max_length",
            "teacher_model_name_or_path", "distill_alpha", "distill_temperature")
    # A recipe's own flags that change which batches a step sees (instruct.py's --packing) count as well.
    own = {k: getattr(args, k) for k in ("packing",) if hasattr(args, k)}
    return {**{k: getattr(args, k) for k in keys}, **own, "num_processes": accelerator.num_processes}


def _tracker_config(args: argparse.Namespace) -> dict:
    # TensorBoard's hparams accept only scalars and strings.
    # The Hub token is a secret: it must not reach the TensorBoard logs.
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in vars(args).items()
            if k != "hub_token"}


@dataclass
class TrainState:
    """Where the loop is: carried from step to step of `train`, and saved in each checkpoint's progress.json (all but
    the logging window and `best_state`, which a checkpoint keeps in a file of its own)."""

    completed: int = 0  # optimizer steps taken
    start_epoch: int = 0  # the epoch the run starts (or resumes) in
    skip: int = 0  # batches of `start_epoch` seen before the checkpoint resumed from
    history: list[dict] = field(default_factory=list)  # per epoch: {"epoch", "step", **validation metrics}
    loss_sum: float = 0.0
    loss_count: int = 0
    train_time: float = 0.0  # seconds spent in training batches (not in validation or checkpoints)
    samples_seen: int = 0
    best: Optional[dict] = None  # {"epoch", "step", "metric", "value"} of the best validation so far
    best_state: Optional[dict[str, torch.Tensor]] = None  # that epoch's trainable weights
    window_sum: float = 0.0  # training losses since the last log line
    window_count: int = 0

    def progress(self, epoch: int, batches_in_epoch: int, run_key: dict) -> dict:
        """progress.json of a checkpoint taken after `batches_in_epoch` batches of `epoch`."""
        return dict(completed_steps=self.completed, epoch=epoch, batches_in_epoch=batches_in_epoch,
                    history=self.history, run=run_key, loss_sum=self.loss_sum, loss_count=self.loss_count,
                    train_time=self.train_time, samples_seen=self.samples_seen, best=self.best)

    def epochs_without_improvement(self) -> int:
        return 0 if self.best is None else sum(1 for h in self.history if h["step"] > self.best["step"])


@dataclass
class _Run:
    """What stays fixed during one run of `train`: the prepared objects and the settings its steps read."""

    args: argparse.Namespace
    accelerator: Any
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loader: DataLoader
    sampler: LengthGroupedSampler
    allocate: Optional[Callable[[int], None]]
    compute_loss: LossFn
    evaluate: EvalFn
    schedule: Schedule
    output_dir: Path
    run_key: dict
    best_metric: Optional[str]  # compared with --load_best_model_at_end / --early_stopping_patience

    def checkpoint(self, state: TrainState, name: str, epoch: int, batches_in_epoch: int) -> None:
        save_checkpoint(self.accelerator, self.output_dir, name, state.progress(epoch, batches_in_epoch, self.run_key),
                        state.best_state, self.args.checkpoints_total_limit)


def train(args: argparse.Namespace, accelerator: Any, model: nn.Module, train_features: list[dict],
          collate_fn: Callable, evaluate: EvalFn, schedule: Schedule, task: str,
          compute_loss: LossFn = default_loss) -> TrainResult:
    """The training loop every recipe and method shares; evaluates on the validation split after each epoch.

    Checkpoints hold the trainable weights, Accelerate's optimizer / scheduler / RNG state and `progress.json` (epoch,
    batches seen in it, history, best epoch), so a resumed run skips exactly the batches already seen and ends with the
    same weights as an uninterrupted one. With --load_best_model_at_end the model is left with the weights of the
    epoch with the best validation `--metric_for_best_model`, kept in memory and in each checkpoint.
    """
    run = _prepare(args, accelerator, model, train_features, collate_fn, evaluate, schedule, task, compute_loss)
    state = _resume(run) if args.resume_from_checkpoint is not None else TrainState()
    bar = tqdm(total=schedule.max_train_steps, initial=state.completed,
               disable=not accelerator.is_local_main_process, desc=f"{task} ({args.method})")
    stopped_early = False
    try:
        epoch = state.start_epoch
        for epoch in range(state.start_epoch, schedule.num_train_epochs):
            if state.completed >= schedule.max_train_steps:
                break
            if _patience_spent(run, state):  # also when resumed from the checkpoint of the epoch that used it up
                stopped_early = True
                break
            _train_epoch(run, state, epoch, bar)
            _validate(run, state, epoch)
            if args.checkpointing_steps == "epoch":
                run.checkpoint(state, f"{EPOCH_CHECKPOINT_PREFIX}{epoch}", epoch + 1, 0)
        if not state.history or state.history[-1]["step"] != state.completed:
            _validate(run, state, epoch)  # resumed from a checkpoint taken at the very last step
    finally:
        bar.close()  # ends the bar's line, so that an error message starts on its own
    return _result(run, state, stopped_early)


def _prepare(args: argparse.Namespace, accelerator: Any, model: nn.Module, train_features: list[dict],
             collate_fn: Callable, evaluate: EvalFn, schedule: Schedule, task: str, compute_loss: LossFn) -> _Run:
    """The optimizer, scheduler and length-grouped loader, prepared by Accelerate; checkpoint hooks and trackers."""
    lengths = [len(f["input_ids"]) if "input_ids" in f else f.get("length", 1) for f in train_features]
    sampler = LengthGroupedSampler(lengths, args.per_device_train_batch_size, args.seed, group=args.group_by_length)
    # Its own generator keeps DataLoader iterators from drawing on the global RNG (which also drives dropout).
    loader = DataLoader(train_features, batch_size=args.per_device_train_batch_size, sampler=sampler,
                        collate_fn=collate_fn, generator=torch.Generator().manual_seed(args.seed))
    # Biases, LayerNorm and λ vectors are not decayed; SVD-initialised LRA adapters get a scaled U/V learning rate
    # (see lra_peft/optimizer.py); other methods get one learning rate for everything.
    uv_lr_scale = args.uv_lr_scale if args.method == "lra" else 1.0
    optimizer = torch.optim.AdamW(lra_param_groups(model, args.learning_rate, args.weight_decay, uv_lr_scale,
                                                   args.uv_gain), lr=args.learning_rate)
    # Accelerate steps the scheduler once per process on each optimizer step, hence the factor.
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer,
                              num_warmup_steps=args.num_warmup_steps * accelerator.num_processes,
                              num_training_steps=schedule.max_train_steps * accelerator.num_processes)
    allocate = rank_allocator(model, args)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    if math.ceil(len(loader) / args.gradient_accumulation_steps) != schedule.updates_per_epoch:
        raise RuntimeError("schedule planning disagrees with Accelerate's sharded dataloader length")
    register_adapter_checkpointing(accelerator)
    accelerator.print(f"Training {schedule.max_train_steps} steps ({schedule.num_train_epochs} epoch(s) of "
                      f"{schedule.updates_per_epoch}): {schedule.reason}")
    if args.with_tracking:
        accelerator.init_trackers(task, _tracker_config(args))
    # Trainer users write "eval_f1" as well as "f1".
    best_metric = (args.metric_for_best_model or "").removeprefix("eval_") or MAIN_METRICS.get(task)
    if args.load_best_model_at_end and best_metric is None:
        raise RecipeError(f"--load_best_model_at_end: task {task!r} has no default metric; pass --metric_for_best_model")
    return _Run(args, accelerator, model, optimizer, scheduler, loader, sampler, allocate, compute_loss, evaluate,
                schedule, Path(args.output_dir), _resume_key(args, accelerator), best_metric)


def _resume(run: _Run) -> TrainState:
    """The loop's state from `--resume_from_checkpoint`, with the model, optimizer, scheduler and RNG loaded from it;
    a checkpoint of a run with other settings, or one that does not load, is a `RecipeError`."""
    args, accelerator = run.args, run.accelerator
    checkpoint = find_checkpoint(args.resume_from_checkpoint, run.output_dir)
    accelerator.print(f"Resuming from {checkpoint}")
    try:
        progress = json.loads((checkpoint / PROGRESS_FILE).read_text())
        if not isinstance(progress, dict):
            raise ValueError(f"a JSON {type(progress).__name__}, not an object")
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise RecipeError(f"--resume_from_checkpoint: {checkpoint / PROGRESS_FILE} is damaged ({exc}); resume from "
                          "another checkpoint folder, or start again with a new --output_dir") from None
    changed = {k: (v, progress["run"][k]) for k, v in run.run_key.items() if progress.get("run", {}).get(k, v) != v}
    if changed:
        raise RecipeError(f"--resume_from_checkpoint {checkpoint}: it was written by a run with other settings "
                          + ", ".join(f"{k}={old!r} (now {new!r})" for k, (new, old) in changed.items())
                          + "; resume with the same flags and process count, or start a new --output_dir")
    state = TrainState()
    # A bitsandbytes base lists its quantization state (absmax, quant_map, ...) as state-dict entries that a freshly
    # quantized model does not expect; that base is frozen and rebuilt identically from the same checkpoint and init,
    # so the trained weights load and the quantized base's extra entries are ignored.
    quantized = getattr(args, "load_in_4bit", False) or getattr(args, "load_in_8bit", False)
    try:
        accelerator.load_state(str(checkpoint), **({"strict": False} if quantized else {}))
        if args.load_best_model_at_end and progress.get("best") is not None:
            state.best, state.best_state = progress["best"], load_file(str(checkpoint / BEST_STATE_FILE))
    except (RuntimeError, KeyError, FileNotFoundError, ValueError) as exc:
        raise RecipeError(f"--resume_from_checkpoint {checkpoint}: could not load it into this model "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:300]})") from None
    state.completed, state.start_epoch = progress["completed_steps"], progress["epoch"]
    state.skip, state.history = progress["batches_in_epoch"], progress["history"]
    state.loss_sum, state.loss_count = progress["loss_sum"], progress["loss_count"]
    state.train_time, state.samples_seen = progress["train_time"], progress["samples_seen"]
    return state


def _patience_spent(run: _Run, state: TrainState) -> bool:
    patience = run.args.early_stopping_patience
    return patience is not None and state.epochs_without_improvement() >= patience


def _train_epoch(run: _Run, state: TrainState, epoch: int, bar: Any) -> None:
    """One epoch's batches (after those a resumed run has seen), with step checkpoints, up to --max_train_steps."""
    args, accelerator, model = run.args, run.accelerator, run.model
    model.train()
    run.sampler.use_epoch(epoch)
    resuming = epoch == state.start_epoch and state.skip > 0
    batches = accelerator.skip_first_batches(run.loader, state.skip) if resuming else run.loader
    seen = state.skip if resuming else 0
    tick = time.perf_counter()
    for batch in batches:
        with accelerator.accumulate(model):
            loss = run.compute_loss(model, batch)
            # One finiteness check for all processes, so they stop together rather than hang in a collective.
            losses = accelerator.gather(loss.detach().float().reshape(1))
            if not torch.isfinite(losses).all():
                raise RecipeError(
                    f"the training loss became {losses.tolist()} at optimizer step {state.completed + 1} (epoch {epoch}, "
                    f"batch {seen + 1}): the run diverged, and nothing was saved. Lower --learning_rate "
                    f"(now {args.learning_rate:g}) or add --num_warmup_steps")
            accelerator.backward(loss)
            run.optimizer.step()
            if run.allocate is not None and accelerator.sync_gradients:
                run.allocate(state.completed)  # needs this step's gradients: before zero_grad
            run.scheduler.step()
            run.optimizer.zero_grad()
        seen += 1
        state.samples_seen += _batch_examples(batch) * accelerator.num_processes
        value = losses.mean().item()
        state.window_sum, state.window_count = state.window_sum + value, state.window_count + 1
        state.loss_sum, state.loss_count = state.loss_sum + value, state.loss_count + 1
        if not accelerator.sync_gradients:
            continue
        state.completed += 1
        bar.update(1)
        if state.completed % args.logging_steps == 0:
            _log_loss(run, state, bar)
        if isinstance(args.checkpointing_steps, int) and state.completed % args.checkpointing_steps == 0:
            state.train_time += time.perf_counter() - tick
            tick = time.perf_counter()
            run.checkpoint(state, f"{CHECKPOINT_PREFIX}{state.completed}", epoch, seen)
        if state.completed >= run.schedule.max_train_steps:
            break
    state.train_time += time.perf_counter() - tick


def _log_loss(run: _Run, state: TrainState, bar: Any) -> None:
    """The mean training loss since the last log line, to the progress bar and the trackers."""
    mean = state.window_sum / state.window_count
    lr = run.scheduler.get_last_lr()[0]
    if run.accelerator.is_local_main_process:
        bar.write(f"step {state.completed}: loss {mean:.4f}, lr {lr:.3g}")
    if run.args.with_tracking:
        run.accelerator.log({"train_loss": mean, "learning_rate": lr}, step=state.completed)
    state.window_sum, state.window_count = 0.0, 0


def _validate(run: _Run, state: TrainState, epoch: int) -> None:
    """Evaluate on the validation split, record it in the history, and keep the weights when it is the best so far."""
    accelerator = run.accelerator
    metrics, _ = run.evaluate(accelerator.unwrap_model(run.model), "validation")
    accelerator.print(f"epoch {epoch} (step {state.completed}) validation: "
                      + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
    state.history.append({"epoch": epoch, "step": state.completed, **metrics})
    if run.args.with_tracking:
        accelerator.log({f"eval_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))},
                        step=state.completed)
    if not run.args.load_best_model_at_end:
        return
    name = run.best_metric
    if not isinstance(metrics.get(name), (int, float)):
        names = [k for k, v in metrics.items() if isinstance(v, (int, float))]
        raise RecipeError(f"--metric_for_best_model {name}: the validation metrics are {names}")
    if state.best is None or metrics[name] > state.best["value"]:  # ties keep the earlier epoch, as Trainer
        state.best = {"epoch": epoch, "step": state.completed, "metric": name, "value": metrics[name]}
        state.best_state = trainable_state(accelerator.unwrap_model(run.model))


def _result(run: _Run, state: TrainState, stopped_early: bool) -> TrainResult:
    """The end of the loop: the best epoch's weights back in the model (--load_best_model_at_end), how long it
    trained and why, and the warning when the kept model's validation score is what a model that learnt nothing gets."""
    args, accelerator, schedule = run.args, run.accelerator, run.schedule
    keep_best, best, history = args.load_best_model_at_end, state.best, state.history
    kept = history[-1]
    if keep_best and best is not None and best["step"] != state.completed:
        load_trainable_state(accelerator.unwrap_model(run.model), state.best_state, "the best epoch's weights")
        kept = next(h for h in history if h["step"] == best["step"])
        accelerator.print(f"Loaded the best model: epoch {best['epoch']} (step {best['step']}), validation "
                          f"{run.best_metric} {best['value']:.4f} (last epoch: {history[-1][run.best_metric]:.4f})")
    eval_metrics = {k: v for k, v in kept.items() if k not in ("epoch", "step")}
    epochs_run = len(history)
    train_length = {"planned_epochs": schedule.num_train_epochs, "planned_steps": schedule.max_train_steps,
                    "steps_per_epoch": schedule.updates_per_epoch, "reason": schedule.reason,
                    "epochs_run": epochs_run, "steps_run": state.completed, "early_stopped": stopped_early,
                    "best": best if keep_best else None}
    if stopped_early:
        waited = state.epochs_without_improvement()
        train_length["reason"] += (f"; stopped early after {waited} epoch(s) without a better validation "
                                   f"{run.best_metric} (--early_stopping_patience {args.early_stopping_patience})")
        accelerator.print(f"Stopped early at epoch {history[-1]['epoch']}: {waited} epoch(s) without a better "
                          f"validation {run.best_metric}")
    warning = useless_model_warning(eval_metrics, args, state.completed, epochs_run)
    if warning is not None and accelerator.is_main_process:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    return TrainResult(history=history, train_loss=state.loss_sum / max(1, state.loss_count),
                       train_runtime_s=state.train_time,
                       train_samples_per_second=state.samples_seen / state.train_time if state.train_time > 0 else 0.0,
                       completed_steps=state.completed, epochs_run=epochs_run, eval_metrics=eval_metrics,
                       train_length=train_length, warnings=[warning] if warning else [])
