"""Named-entity recognition on CoNLL-2003 with LRA (or --method lora|adalora|vera|full), using Accelerate.

    accelerate launch recipes/ner.py                      # MiniLM + LRA r=8, ../shared/data/conll2003
    accelerate launch recipes/ner.py --method lora        # the same loop with PEFT's LoRA

Reads `train.txt`, `valid.txt`, `test.txt` in CoNLL format: one token per line, its tag in the last column (so both
`token POS chunk tag` and `token tag` files work), a blank line between sentences, `-DOCSTART-` lines ignored. The tag
set is whatever the training file uses. Reports entity-level precision / recall / F1 (seqeval, per entity type) and,
as a side figure, word-level tag accuracy. Words cut off by --max_length count as predicted "O".
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any, Optional

from common.accelerator import make_accelerator
from common.args import TaskDefaults
from common.args import parse_args as parse_recipe_args
from common.batching import eval_loaders, predict, without_index
from common.calibration import CalibrationData
from common.conll import NER_TAGS, TOKENS, read_conll
from common.data import add_column_args, column, label_set_and_slices, load_hub_dataset, resolve_data_dir
from common.data import tokenize as map_features
from common.distill import load_teacher, make_loss, token_mask
from common.errors import RecipeError, run_main
from common.loop import default_loss, train
from common.methods import apply_method, label_config, load_model, load_tokenizer
from common.outputs import RunOutputs, finish_run
from common.schedule import plan_schedule
from seqeval.metrics import accuracy_score, classification_report, f1_score, precision_score, recall_score
from transformers import AutoModelForTokenClassification, DataCollatorForTokenClassification

# Learning rate and schedule per method: each one's best cell of the validation grid (seed 42; docs/results.md
# #tuning-on-validation): LRA 2e-3 linear 82.53, LoRA 1e-3 constant after 26 warm-up steps 82.11, full 2e-4 linear 85.84
# after 1 epoch; each of those cells then gained from a second epoch (LRA 86.20, LoRA 84.31, full 88.92) and a third
# (86.79, 86.55, 89.86). AdaLoRA (12 -> 8): 2e-3 linear 82.90 after 2 epochs (1e-3: 79.57).
DEFAULTS = TaskDefaults(dataset="conll2003", learning_rate=1e-3, full_learning_rate=2e-4, num_train_epochs=3,
                        per_device_train_batch_size=32, max_length=256, shipped_train_examples=14041,
                        method_defaults={"lra": {"learning_rate": 2e-3},
                                         "lora": {"lr_scheduler_type": "constant_with_warmup", "num_warmup_steps": 26},
                                         "adalora": {"learning_rate": 2e-3}})
FILES = {"train": "train.txt", "validation": "valid.txt", "test": "test.txt"}

def hub_splits(args: argparse.Namespace) -> dict[str, Any]:
    """{split: `Dataset` with `tokens` and `ner_tags` (tag strings)} from --dataset_name; --text_column_name /
    --label_column_name name other columns."""
    hub = load_hub_dataset(args)
    text_column, label_column = args.text_column_name or TOKENS, args.label_column_name or NER_TAGS
    splits = {}
    for split in FILES:
        if split not in hub:
            raise RecipeError(f"dataset {args.dataset_name!r} has no {split!r} split (it has {list(hub)})")
        data = hub[split]
        if not {text_column, label_column} <= set(data.column_names):
            raise RecipeError(f"dataset {args.dataset_name!r} has no {text_column!r} and {label_column!r} columns "
                              f"(it has {data.column_names}); pass --text_column_name / --label_column_name")
        feature = getattr(data.features[label_column], "feature", None)
        names = feature.names if hasattr(feature, "names") else None  # ClassLabel ids, as conll2003's; else strings

        def rename(batch: dict, names: Optional[list[str]] = names) -> dict:
            tags = batch[label_column] if names is None else [[names[t] for t in row] for row in batch[label_column]]
            return {TOKENS: batch[text_column], NER_TAGS: tags}

        splits[split] = data.map(rename, batched=True, remove_columns=data.column_names)
    return splits


def load_splits(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, str]]:
    """{split: `Dataset` with `tokens` and `ner_tags`} from --data_dir (or --dataset_name), and where each split
    came from."""
    if args.dataset_name:
        return hub_splits(args), {split: f"{args.dataset_name}[{split}]" for split in FILES}
    if (args.text_column_name or TOKENS) != TOKENS or (args.label_column_name or NER_TAGS) != NER_TAGS:
        raise RecipeError("--text_column_name / --label_column_name name columns of a --dataset_name dataset; CoNLL "
                          "files have a token and its tag on each line: drop these flags")
    folder = resolve_data_dir(args.data_dir, DEFAULTS.dataset, list(FILES.values()))
    splits = {split: read_conll(folder / name) for split, name in FILES.items()}
    return splits, {split: str(folder / name) for split, name in FILES.items()}


def tokenize_batch(batch: dict, indices: list[int], tokenizer: Any, label2id: dict[str, int], max_length: int) -> dict:
    """Sub-word features of a `Dataset.map` batch; only a word's first sub-word carries its label (-100 elsewhere),
    as in run_ner."""
    encoded = tokenizer(batch[TOKENS], is_split_into_words=True, truncation=True, max_length=max_length)
    all_labels = []
    for i, tags in enumerate(batch[NER_TAGS]):
        labels, previous = [], None
        for word in encoded.word_ids(i):
            labels.append(-100 if word is None or word == previous else label2id[tags[word]])
            previous = word
        all_labels.append(labels)
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], "labels": all_labels,
            "index": indices}


def tokenize(tokenizer: Any, sentences: Any, label2id: dict[str, int], max_length: int,
             desc: str = "Tokenizing") -> list[dict]:
    """One feature per sentence of a `Dataset` with `tokens` / `ner_tags`, in order (a batched `Dataset.map`)."""
    return map_features(sentences, tokenize_batch, desc, tokenizer=tokenizer, label2id=label2id,
                        max_length=max_length)


def entity_metrics(sentences: Any, predictions: dict[int, tuple], labels: list[str]) -> tuple[dict, str]:
    """seqeval's entity-level P/R/F1 (micro over types), per-type scores, word accuracy, and the text report."""
    gold, pred = [], []
    for i, tags in enumerate(column(sentences, NER_TAGS)):
        ids, label_ids = predictions[i]
        words = [labels[p] for p, y in zip(ids, label_ids) if y != -100]
        gold.append(tags)
        pred.append(words + ["O"] * (len(tags) - len(words)))  # words past --max_length
    metrics = {"precision": precision_score(gold, pred), "recall": recall_score(gold, pred),
               "f1": f1_score(gold, pred), "token_accuracy": accuracy_score(gold, pred)}
    per_type = classification_report(gold, pred, output_dict=True)
    for name, scores in per_type.items():
        if not name.endswith(" avg"):
            metrics[f"{name}_f1"] = float(scores["f1-score"])
    metrics = {k: float(v) for k, v in metrics.items()}
    return metrics, classification_report(gold, pred, digits=4)


