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
from pathlib import Path
from typing import Optional

from common.accelerator import make_accelerator
from common.args import TaskDefaults
from common.args import parse_args as parse_recipe_args
from common.batching import eval_loaders, predict, without_index
from common.calibration import CalibrationData
from common.data import label_set_and_slices, load_hub_dataset, resolve_data_dir
from common.distill import load_teacher, make_loss, token_mask
from common.errors import RecipeError, run_main
from common.loop import default_loss, train
from common.methods import apply_method, label_config, load_model, load_tokenizer
from common.outputs import RunOutputs, finish_run
from common.schedule import plan_schedule
from seqeval.metrics import accuracy_score, classification_report, f1_score, precision_score, recall_score
from transformers import AutoModelForTokenClassification, DataCollatorForTokenClassification

# Learning rate and schedule per method: each one's best cell of the validation grid (seed 42; docs/results.md
# #tuning-on-validation): LRA 2e-3 linear 82.53, LoRA 1e-3 constant after 26 warm-up steps 82.11, full 2e-4 linear 85.84.
DEFAULTS = TaskDefaults(dataset="conll2003", learning_rate=1e-3, full_learning_rate=2e-4, num_train_epochs=1,
                        per_device_train_batch_size=32, max_length=256, shipped_train_examples=14041,
                        method_defaults={"lra": {"learning_rate": 2e-3},
                                         "lora": {"lr_scheduler_type": "constant_with_warmup", "num_warmup_steps": 26}})
FILES = {"train": "train.txt", "validation": "valid.txt", "test": "test.txt"}

Sentence = tuple[list[str], list[str]]  # (words, tags)


def read_conll(path: Path) -> list[Sentence]:
    """Sentences of a CoNLL file; a line without a tag column raises a `RecipeError` naming file and line."""
    sentences: list[Sentence] = []
    words: list[str] = []
    tags: list[str] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            columns = line.split()
            if not columns or columns[0] == "-DOCSTART-":
                if words:
                    sentences.append((words, tags))
                    words, tags = [], []
                continue
            if len(columns) < 2:
                raise RecipeError(f"{path}:{lineno}: expected a token and its tag separated by spaces (the tag in "
                                  f"the last column), got {line.rstrip()!r}")
            words.append(columns[0])
            tags.append(columns[-1])
    if words:
        sentences.append((words, tags))
    return sentences


def load_splits(args: argparse.Namespace) -> tuple[dict[str, list[Sentence]], dict[str, str]]:
    """{split: sentences} from --data_dir (or --dataset_name), and where each split came from."""
    if args.dataset_name:
        hub = load_hub_dataset(args)
        splits, where = {}, {}
        for split in FILES:
            if split not in hub:
                raise RecipeError(f"dataset {args.dataset_name!r} has no {split!r} split (it has {list(hub)})")
            names = hub[split].features["ner_tags"].feature.names
            splits[split] = [(row["tokens"], [names[t] for t in row["ner_tags"]]) for row in hub[split]]
            where[split] = f"{args.dataset_name}[{split}]"
        return splits, where
    folder = resolve_data_dir(args.data_dir, DEFAULTS.dataset, list(FILES.values()))
    splits = {split: read_conll(folder / name) for split, name in FILES.items()}
    return splits, {split: str(folder / name) for split, name in FILES.items()}


def tokenize(tokenizer, sentences: list[Sentence], label2id: dict[str, int], max_length: int) -> list[dict]:
    """Sub-word features; only a word's first sub-word carries its label (-100 elsewhere), as in run_ner."""
    encoded = tokenizer([words for words, _ in sentences], is_split_into_words=True, truncation=True,
                        max_length=max_length)
    features = []
    for i, (_, tags) in enumerate(sentences):
        labels, previous = [], None
        for word in encoded.word_ids(i):
            labels.append(-100 if word is None or word == previous else label2id[tags[word]])
            previous = word
        features.append({"input_ids": encoded["input_ids"][i], "attention_mask": encoded["attention_mask"][i],
                         "labels": labels, "index": i})
    return features


def entity_metrics(sentences: list[Sentence], predictions: dict[int, tuple], labels: list[str]) -> tuple[dict, str]:
    """seqeval's entity-level P/R/F1 (micro over types), per-type scores, word accuracy, and the text report."""
    gold, pred = [], []
    for i, (_, tags) in enumerate(sentences):
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


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The recipe's flags with every default resolved (what `main` runs with and metrics.json records)."""
    return parse_recipe_args(__doc__.splitlines()[0], DEFAULTS, argv=argv)


def main(argv: Optional[Sequence[str]] = None) -> Optional[dict]:
    started = time.perf_counter()
    args = parse_args(argv)

    # Data: the tag set is the whole training file's (before --max_train_samples, as run_ner).
    splits, where = load_splits(args)
    labels, splits = label_set_and_slices(args, splits, where, lambda sentence: sentence[1])
    accelerator = make_accelerator(args)
    tokenizer = load_tokenizer(args)
    if not tokenizer.is_fast:
        raise RecipeError(f"{args.model_name_or_path}: NER needs a fast tokenizer (word alignment); pass a model "
                          "folder with a tokenizer.json")
    label2id = {label: i for i, label in enumerate(labels)}
    features = {split: tokenize(tokenizer, sentences, label2id, args.max_length) for split, sentences in splits.items()}
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
