"""Sequence classification as `sentiment.py` and `intent.py` share it: features, evaluation and metrics."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from sklearn.metrics import accuracy_score, classification_report, f1_score
from torch import nn
from torch.utils.data import DataLoader

from .batching import predict
from .data import LABEL, TEXT
from .data import tokenize as map_features


def classification_features(batch: dict, indices: list[int], tokenizer: Any, label2id: dict[str, int],
                            max_length: int) -> dict:
    """A `Dataset.map` batch's features: token ids and attention mask truncated to `max_length`, the label's id and
    the row's `index`."""
    encoded = tokenizer(batch[TEXT], truncation=True, max_length=max_length)
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
            "labels": [label2id[label] for label in batch[LABEL]], "index": indices}


def tokenize(tokenizer: Any, rows: Any, labels: list[str], max_length: int, desc: str = "Tokenizing") -> list[dict]:
    """One feature per row of a `Dataset` of `text` / `label` (common.data.read_table), in order, through a batched,
    cached `Dataset.map` (`classification_features`)."""
    label2id = {label: i for i, label in enumerate(labels)}
    return map_features(rows, classification_features, desc, tokenizer=tokenizer, label2id=label2id,
                        max_length=max_length)


def classification_metrics(gold: Sequence[int], pred: Sequence[int], labels: list[str]) -> tuple[dict, str]:
    """Accuracy and macro-F1; with two classes also the binary F1 of the second label (SST-2: label "1"); and the
    majority-class rate of `gold`, the accuracy a model that learnt nothing gets.

    Macro-F1 averages over the classes that occur in `gold` or `pred` (scikit-learn's default), so that classes an
    evaluation slice (--max_eval_samples) does not contain do not count as F1 = 0.
    """
    ids = list(range(len(labels)))
    metrics = {"accuracy": float(accuracy_score(gold, pred)),
               "macro_f1": float(f1_score(gold, pred, average="macro", zero_division=0)),
               # What always answering the split's most frequent class scores: the floor of a useful model.
               "majority_class_accuracy": max(Counter(gold).values()) / len(gold) if len(gold) else 0.0}
    if len(labels) == 2:
        metrics["f1"] = float(f1_score(gold, pred, pos_label=1, average="binary", zero_division=0))
    report = classification_report(gold, pred, labels=ids, target_names=labels, digits=4, zero_division=0)
    return metrics, report


def evaluate_classifier(accelerator: Any, model: nn.Module, loader: DataLoader, labels: list[str]) -> tuple[dict, str]:
    """`classification_metrics` of `model`'s predictions over a prepared, indexed eval loader (all processes)."""
    predictions = predict(accelerator, model, loader)
    order = sorted(predictions)
    return classification_metrics([predictions[i][1] for i in order], [predictions[i][0] for i in order], labels)
