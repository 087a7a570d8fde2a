"""Intent classification on Banking77 with LRA (or --method lora|adalora|vera|full), using Accelerate.

    accelerate launch recipes/intent.py                   # MiniLM + LRA r=8, ../shared/data/banking77
    accelerate launch --num_processes 2 --cpu recipes/intent.py --per_device_train_batch_size 16   # 2 processes

Reads `train.csv` and `test.csv` (header `text,category`, or the columns named by --text_column_name /
--label_column_name; quoted texts may span lines). Banking77 has no validation
split, so `--validation_split_percentage` of each class of `train.csv` is held out with `--split_seed` (stratified,
fixed, independent of --seed). The classes are those of the whole training file, also with --max_train_samples.
Reports accuracy and macro-F1.
"""

from __future__ import annotations

import argparse
import random
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, Optional

from common.accelerator import make_accelerator
from common.args import TaskDefaults
from common.args import parse_args as parse_recipe_args
from common.batching import eval_loaders, without_index
from common.calibration import CalibrationData
from common.data import (
    LABEL,
    add_column_args,
    column,
    hub_text_classification_splits,
    label_set_and_slices,
    read_table,
    resolve_data_dir,
)
from common.distill import load_teacher, make_loss
from common.errors import RecipeError, run_main
from common.loop import default_loss, train
from common.methods import apply_method, label_config, load_model, load_tokenizer
from common.outputs import RunOutputs, finish_run
from common.schedule import plan_schedule
from common.text_classification import evaluate_classifier, tokenize
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

# The validation grid's best cells (seed 42; docs/results.md#tuning-on-validation): adapters 2e-3 linear (LRA 89.53,
# LoRA 89.33), full fine-tuning 2e-4 linear (90.83; 1e-4 gave 86.34).
DEFAULTS = TaskDefaults(dataset="banking77", learning_rate=2e-3, full_learning_rate=2e-4, num_train_epochs=3,
                        per_device_train_batch_size=32, max_length=128, init_weights="minor",
                        shipped_train_examples=9000)  # train.csv less its 10 % validation split
FILES = {"train": "train.csv", "test": "test.csv"}


def add_task_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--validation_split_percentage", type=float, default=10.0,
                       help="Share of each class of train.csv held out for validation.")
    group.add_argument("--split_seed", type=int, default=42, help="Seed of the train/validation split.")
    add_column_args(group, "text (Hub datasets: text or sentence)", "category (Hub datasets: label)")


def stratified_split(rows: Any, percentage: float, seed: int) -> tuple[Any, Any]:
    """Hold out round(percentage % of each class) of a `Dataset` of `text` / `label` with a fixed seed; a class with
    one example stays in train. Both parts keep the file's order."""
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, label in enumerate(column(rows, LABEL)):
        by_label[label].append(i)
    rng = random.Random(seed)
    held_out: set[int] = set()
    for label in sorted(by_label):
        indices = by_label[label]
        rng.shuffle(indices)
        k = min(len(indices) - 1, round(len(indices) * percentage / 100))
        held_out.update(indices[:k])
    return rows.select([i for i in range(len(rows)) if i not in held_out]), rows.select(sorted(held_out))


def load_splits(args: argparse.Namespace) -> tuple[dict, dict[str, str]]:
    """{split: `Dataset` of `text` / `label`}, validation held out of train.csv, and where each split came from."""
    if args.dataset_name:
        raw = hub_text_classification_splits(args, {"train": "train", "test": "test"})
        where = {"train": f"{args.dataset_name}[train]", "test": f"{args.dataset_name}[test]"}
    else:
        folder = resolve_data_dir(args.data_dir, DEFAULTS.dataset, list(FILES.values()))
        text, label = args.text_column_name or "text", args.label_column_name or "category"
        raw = {split: read_table(folder / name, text, label) for split, name in FILES.items()}
        where = {split: str(folder / name) for split, name in FILES.items()}
    if not 0 < args.validation_split_percentage < 100:
        raise RecipeError(f"--validation_split_percentage={args.validation_split_percentage} must be in (0, 100)")
    train, validation = stratified_split(raw["train"], args.validation_split_percentage, args.split_seed)
    where["validation"] = f"{args.validation_split_percentage:g}% of {where['train']} (split seed {args.split_seed})"
    return {"train": train, "validation": validation, "test": raw["test"]}, where


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The recipe's flags with every default resolved (what `main` runs with and metrics.json records)."""
    return parse_recipe_args(__doc__.splitlines()[0], DEFAULTS, add_task_args, argv=argv)


def main(argv: Optional[Sequence[str]] = None) -> Optional[dict]:
    started = time.perf_counter()
    args = parse_args(argv)

    # Data: the classes are the whole training file's (Banking77: 77), also under --max_train_samples.
    splits, where = load_splits(args)
    labels, splits = label_set_and_slices(args, splits, where, LABEL)
    accelerator = make_accelerator(args)
    tokenizer = load_tokenizer(args)
    with accelerator.main_process_first():  # the first process fills the cache, the others read it
        features = {split: tokenize(tokenizer, rows, labels, args.max_length, f"Tokenizing {split}")
                    for split, rows in splits.items()}
    collator = DataCollatorWithPadding(tokenizer)
    schedule = plan_schedule(args, len(features["train"]), accelerator.num_processes)

    # Model and method: one output per class (the training examples calibrate --init_weights corda|gradient).
    model = load_model(AutoModelForSequenceClassification, args, **label_config(labels))
    model = apply_method(model, args, "SEQ_CLS", schedule.max_train_steps,
                         calibration=CalibrationData(features["train"], collator, default_loss))
    loaders = eval_loaders(accelerator, features, collator, args.per_device_eval_batch_size)

    def evaluate(model, split: str) -> tuple[dict, str]:
        return evaluate_classifier(accelerator, model, loaders[split], labels)

    # Train (with a teacher's soft labels when --distill_alpha > 0), then test and save.
    teacher = load_teacher(args, accelerator, AutoModelForSequenceClassification, labels, tokenizer)
    compute_loss = default_loss if teacher is None else make_loss(teacher, args)
    result = train(args, accelerator, model, without_index(features["train"]), collator, evaluate, schedule,
                   task="intent", compute_loss=compute_loss)
    return finish_run(args, accelerator, model, tokenizer, result, evaluate, RunOutputs(
        task="intent", dataset=args.dataset_name or "banking77", pipeline="text-classification",
        auto_class="AutoPeftModelForSequenceClassification", base_auto_class="AutoModelForSequenceClassification",
        report_name="classification_report.txt", report_title=f"intent: test split ({where['test']})",
        labels=labels), started)


if __name__ == "__main__":
    run_main(main)
