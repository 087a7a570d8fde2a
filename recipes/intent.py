"""Intent classification on Banking77 with LRA (or --method lora|adalora|vera|full), using Accelerate.

    accelerate launch recipes/intent.py                   # MiniLM + LRA r=8, ../shared/data/banking77
    accelerate launch --num_processes 2 --cpu recipes/intent.py --per_device_train_batch_size 16   # 2 processes

Reads `train.csv` and `test.csv` (header `text,category`; quoted texts may span lines). Banking77 has no validation
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
from typing import Optional

import _common as C

DEFAULTS = C.TaskDefaults(dataset="banking77", learning_rate=2e-3, full_learning_rate=1e-4, num_train_epochs=3,
                          per_device_train_batch_size=32, max_length=128, init_weights="minor",
                          shipped_train_examples=9000)  # train.csv less its 10 % validation split
FILES = {"train": "train.csv", "test": "test.csv"}


def add_task_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--validation_split_percentage", type=float, default=10.0,
                       help="Share of each class of train.csv held out for validation.")
    group.add_argument("--split_seed", type=int, default=42, help="Seed of the train/validation split.")


def stratified_split(rows: list[C.Example], percentage: float, seed: int) -> tuple[list[C.Example], list[C.Example]]:
    """Hold out round(percentage % of each class) with a fixed seed; a class with one example stays in train."""
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, (_, label) in enumerate(rows):
        by_label[label].append(i)
    rng = random.Random(seed)
    held_out: set[int] = set()
    for label in sorted(by_label):
        indices = by_label[label]
        rng.shuffle(indices)
        k = min(len(indices) - 1, round(len(indices) * percentage / 100))
        held_out.update(indices[:k])
    return ([r for i, r in enumerate(rows) if i not in held_out], [r for i, r in enumerate(rows) if i in held_out])


def load_splits(args: argparse.Namespace) -> tuple[dict[str, list[C.Example]], dict[str, str]]:
    if args.dataset_name:
        raw = C.hub_text_classification_splits(args, {"train": "train", "test": "test"})
        where = {"train": f"{args.dataset_name}[train]", "test": f"{args.dataset_name}[test]"}
    else:
        folder = C.resolve_data_dir(args.data_dir, DEFAULTS.dataset, list(FILES.values()))
        raw = {split: C.read_table(folder / name, "text", "category") for split, name in FILES.items()}
        where = {split: str(folder / name) for split, name in FILES.items()}
    if not 0 < args.validation_split_percentage < 100:
        raise C.RecipeError(f"--validation_split_percentage={args.validation_split_percentage} must be in (0, 100)")
    train, validation = stratified_split(raw["train"], args.validation_split_percentage, args.split_seed)
    where["validation"] = f"{args.validation_split_percentage:g}% of {where['train']} (split seed {args.split_seed})"
    return {"train": train, "validation": validation, "test": raw["test"]}, where


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The recipe's flags with every default resolved (what `main` runs with and metrics.json records)."""
    return C.parse_args(__doc__.splitlines()[0], DEFAULTS, add_task_args, argv=argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    started = time.perf_counter()
    args = parse_args(argv)
    splits, where = load_splits(args)
    C.run_text_classification(args, "intent", "banking77", splits, where, started)


if __name__ == "__main__":
    C.run_main(main)
