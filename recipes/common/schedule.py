"""How long a run trains: optimizer steps per epoch and in all, planned before the model is built."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Optional

# The fewest optimizer steps a run without --num_train_epochs / --max_train_steps takes (plan_schedule), unless the
# task's own default run on its shipped data takes fewer (min_train_steps_for). Chosen on validation with
# benchmarks/min_steps.py: on a 3,000-sentence CoNLL-2003 slice both LRA and LoRA were within 1 point of their best
# only at 800 steps of {100, 200, 400, 800} (docs/recipes.md "Training length on your own, smaller data").
MIN_TRAIN_STEPS = 800


def min_train_steps_for(shipped_train_examples: Optional[int], num_train_epochs: int, batch_size: int) -> int:
    """The one rule of every recipe: MIN_TRAIN_STEPS, or the optimizer steps of the task's default run on its shipped
    training split (`num_train_epochs` × ⌈examples / batch_size⌉) when those are fewer.

    A smaller dataset thus trains at least as many steps as the defaults were chosen with on the shipped data, up to
    the minimum found sufficient on small slices; a shipped run is never lengthened. None (no shipped data, e.g.
    instruct.py): MIN_TRAIN_STEPS.
    """
    if shipped_train_examples is None:
        return MIN_TRAIN_STEPS
    return min(MIN_TRAIN_STEPS, num_train_epochs * math.ceil(shipped_train_examples / batch_size))


def planned_epochs(task_num_train_epochs: int, min_train_steps: int, updates_per_epoch: int) -> int:
    """Epochs of a run left to its defaults: the task's default epochs, or more until at least `min_train_steps`
    optimizer steps of `updates_per_epoch`."""
    return max(task_num_train_epochs, math.ceil(min_train_steps / updates_per_epoch))


@dataclass
class Schedule:
    updates_per_epoch: int
    max_train_steps: int
    num_train_epochs: int
    reason: str = ""  # why this many epochs / steps, for the log and metrics.json


def plan_schedule(args: argparse.Namespace, num_examples: int, num_processes: int) -> Schedule:
    """Optimizer steps per epoch and in all, known before the model is built (AdaLoRA needs `total_step`).

    `--max_train_steps` wins, then `--num_train_epochs`. With neither, the run takes the task's default epochs, or
    more when those give fewer than `--min_train_steps` optimizer steps: a default chosen on a large dataset would
    otherwise stop a run on a small one after a few dozen steps, with a model that has learnt almost nothing. A run
    cut with `--max_train_samples` keeps the default epochs: it is a quick run, not the size of the user's data.
    Sets `args.num_train_epochs` to the epochs planned, so that metrics.json records them.
    """
    batches = math.ceil(num_examples / args.per_device_train_batch_size)
    per_process = math.ceil(batches / num_processes)  # Accelerate evens out batches across processes
    updates = max(1, math.ceil(per_process / args.gradient_accumulation_steps))
    if args.max_train_steps is not None:
        args.num_train_epochs = math.ceil(args.max_train_steps / updates)
        return Schedule(updates, args.max_train_steps, args.num_train_epochs,
                        f"--max_train_steps {args.max_train_steps}")
    if args.num_train_epochs is not None:
        return Schedule(updates, args.num_train_epochs * updates, args.num_train_epochs,
                        f"--num_train_epochs {args.num_train_epochs}")
    default = args.task_num_train_epochs
    if args.max_train_samples is not None:
        # A cut for a quick or debugging run (as in Transformers' examples), not the user's data: 800 steps of a
        # 32-example smoke test would be 800 epochs.
        args.num_train_epochs = default
        return Schedule(updates, default * updates, default,
                        f"the task's default {default} epoch(s) ({default * updates} steps of {updates}): "
                        f"--max_train_samples {args.max_train_samples} is a quick run, where --min_train_steps does "
                        "not apply; pass --num_train_epochs for more")
    epochs = planned_epochs(default, args.min_train_steps, updates)
    if epochs == default:
        reason = (f"the task's default {default} epoch(s) ({default * updates} steps of {updates}) reach "
                  f"--min_train_steps {args.min_train_steps}")
    else:
        reason = (f"the task's default {default} epoch(s) would be only {default * updates} steps of {updates}, "
                  f"fewer than --min_train_steps {args.min_train_steps}: raised to {epochs} epochs")
    args.num_train_epochs = epochs
    return Schedule(updates, epochs * updates, epochs, reason)
