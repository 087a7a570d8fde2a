"""The training loop every recipe and method shares (Accelerate), with per-epoch validation, checkpoints, resuming,
best-epoch selection, early stopping and the warning on a model that learnt nothing."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import transformers
from accelerate import Accelerator
from accelerate.utils import set_seed
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
    check_output_dir,
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


def check_trackers(args: argparse.Namespace, accelerator: Any) -> None:
    """With --with_tracking, every tracker --report_to names must be installed ('all': at least one), as Accelerate
    otherwise drops it silently and the run logs nothing."""
    if not args.with_tracking:
        return
    wanted = [name.strip() for name in str(args.report_to).split(",") if name.strip()]
    active = {str(getattr(t, "value", t)) for t in accelerator.log_with}
    packages = {"tensorboard": "tensorboard", "wandb": "wandb", "comet_ml": "comet-ml", "mlflow": "mlflow",
                "aim": "aim", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab", "trackio": "trackio"}
    if "all" in wanted:
        if not active:
            raise RecipeError("--with_tracking --report_to all: no tracker package is installed; `pip install "
                              "tensorboard` (or wandb, mlflow, ...) or drop --with_tracking")
        return
    missing = [name for name in wanted if name not in active]
    if missing:
        install = " ".join(packages.get(name, name) for name in missing)
        raise RecipeError(f"--with_tracking --report_to {args.report_to}: {', '.join(missing)} is not installed, so "
                          f"nothing would be logged; `pip install {install}`, pick an installed tracker with "
                          "--report_to, or drop --with_tracking")


def make_accelerator(args: argparse.Namespace) -> Any:
    """Accelerate's `Accelerator` for this run, after checking `--output_dir` (before any model is loaded)."""
    check_output_dir(args)
    kwargs: dict[str, Any] = {"gradient_accumulation_steps": args.gradient_accumulation_steps}
    if args.with_tracking:
        kwargs.update(log_with=[name.strip() for name in str(args.report_to).split(",") if name.strip()],
                      project_dir=args.output_dir)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    has_device = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    # `accelerate launch --multi_gpu --num_processes N` on a machine without GPUs starts N processes that Accelerate
    # would run as N unrelated single-process jobs; cpu=True makes them one gloo process group instead.
    try:
        accelerator = Accelerator(cpu=world_size > 1 and not has_device, **kwargs)
    except ValueError as exc:
        if "logging capability" not in str(exc):
            raise
        raise RecipeError(f"--report_to {args.report_to}: {exc}") from None
    # Accelerate (1.15, state.py) selects FSDP or DeepSpeed only for multi-GPU (or other accelerator) process groups;
    # on CPUs a config asking for them would silently run plain data parallelism with the whole model per process.
    for variable, engine in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DEEPSPEED")):
        if os.environ.get(variable, "false").lower() == "true" and accelerator.distributed_type != engine:
            raise RecipeError(f"the Accelerate config asks for {engine} but Accelerate runs this job as "
                              f"{accelerator.distributed_type.value} ({accelerator.device.type}): Accelerate shards models "
                              "only on GPUs (or other accelerators). On CPUs use recipes/configs/ddp.yaml or "
                              "`accelerate launch --multi_gpu --num_processes N` (see docs/distributed.md)")
    check_trackers(args, accelerator)
    if accelerator.num_processes != world_size:
        raise RecipeError(f"the launcher started {world_size} processes but Accelerate sees {accelerator.num_processes}"
                          "; on CPUs use `accelerate launch --multi_gpu --num_processes N` (see docs/recipes.md)")
    set_seed(args.seed)
    if not accelerator.is_local_main_process:
        transformers.utils.logging.set_verbosity_error()
    return accelerator


def _tracker_config(args: argparse.Namespace) -> dict:
    # TensorBoard's hparams accept only scalars and strings.
    # The Hub token is a secret: it must not reach the TensorBoard logs.
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in vars(args).items()
            if k != "hub_token"}


def _resume_key(args: argparse.Namespace, accelerator: Any) -> dict:
    """The settings a checkpoint is only valid for: they fix the model's shape and which batches were seen."""
    keys = ("method", "r", "target_modules", "model_name_or_path", "per_device_train_batch_size",
            "gradient_accumulation_steps", "seed", "max_train_samples", "group_by_length", "max_length",
            "teacher_model_name_or_path", "distill_alpha", "distill_temperature")
    # A recipe's own flags that change which batches a step sees (instruct.py's --packing) count as well.
    own = {k: getattr(args, k) for k in ("packing",) if hasattr(args, k)}
    return {**{k: getattr(args, k) for k in keys}, **own, "num_processes": accelerator.num_processes}


