"""Batching: the length-grouped training order, the indexed evaluation loaders and gathering predictions from all
processes in example order."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler


class LengthGroupedSampler(Sampler[int]):
    """A random order whose consecutive batches hold examples of similar length (Trainer's `group_by_length`).

    Shuffle with `seed + epoch`, cut into mega-batches of 50 batches, sort each by length: padding drops ~2.5x on
    CoNLL-2003, which is most of the cost on a CPU. The order depends only on (seed, epoch), never on the process
    count or on global RNG state, so 1- and 2-process runs see the same batches and a resumed run the same order.
    `use_epoch` is deliberately not named `set_epoch`: Accelerate would otherwise overwrite the epoch with its own
    iteration counter, which restarts at 0 in a resumed run.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, group: bool = True,
                 megabatch: int = 50) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.group = group
        self.megabatch = megabatch
        self.epoch = 0

    def use_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        if not self.group:
            return iter(order)
        size = self.batch_size * self.megabatch
        grouped: list[int] = []
        for start in range(0, len(order), size):
            grouped.extend(sorted(order[start:start + size], key=lambda i: -self.lengths[i]))
        return iter(grouped)


class IndexedCollator:
    """Wraps a Transformers collator and carries each example's `index` as a tensor, for gathering in eval."""

    def __init__(self, collator: Callable[[list[dict]], dict]) -> None:
        self.collator = collator

    def __call__(self, features: list[dict]) -> dict:
        indices = [f["index"] for f in features]
        batch = self.collator([{k: v for k, v in f.items() if k != "index"} for f in features])
        batch["index"] = torch.tensor(indices, dtype=torch.long)
        return batch


def eval_dataloader(features: list[dict], collate_fn: Callable, batch_size: int) -> DataLoader:
    """Longest first (little padding, and an out-of-memory error shows at once); metrics re-order by `index`."""
    order = sorted(range(len(features)), key=lambda i: -len(features[i]["input_ids"]))
    return DataLoader(features, batch_size=batch_size, sampler=order, collate_fn=collate_fn)


def eval_loaders(accelerator: Any, features: dict[str, list[dict]], collate_fn: Callable, batch_size: int,
                 splits: Sequence[str] = ("validation", "test")) -> dict[str, DataLoader]:
    """{split: prepared `eval_dataloader`} of the evaluation splits, each example carrying its `index`."""
    return {split: accelerator.prepare(eval_dataloader(features[split], IndexedCollator(collate_fn), batch_size))
            for split in splits}


def without_index(features: list[dict]) -> list[dict]:
    """Training features as the model takes them: the `index` kept for evaluation dropped."""
    return [{k: v for k, v in f.items() if k != "index"} for f in features]


def gather_indexed(accelerator: Any, index: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Gather a batch's `index` and tensors from all processes (padding dim 1 to a common length), dropping the
    duplicates Accelerate adds to even out the last batch."""
    padded = [accelerator.pad_across_processes(t, dim=1, pad_index=-100) if t.dim() > 1 else t for t in tensors]
    gathered = accelerator.gather_for_metrics((index, *padded))
    return tuple(gathered)


@torch.no_grad()
def predict(accelerator: Any, model: nn.Module, loader: DataLoader) -> dict[int, tuple[Any, Any]]:
    """Run `model` over a prepared eval loader on all processes; returns {example index: (argmax, labels)}."""
    was_training = model.training
    model.eval()
    out: dict[int, tuple[Any, Any]] = {}
    for batch in loader:
        index = batch.pop("index")
        labels = batch.pop("labels")
        preds = model(**batch).logits.argmax(-1)
        index, preds, labels = gather_indexed(accelerator, index, preds, labels)
        for i, p, y in zip(index.tolist(), preds.tolist(), labels.tolist()):
            out[i] = (p, y)
    model.train(was_training)
    return out