def add_task_args(group: argparse._ArgumentGroup) -> None:
    add_column_args(group, "tokens (--dataset_name only)", "ner_tags (--dataset_name only)")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The recipe's flags with every default resolved (what `main` runs with and metrics.json records)."""
    return parse_recipe_args(__doc__.splitlines()[0], DEFAULTS, add_task_args, argv=argv)


def main(argv: Optional[Sequence[str]] = None) -> Optional[dict]:
    started = time.perf_counter()
    args = parse_args(argv)

    # Data: the tag set is the whole training file's (before --max_train_samples, as run_ner).
    splits, where = load_splits(args)
    labels, splits = label_set_and_slices(args, splits, where, NER_TAGS)
    accelerator = make_accelerator(args)
    tokenizer = load_tokenizer(args)
    if not tokenizer.is_fast:
        raise RecipeError(f"{args.model_name_or_path}: NER needs a fast tokenizer (word alignment); pass a model "
                          "folder with a tokenizer.json")
    label2id = {label: i for i, label in enumerate(labels)}
    with accelerator.main_process_first():
        features = {split: tokenize(tokenizer, sentences, label2id, args.max_length, f"Tokenizing {split}")
                    for split, sentences in splits.items()}
    collator = DataCollatorForTokenClassification(tokenizer)
    schedule = plan_schedule(args, len(features["train"]), accelerator.num_processes)

    # Model and method (the training sentences calibrate --init_weights corda|gradient).
    model = load_model(AutoModelForTokenClassification, args, **label_config(labels))
    model = apply_method(model, args, "TOKEN_CLS", schedule.max_train_steps,
                         calibration=CalibrationData(features["train"], collator, default_loss))
    loaders = eval_loaders(accelerator, features, collator, args.per_device_eval_batch_size)

    def evaluate(model, split: str) -> tuple[dict, str]:
        return entity_metrics(splits[split], predict(accelerator, model, loaders[split]), labels)

    # Train; distillation (off by default) compares per token, on the positions the task loss counts.
    teacher = load_teacher(args, accelerator, AutoModelForTokenClassification, labels, tokenizer)
    compute_loss = default_loss if teacher is None else make_loss(teacher, args, mask=token_mask)
    result = train(args, accelerator, model, without_index(features["train"]), collator, evaluate, schedule,
                   task="ner", compute_loss=compute_loss)
    return finish_run(args, accelerator, model, tokenizer, result, evaluate, RunOutputs(
        task="ner", dataset=args.dataset_name or "conll2003", pipeline="token-classification",
        auto_class="AutoPeftModelForTokenClassification", base_auto_class="AutoModelForTokenClassification",
        report_name="ner_report.txt", report_title=f"CoNLL entity-level report, test split ({where['test']})",
        labels=labels), started)


if __name__ == "__main__":
    run_main(main)
