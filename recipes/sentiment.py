"""Sentiment classification on SST-2 with LRA (or --method lora|adalora|vera|full), using Accelerate.

    accelerate launch recipes/sentiment.py                # MiniLM + LRA r=8, ../shared/data/sst2
    accelerate launch recipes/sentiment.py --method full  # full fine-tuning under the same loop

Reads `train.tsv`, `dev.tsv` (validation, evaluated after each epoch) and the labelled `test.tsv`: tab-separated with
a header `sentence<TAB>label`. The classes are the training file's labels. Reports accuracy, the binary F1 of the
second label in sorted order (SST-2: "1" = positive) and macro-F1.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Optional

import _common as C

DEFAULTS = C.TaskDefaults(dataset="sst2", learning_rate=1e-3, full_learning_rate=5e-5, num_train_epochs=1,
                          per_device_train_batch_size=32, max_length=128, init_weights="minor",
                          shipped_train_examples=67349)
FILES = {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"}


def load_splits(args: argparse.Namespace) -> tuple[dict[str, list[C.Example]], dict[str, str]]:
    if args.dataset_name:
        names = {"train": "train", "validation": "validation", "test": "test"}
        return C.hub_text_classification_splits(args, names), {s: f"{args.dataset_name}[{s}]" for s in names}
    folder = C.resolve_data_dir(args.data_dir, DEFAULTS.dataset, list(FILES.values()))
    splits = {split: C.read_table(folder / name, "sentence", "label", delimiter="\t") for split, name in FILES.items()}
    return splits, {split: str(folder / name) for split, name in FILES.items()}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The recipe's flags with every default resolved (what `main` runs with and metrics.json records)."""
    return C.parse_args(__doc__.splitlines()[0], DEFAULTS, argv=argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    started = time.perf_counter()
    args = parse_args(argv)
    splits, where = load_splits(args)
    C.run_text_classification(args, "sentiment", "sst2", splits, where, started)


if __name__ == "__main__":
    C.run_main(main)