def train(args: argparse.Namespace, accelerator: Any, model: nn.Module, train_features: list[dict],
          collate_fn: Callable, evaluate: EvalFn, schedule: Schedule, task: str,
          compute_loss: LossFn = default_loss) -> TrainResult:
    """The training loop every recipe and method shares; evaluates on the validation split after each epoch.

    Checkpoints hold the trainable weights, Accelerate's optimizer / scheduler / RNG state and `progress.json` (epoch,
    batches seen in it, history, best epoch), so a resumed run skips exactly the batches already seen and ends with the
    same weights as an uninterrupted one. With --load_best_model_at_end the model is left with the weights of the
    epoch with the best validation `--metric_for_best_model`, kept in memory and in each checkpoint.
    """
    output_dir = Path(args.output_dir)
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

    keep_best = args.load_best_model_at_end
    # Trainer users write "eval_f1" as well as "f1".
    best_metric = (args.metric_for_best_model or "").removeprefix("eval_") or MAIN_METRICS.get(task)
    if keep_best and best_metric is None:
        raise RecipeError(f"--load_best_model_at_end: task {task!r} has no default metric; pass --metric_for_best_model")
    best: Optional[dict] = None  # {"epoch", "step", "metric", "value"} of the best validation so far
    best_state: Optional[dict[str, torch.Tensor]] = None

    completed, start_epoch, skip, history = 0, 0, 0, []
    run_key = _resume_key(args, accelerator)
    loss_sum, loss_count, train_time, samples_seen = 0.0, 0, 0.0, 0
    if args.resume_from_checkpoint is not None:
        checkpoint = find_checkpoint(args.resume_from_checkpoint, output_dir)
        accelerator.print(f"Resuming from {checkpoint}")
        try:
            progress = json.loads((checkpoint / PROGRESS_FILE).read_text())
            if not isinstance(progress, dict):
                raise ValueError(f"a JSON {type(progress).__name__}, not an object")
        except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
            raise RecipeError(f"--resume_from_checkpoint: {checkpoint / PROGRESS_FILE} is damaged ({exc}); resume from "
                              "another checkpoint folder, or start again with a new --output_dir") from None
        changed = {k: (v, progress["run"][k]) for k, v in _resume_key(args, accelerator).items()
                   if progress.get("run", {}).get(k, v) != v}
        if changed:
            raise RecipeError(f"--resume_from_checkpoint {checkpoint}: it was written by a run with other settings "
                              + ", ".join(f"{k}={old!r} (now {new!r})" for k, (new, old) in changed.items())
                              + "; resume with the same flags and process count, or start a new --output_dir")
        # A bitsandbytes base lists its quantization state (absmax, quant_map, ...) as state-dict entries that a
        # freshly quantized model does not expect; that base is frozen and rebuilt identically from the same
        # checkpoint and init, so the trained weights load and the quantized base's extra entries are ignored.
        quantized = getattr(args, "load_in_4bit", False) or getattr(args, "load_in_8bit", False)
        try:
            accelerator.load_state(str(checkpoint), **({"strict": False} if quantized else {}))
            if keep_best and progress.get("best") is not None:
                best, best_state = progress["best"], load_file(str(checkpoint / BEST_STATE_FILE))
        except (RuntimeError, KeyError, FileNotFoundError, ValueError) as exc:
            raise RecipeError(f"--resume_from_checkpoint {checkpoint}: could not load it into this model "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:300]})") from None
        completed, start_epoch, skip = progress["completed_steps"], progress["epoch"], progress["batches_in_epoch"]
        history = progress["history"]
        loss_sum, loss_count = progress["loss_sum"], progress["loss_count"]
        train_time, samples_seen = progress["train_time"], progress["samples_seen"]

    def validate(epoch: int) -> None:
        nonlocal best, best_state
        metrics, _ = evaluate(accelerator.unwrap_model(model), "validation")
        accelerator.print(f"epoch {epoch} (step {completed}) validation: "
                          + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
        history.append({"epoch": epoch, "step": completed, **metrics})
        if args.with_tracking:
            accelerator.log({f"eval_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=completed)
        if keep_best:
            if not isinstance(metrics.get(best_metric), (int, float)):
                names = [k for k, v in metrics.items() if isinstance(v, (int, float))]
                raise RecipeError(f"--metric_for_best_model {best_metric}: the validation metrics are {names}")
            if best is None or metrics[best_metric] > best["value"]:  # ties keep the earlier epoch, as Trainer
                best = {"epoch": epoch, "step": completed, "metric": best_metric, "value": metrics[best_metric]}
                best_state = trainable_state(accelerator.unwrap_model(model))

    def epochs_without_improvement() -> int:
        return 0 if best is None else sum(1 for h in history if h["step"] > best["step"])

    def patience_spent() -> bool:
        return args.early_stopping_patience is not None and epochs_without_improvement() >= args.early_stopping_patience

    def progress_at(epoch: int, batches_in_epoch: int) -> dict:
        return dict(completed_steps=completed, epoch=epoch, batches_in_epoch=batches_in_epoch, history=history,
                    run=run_key, loss_sum=loss_sum, loss_count=loss_count, train_time=train_time,
                    samples_seen=samples_seen, best=best)

    bar = tqdm(total=schedule.max_train_steps, initial=completed, disable=not accelerator.is_local_main_process,
               desc=f"{task} ({args.method})")
    stopped_early = False
    try:
        window_sum, window_count = 0.0, 0
        epoch = start_epoch
        for epoch in range(start_epoch, schedule.num_train_epochs):
            if completed >= schedule.max_train_steps:
                break
            if patience_spent():  # also when resumed from the checkpoint of the epoch that used it up
                stopped_early = True
                break
            model.train()
            sampler.use_epoch(epoch)
            resuming = epoch == start_epoch and skip > 0
            batches = accelerator.skip_first_batches(loader, skip) if resuming else loader
            seen = skip if resuming else 0
            tick = time.perf_counter()
            for batch in batches:
                with accelerator.accumulate(model):
                    loss = compute_loss(model, batch)
                    # One finiteness check for all processes, so they stop together rather than hang in a collective.
                    losses = accelerator.gather(loss.detach().float().reshape(1))
                    if not torch.isfinite(losses).all():
                        raise RecipeError(
                            f"the training loss became {losses.tolist()} at optimizer step {completed + 1} (epoch {epoch}, "
                            f"batch {seen + 1}): the run diverged, and nothing was saved. Lower --learning_rate "
                            f"(now {args.learning_rate:g}) or add --num_warmup_steps")
                    accelerator.backward(loss)
                    optimizer.step()
                    if allocate is not None and accelerator.sync_gradients:
                        allocate(completed)  # needs this step's gradients: before zero_grad
                    scheduler.step()
                    optimizer.zero_grad()
                seen += 1
                samples_seen += _batch_examples(batch) * accelerator.num_processes
                value = losses.mean().item()
                window_sum, window_count = window_sum + value, window_count + 1
                loss_sum, loss_count = loss_sum + value, loss_count + 1
                if not accelerator.sync_gradients:
                    continue
                completed += 1
                bar.update(1)
                if completed % args.logging_steps == 0:
                    mean = window_sum / window_count
                    if accelerator.is_local_main_process:
                        bar.write(f"step {completed}: loss {mean:.4f}, lr {scheduler.get_last_lr()[0]:.3g}")
                    if args.with_tracking:
                        accelerator.log({"train_loss": mean, "learning_rate": scheduler.get_last_lr()[0]}, step=completed)
                    window_sum, window_count = 0.0, 0
                if isinstance(args.checkpointing_steps, int) and completed % args.checkpointing_steps == 0:
                    train_time += time.perf_counter() - tick
                    tick = time.perf_counter()
                    save_checkpoint(accelerator, output_dir, f"{CHECKPOINT_PREFIX}{completed}", progress_at(epoch, seen),
                                    best_state, args.checkpoints_total_limit)
                if completed >= schedule.max_train_steps:
                    break
            train_time += time.perf_counter() - tick
            validate(epoch)
            if args.checkpointing_steps == "epoch":
                save_checkpoint(accelerator, output_dir, f"{EPOCH_CHECKPOINT_PREFIX}{epoch}", progress_at(epoch + 1, 0),
                                best_state, args.checkpoints_total_limit)
        if not history or history[-1]["step"] != completed:
            validate(epoch)  # resumed from a checkpoint taken at the very last step
    finally:
        bar.close()  # ends the bar's line, so that an error message starts on its own

    kept = history[-1]
    if keep_best and best is not None and best["step"] != completed:
        load_trainable_state(accelerator.unwrap_model(model), best_state, "the best epoch's weights")
        kept = next(h for h in history if h["step"] == best["step"])
        accelerator.print(f"Loaded the best model: epoch {best['epoch']} (step {best['step']}), validation "
                          f"{best_metric} {best['value']:.4f} (last epoch: {history[-1][best_metric]:.4f})")
    eval_metrics = {k: v for k, v in kept.items() if k not in ("epoch", "step")}
    epochs_run = len(history)
    train_length = {"planned_epochs": schedule.num_train_epochs, "planned_steps": schedule.max_train_steps,
                    "steps_per_epoch": schedule.updates_per_epoch, "reason": schedule.reason,
                    "epochs_run": epochs_run, "steps_run": completed, "early_stopped": stopped_early,
                    "best": best if keep_best else None}
    if stopped_early:
        train_length["reason"] += (f"; stopped early after {epochs_without_improvement()} epoch(s) without a better "
                                   f"validation {best_metric} (--early_stopping_patience {args.early_stopping_patience})")
        accelerator.print(f"Stopped early at epoch {history[-1]['epoch']}: {epochs_without_improvement()} epoch(s) "
                          f"without a better validation {best_metric}")
    warning = useless_model_warning(eval_metrics, args, completed, epochs_run)
    if warning is not None and accelerator.is_main_process:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    return TrainResult(history=history, train_loss=loss_sum / max(1, loss_count), train_runtime_s=train_time,
                       train_samples_per_second=samples_seen / train_time if train_time > 0 else 0.0,
                       completed_steps=completed, epochs_run=epochs_run, eval_metrics=eval_metrics,
                       train_length=train_length, warnings=[warning] if warning else [])
