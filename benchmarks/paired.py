"""Paired comparison of two methods' text-classification runs on the same examples: method, or sampling noise?

Two methods' mean test accuracies over a few seeds can differ because one method is better, or because of which
sentences happen to be in the test split: every seed is scored on the same sentences, so a split that favours one
method by chance favours it in every seed. This script separates the two. For runs that recipes/sentiment.py or
recipes/intent.py left (e.g. through benchmarks/quality.py), it reloads each run's saved adapter (or fully fine-tuned
model), predicts the validation and test splits again, checks that the accuracy equals the one in the run's
metrics.json, pairs the runs of A and B by seed and reports, per split:

- per seed: accuracy of A and B, A − B, the discordant examples (A right and B wrong, and the reverse) and McNemar's
  exact two-sided p-value;
- over the seeds: the mean difference and its 95 % bootstrap interval over examples (the examples are resampled, the
  same resample for every seed and both methods), i.e. the uncertainty that comes from the choice of the split's
  examples.

    .venv/bin/python benchmarks/paired.py --task sentiment \\
        --a outputs/quality/sentiment-lra-seed{42,0,1} --b outputs/quality/sentiment-lora-seed{42,0,1}
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "recipes"))

from _harness import default_output, machine_lines, markdown_table, write_result  # noqa: E402

TASKS = ("sentiment", "intent")
SPLITS = ("validation", "test")
METRIC_PREFIX = {"validation": "eval", "test": "test"}


@dataclass
class Run:
    path: Path
    method: str
    seed: int
    args: argparse.Namespace
    metrics: dict
    correct: dict[str, np.ndarray]  # split -> (examples,) bool


def read_run(path: Path, task: str) -> tuple[argparse.Namespace, dict]:
    metrics_file = path / "metrics.json"
    if not metrics_file.is_file():
        raise SystemExit(f"{path}: no metrics.json; pass folders written by recipes/{task}.py (--output_dir)")
    metrics = json.loads(metrics_file.read_text())
    if metrics.get("task") != task:
        raise SystemExit(f"{path}: a {metrics.get('task')!r} run, not {task!r}; pass --task {metrics.get('task')}")
    args = argparse.Namespace(**metrics["args"])
    if args.load_in_8bit or args.load_in_4bit:
        raise SystemExit(f"{path}: a run on a quantized base; this script reloads full-precision runs only")
    return args, metrics


def load_trained_model(path: Path, args: argparse.Namespace, labels: list[str],
                       model_name_or_path: Optional[str]) -> torch.nn.Module:
    """The run's model as it was evaluated: the base with the saved adapter, or the saved full model."""
    import _common as C
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    import lra_peft  # noqa: F401  (registers LRA with PEFT)

    kwargs = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
              "label2id": {label: i for i, label in enumerate(labels)}}
    if args.method == "full":
        return AutoModelForSequenceClassification.from_pretrained(path, **kwargs).eval()
    base = C.resolve_model(model_name_or_path or args.model_name_or_path)
    model = AutoModelForSequenceClassification.from_pretrained(base, **kwargs)
    return PeftModel.from_pretrained(model, path).eval()


@torch.no_grad()
def correct_per_example(model: torch.nn.Module, tokenizer, rows: Sequence[tuple[str, str]], labels: list[str],
                        args: argparse.Namespace) -> np.ndarray:
    """Whether each row is classified right, with the recipe's own eval batching (so the same padding per batch)."""
    import _common as C
    from transformers import DataCollatorWithPadding

    label2id = {label: i for i, label in enumerate(labels)}
    encoded = tokenizer([text for text, _ in rows], truncation=True, max_length=args.max_length)
    features = [{"input_ids": encoded["input_ids"][i], "attention_mask": encoded["attention_mask"][i],
                 "labels": label2id[label], "index": i} for i, (_, label) in enumerate(rows)]
    loader = C.eval_dataloader(features, C.IndexedCollator(DataCollatorWithPadding(tokenizer)),
                               args.per_device_eval_batch_size)
    correct = np.zeros(len(rows), dtype=bool)
    for batch in loader:
        index, gold = batch.pop("index"), batch.pop("labels")
        correct[index.numpy()] = (model(**batch).logits.argmax(-1) == gold).numpy()
    return correct


def evaluate_run(path: Path, task: str, data_dir: Optional[str], model_name_or_path: Optional[str]) -> Run:
    import _common as C
    from transformers import AutoTokenizer

    recipe = __import__(task)
    args, metrics = read_run(path, task)
    if data_dir is not None:
        args.data_dir = data_dir
    splits, _ = recipe.load_splits(args)
    labels = json.loads((path / "labels.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = load_trained_model(path, args, labels, model_name_or_path)
    correct = {}
    for split in SPLITS:
        rows = C.take(splits[split], args.max_eval_samples)
        correct[split] = correct_per_example(model, tokenizer, rows, labels, args)
        recorded = metrics[f"{METRIC_PREFIX[split]}_accuracy"]
        # Same model, data, batching and device: the predictions must be the ones the run scored.
        if round(recorded * len(rows)) != int(correct[split].sum()):
            raise SystemExit(f"{path}: {split} accuracy reproduces as {correct[split].mean():.6f}, but metrics.json "
                             f"says {recorded:.6f}; was the data, model or code changed since the run?")
    name = "lra-adaptive" if args.method == "lra" and args.target_r is not None else args.method
    return Run(path, name, int(args.seed), args, metrics, correct)


def mcnemar_p(a_only: int, b_only: int) -> float:
    """Exact two-sided McNemar test: under no difference, each discordant example favours A with probability ½."""
    from scipy.stats import binomtest

    n = a_only + b_only
    return 1.0 if n == 0 else float(binomtest(a_only, n, 0.5).pvalue)


def bootstrap_interval(diff_per_example: np.ndarray, resamples: int, seed: int) -> tuple[float, float]:
    """95 % percentile interval of the mean of `diff_per_example` over resampled examples."""
    rng = np.random.default_rng(seed)
    n = len(diff_per_example)
    means = np.empty(resamples)
    for start in range(0, resamples, 500):  # chunks keep the index matrix small
        stop = min(resamples, start + 500)
        means[start:stop] = diff_per_example[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def pair_runs(a: list[Run], b: list[Run]) -> list[tuple[Run, Run]]:
    by_seed = {run.seed: run for run in b}
    if sorted(r.seed for r in a) != sorted(by_seed) or len(by_seed) != len(b) or len({r.seed for r in a}) != len(a):
        raise SystemExit(f"--a seeds {[r.seed for r in a]} and --b seeds {[r.seed for r in b]} must be the same "
                         "seeds, each once: the runs are compared seed by seed")
    return [(run, by_seed[run.seed]) for run in a]


def split_table(pairs: list[tuple[Run, Run]], split: str, names: tuple[str, str], resamples: int,
                seed: int) -> tuple[str, dict]:
    a_name, b_name = names
    rows = []
    for a, b in pairs:
        ca, cb = a.correct[split], b.correct[split]
        a_only, b_only = int((ca & ~cb).sum()), int((cb & ~ca).sum())
        rows.append([a.seed, f"{100 * ca.mean():.2f}", f"{100 * cb.mean():.2f}", f"{100 * (ca.mean() - cb.mean()):+.2f}",
                     a_only, b_only, f"{mcnemar_p(a_only, b_only):.2f}"])
    a_all = np.stack([a.correct[split] for a, _ in pairs]).astype(float)
    b_all = np.stack([b.correct[split] for _, b in pairs]).astype(float)
    diff = (a_all - b_all).mean(axis=0)  # per example, averaged over seeds
    low, high = bootstrap_interval(diff, resamples, seed)
    ahead = sum(float(r[3]) > 0 for r in rows)
    behind = sum(float(r[3]) < 0 for r in rows)
    summary = {"split": split, "examples": int(diff.size), "seeds": len(pairs), "a_mean": 100 * a_all.mean(),
               "b_mean": 100 * b_all.mean(), "diff": 100 * diff.mean(), "low": 100 * low, "high": 100 * high,
               "a_ahead": ahead, "b_ahead": behind}
    rows.append(["mean", f"{summary['a_mean']:.2f}", f"{summary['b_mean']:.2f}", f"{summary['diff']:+.2f}",
                 f"95 % interval over examples: [{summary['low']:+.2f}, {summary['high']:+.2f}]",
                 f"{a_name} ahead in {ahead}, {b_name} in {behind} of {len(pairs)} seeds", ""])
    headers = ["seed", f"{a_name} acc. %", f"{b_name} acc. %", f"{a_name} − {b_name}", f"{a_name} right, {b_name} wrong",
               f"{b_name} right, {a_name} wrong", "McNemar p"]
    return markdown_table(headers, rows), summary


def main(argv: Optional[list[str]] = None) -> tuple[str, list[dict]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=TASKS, required=True, help="The recipe that made the runs.")
    parser.add_argument("--a", nargs="+", type=Path, required=True, help="Run folders of method A, one per seed.")
    parser.add_argument("--b", nargs="+", type=Path, required=True, help="Run folders of method B, the same seeds.")
    parser.add_argument("--data_dir", default=None, help="Data folder, if not the one the runs used.")
    parser.add_argument("--model_name_or_path", default=None, help="Base model, if not the one the runs used.")
    parser.add_argument("--resamples", type=int, default=10_000, help="Bootstrap resamples.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the bootstrap.")
    parser.add_argument("--out", type=Path, default=None, help="Markdown output (default results/paired-<task>.md).")
    args = parser.parse_args(argv)
    if args.resamples < 100:
        parser.error(f"--resamples={args.resamples}: use at least 100 for a 95 % interval")

    torch.set_grad_enabled(False)
    transformers.logging.set_verbosity_error()  # the head's "newly initialized" notice: the adapter restores it
    a = [evaluate_run(p, args.task, args.data_dir, args.model_name_or_path) for p in args.a]
    b = [evaluate_run(p, args.task, args.data_dir, args.model_name_or_path) for p in args.b]
    pairs = pair_runs(a, b)
    names = (a[0].method, b[0].method)
    if names[0] == names[1]:
        names = ("A", "B")
    lines = [f"# Paired comparison on {args.task}: {names[0]} vs {names[1]}", "",
             f"`{' '.join(['.venv/bin/python', 'benchmarks/paired.py', *(argv if argv is not None else sys.argv[1:])])}`",
             "", *machine_lines(), f"- {names[0]}: " + ", ".join(str(r.path) for r in a),
             f"- {names[1]}: " + ", ".join(str(r.path) for r in b),
             f"- Bootstrap: {args.resamples} resamples of the examples (seed {args.seed}); every run's accuracy was "
             "reproduced exactly from its saved weights before comparing.", ""]
    summaries = []
    for split in SPLITS:
        table, summary = split_table(pairs, split, names, args.resamples, args.seed)
        summaries.append(summary)
        lines += [f"## {split} ({summary['examples']} examples)", "", table, ""]
    text = "\n".join(lines)
    write_result(args.out or default_output(f"paired-{args.task}"), text)
    return text, summaries


if __name__ == "__main__":
    main()
