"""Paired comparison of two methods' runs on the same examples: is a gap the method, or the draw of test examples?

Two methods' mean test scores over a few seeds can differ because one method is better, or because of which examples
happen to be in the test split: every seed is scored on the same examples, so a split that favours one method by
chance favours it in every seed. This script separates the two. For runs that a recipe left (recipes/ner.py,
sentiment.py, intent.py, recommend.py; e.g. through benchmarks/quality.py), it reloads each run's saved adapter (or
fully fine-tuned model), scores the validation and test splits again example by example, checks that this gives back
the score in the run's metrics.json, pairs the runs of A and B by seed and reports, per split:

- per seed: the score of A and B, A − B, on how many examples A did better and on how many B did, and the exact
  two-sided sign test of those two counts. "Better" is: right where the other is wrong (accuracy: the sign test is
  then McNemar's exact test), a higher NDCG@10 for the user (recommend), fewer entity errors, false positives plus
  false negatives, in the sentence (NER);
- over the seeds: the mean difference and its 95 % bootstrap interval over examples (sentences or users are
  resampled, the same resample for every seed and both methods, and each run's score is recomputed from the
  resampled examples, so NER's corpus-level F1 stays a corpus-level F1), i.e. the uncertainty that comes from the
  choice of the split's examples.

    .venv/bin/python benchmarks/paired.py --task sentiment \\
        --a outputs/quality/sentiment-lra-seed{42,0,1} --b outputs/quality/sentiment-lora-seed{42,0,1}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # runs load from local folders only
import torch  # noqa: E402
import transformers  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "recipes"))

from _harness import default_output, machine_lines, markdown_table, write_result  # noqa: E402

TASKS = ("ner", "sentiment", "intent", "recommend")
SPLITS = ("validation", "test")
METRIC_PREFIX = {"validation": "eval", "test": "test"}
METRIC = {"ner": "f1", "sentiment": "accuracy", "intent": "accuracy", "recommend": "ndcg_at_10"}
METRIC_NAME = {"f1": "entity F1", "accuracy": "accuracy %", "ndcg_at_10": "NDCG@10 × 100"}


def ratio(sums: np.ndarray) -> np.ndarray:
    """Accuracy or mean NDCG from summed (score, count) columns."""
    return sums[..., 0] / sums[..., 1]


def entity_f1(sums: np.ndarray) -> np.ndarray:
    """Micro F1 from summed (true positive, false positive, false negative) entity counts, as seqeval computes it."""
    tp, fp, fn = sums[..., 0], sums[..., 1], sums[..., 2]
    denominator = 2 * tp + fp + fn
    return np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1e-12), 0.0)


SCORE: dict[str, Callable[[np.ndarray], np.ndarray]] = {"f1": entity_f1, "accuracy": ratio, "ndcg_at_10": ratio}


@dataclass
class Scored:
    """One split of one run: per-example statistics whose column sums give the run's score, and per-example merit."""

    stats: np.ndarray  # (examples, k): (right, 1), (NDCG@10, 1) or (true pos., false pos., false neg.)
    merit: np.ndarray  # (examples,): higher is better; compared between A and B for the sign test


@dataclass
class Run:
    path: Path
    method: str
    seed: int
    args: argparse.Namespace
    metrics: dict
    splits: dict[str, Scored]


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


def load_trained(model_cls: Any, path: Path, args: argparse.Namespace, model_name_or_path: Optional[str],
                 prepare: Callable[[torch.nn.Module], None] = lambda model: None, **kwargs: Any) -> torch.nn.Module:
    """The run's model as it was evaluated: the base with the saved adapter, or the saved full model."""
    from common.methods import resolve_model
    from peft import PeftModel

    import lra_peft  # noqa: F401  (registers LRA with PEFT)

    if args.method == "full":
        model = model_cls.from_pretrained(path, **kwargs)
        prepare(model)
        return model.eval()
    model = model_cls.from_pretrained(resolve_model(model_name_or_path or args.model_name_or_path), **kwargs)
    prepare(model)
    return PeftModel.from_pretrained(model, path).eval()


def label_kwargs(path: Path) -> tuple[list[str], dict[str, Any]]:
    labels = json.loads((path / "labels.json").read_text())
    return labels, {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                    "label2id": {label: i for i, label in enumerate(labels)}}


def predict(model: torch.nn.Module, features: list[dict], collator: Any, batch_size: int) -> dict[int, tuple]:
    """The recipe's own prediction loop (same batches, so the same padding): {example index: (argmax, labels)}."""
    from accelerate import Accelerator
    from common.batching import IndexedCollator, eval_dataloader
    from common.batching import predict as recipe_predict

    loader = eval_dataloader(features, IndexedCollator(collator), batch_size)
    return recipe_predict(Accelerator(cpu=True), model, loader)


def classification_scores(path: Path, task: str, args: argparse.Namespace,
                          model_name_or_path: Optional[str]) -> dict[str, Scored]:
    from common.data import take
    from common.text_classification import tokenize
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    splits, _ = __import__(task).load_splits(args)
    labels, kwargs = label_kwargs(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = load_trained(AutoModelForSequenceClassification, path, args, model_name_or_path, **kwargs)
    out = {}
    for split in SPLITS:
        rows = take(splits[split], args.max_eval_samples)
        features = tokenize(tokenizer, rows, labels, args.max_length, f"Tokenizing {split}")
        predictions = predict(model, features, DataCollatorWithPadding(tokenizer), args.per_device_eval_batch_size)
        right = np.array([float(predictions[i][0] == predictions[i][1]) for i in range(len(rows))])
        out[split] = Scored(np.stack([right, np.ones_like(right)], axis=1), right)
    return out


def ner_scores(path: Path, args: argparse.Namespace, model_name_or_path: Optional[str]) -> dict[str, Scored]:
    """Per sentence: true positive, false positive and false negative entities (seqeval's entity extraction)."""
    import ner
    from common.conll import NER_TAGS
    from common.data import column, take
    from seqeval.metrics.sequence_labeling import get_entities
    from transformers import AutoModelForTokenClassification, AutoTokenizer, DataCollatorForTokenClassification

    splits, _ = ner.load_splits(args)
    labels, kwargs = label_kwargs(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = load_trained(AutoModelForTokenClassification, path, args, model_name_or_path, **kwargs)
    out = {}
    for split in SPLITS:
        sentences = take(splits[split], args.max_eval_samples)
        features = ner.tokenize(tokenizer, sentences, kwargs["label2id"], args.max_length, f"Tokenizing {split}")
        predictions = predict(model, features, DataCollatorForTokenClassification(tokenizer),
                              args.per_device_eval_batch_size)
        stats = np.zeros((len(sentences), 3))
        for i, tags in enumerate(column(sentences, NER_TAGS)):
            ids, label_ids = predictions[i]
            words = [labels[p] for p, y in zip(ids, label_ids) if y != -100]
            predicted = words + ["O"] * (len(tags) - len(words))  # words past --max_length, as the recipe counts them
            gold_entities, predicted_entities = set(get_entities(tags)), set(get_entities(predicted))
            tp = len(gold_entities & predicted_entities)
            stats[i] = (tp, len(predicted_entities) - tp, len(gold_entities) - tp)
        out[split] = Scored(stats, -(stats[:, 1] + stats[:, 2]))
    return out


def recommendation_scores(path: Path, args: argparse.Namespace,
                          model_name_or_path: Optional[str]) -> dict[str, Scored]:
    """Each validation / test user's NDCG@10, through the recipe's own evaluator (same texts, batching, negatives)."""
    import recommend
    from accelerate import Accelerator
    from transformers import AutoModel, AutoTokenizer

    def drop_pooler(encoder: torch.nn.Module) -> None:
        encoder.pooler = None  # as the recipe trains it: the bi-encoder mean-pools and never reads the pooler

    movies, split, _ = recommend.load_split(args)
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoder = load_trained(AutoModel, path, args, model_name_or_path, prepare=drop_pooler)
    model = recommend.BiEncoder(encoder, args.temperature).eval()
    item_ids = recommend.item_token_ids(args, tokenizer, movies, split, recommend.eval_items(split))

    def encode(texts: list[str], max_length: int) -> list[list[int]]:
        return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]

    evaluator = recommend.RankingEvaluator(args, Accelerator(cpu=True), tokenizer, split, movies, item_ids, encode)
    out = {}
    for name in SPLITS:
        scores = evaluator.scores(model, name)
        ndcg = recommend.user_rank_metrics(scores[:, 0], scores[:, 1:])["ndcg_at_10"].double().numpy()
        out[name] = Scored(np.stack([ndcg, np.ones_like(ndcg)], axis=1), ndcg)
    return out


def evaluate_run(path: Path, task: str, data_dir: Optional[str], model_name_or_path: Optional[str]) -> Run:
    args, metrics = read_run(path, task)
    if data_dir is not None:
        args.data_dir = data_dir
    if task == "recommend":
        splits = recommendation_scores(path, args, model_name_or_path)
    elif task == "ner":
        splits = ner_scores(path, args, model_name_or_path)
    else:
        splits = classification_scores(path, task, args, model_name_or_path)
    metric = METRIC[task]
    for split, scored in splits.items():
        recorded, again = metrics[f"{METRIC_PREFIX[split]}_{metric}"], float(SCORE[metric](scored.stats.sum(0)))
        # Same model, data, batching and device: the run's own score must come back (float32 sums: within 1e-6).
        if abs(recorded - again) > 1e-6:
            raise SystemExit(f"{path}: {split} {metric} reproduces as {again:.6f}, but metrics.json says "
                             f"{recorded:.6f}; was the data, model or code changed since the run?")
    name = "lra-adaptive" if args.method == "lra" and args.target_r is not None else args.method
    return Run(path, name, int(args.seed), args, metrics, splits)


def sign_test_p(a_better: int, b_better: int) -> float:
    """Exact two-sided sign test: with no difference, each example where the two differ favours A with probability ½.
    On right/wrong outcomes this is McNemar's exact test."""
    from scipy.stats import binomtest

    n = a_better + b_better
    return 1.0 if n == 0 else float(binomtest(a_better, n, 0.5).pvalue)


def bootstrap_interval(pairs: list[tuple[np.ndarray, np.ndarray]], score: Callable[[np.ndarray], np.ndarray],
                       resamples: int, seed: int) -> tuple[float, float]:
    """95 % percentile interval of the mean over `pairs` of score(A) − score(B), over resampled examples.

    Each pair holds A's and B's (examples, k) statistics on the same examples; a resample draws the examples with
    replacement (the same draw for every pair) and recomputes each score from the drawn examples' summed statistics.
    """
    rng = np.random.default_rng(seed)
    n = pairs[0][0].shape[0]
    means = np.empty(resamples)
    for start in range(0, resamples, 500):  # chunks keep the (resamples, examples) weight matrix small
        stop = min(resamples, start + 500)
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=stop - start).astype(float)
        means[start:stop] = np.mean([score(weights @ a) - score(weights @ b) for a, b in pairs], axis=0)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def pair_runs(a: list[Run], b: list[Run]) -> list[tuple[Run, Run]]:
    by_seed = {run.seed: run for run in b}
    if sorted(r.seed for r in a) != sorted(by_seed) or len(by_seed) != len(b) or len({r.seed for r in a}) != len(a):
        raise SystemExit(f"--a seeds {[r.seed for r in a]} and --b seeds {[r.seed for r in b]} must be the same "
                         "seeds, each once: the runs are compared seed by seed")
    return [(run, by_seed[run.seed]) for run in a]


def split_table(pairs: list[tuple[Run, Run]], split: str, names: tuple[str, str], metric: str, resamples: int,
                seed: int) -> tuple[str, dict]:
    a_name, b_name = names
    score = SCORE[metric]
    rows, a_scores, b_scores = [], [], []
    for a, b in pairs:
        sa, sb = a.splits[split], b.splits[split]
        fa, fb = 100 * float(score(sa.stats.sum(0))), 100 * float(score(sb.stats.sum(0)))
        a_scores.append(fa)
        b_scores.append(fb)
        a_better, b_better = int((sa.merit > sb.merit).sum()), int((sb.merit > sa.merit).sum())
        rows.append([a.seed, f"{fa:.2f}", f"{fb:.2f}", f"{fa - fb:+.2f}", a_better, b_better,
                     f"{sign_test_p(a_better, b_better):.2f}"])
    low, high = bootstrap_interval([(a.splits[split].stats, b.splits[split].stats) for a, b in pairs], score,
                                   resamples, seed)
    diffs = np.array(a_scores) - np.array(b_scores)
    summary = {"split": split, "metric": metric, "examples": int(pairs[0][0].splits[split].stats.shape[0]),
               "seeds": len(pairs), "a_mean": float(np.mean(a_scores)), "b_mean": float(np.mean(b_scores)),
               "diff": float(diffs.mean()), "low": 100 * low, "high": 100 * high,
               "a_ahead": int((diffs > 0).sum()), "b_ahead": int((diffs < 0).sum())}
    rows.append(["mean", f"{summary['a_mean']:.2f}", f"{summary['b_mean']:.2f}", f"{summary['diff']:+.2f}",
                 f"95 % interval over examples: [{summary['low']:+.2f}, {summary['high']:+.2f}]",
                 f"{a_name} ahead in {summary['a_ahead']}, {b_name} in {summary['b_ahead']} of {len(pairs)} seeds", ""])
    unit = METRIC_NAME[metric]
    test = "McNemar p" if metric == "accuracy" else "sign test p"
    headers = ["seed", f"{a_name} {unit}", f"{b_name} {unit}", f"{a_name} − {b_name}", f"{a_name} better (examples)",
               f"{b_name} better (examples)", test]
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

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the head's "newly initialized" notice: the adapter restores it
    try:
        with torch.no_grad():
            a = [evaluate_run(p, args.task, args.data_dir, args.model_name_or_path) for p in args.a]
            b = [evaluate_run(p, args.task, args.data_dir, args.model_name_or_path) for p in args.b]
    finally:
        transformers.logging.set_verbosity(verbosity)
    pairs = pair_runs(a, b)
    names = (a[0].method, b[0].method)
    if names[0] == names[1]:
        names = ("A", "B")
    lines = [f"# Paired comparison on {args.task}: {names[0]} vs {names[1]}", "",
             f"`{' '.join(['.venv/bin/python', 'benchmarks/paired.py', *(argv if argv is not None else sys.argv[1:])])}`",
             "", *machine_lines(), f"- {names[0]}: " + ", ".join(str(r.path) for r in a),
             f"- {names[1]}: " + ", ".join(str(r.path) for r in b),
             f"- Bootstrap: {args.resamples} resamples of the examples (seed {args.seed}); every run's score was "
             "reproduced from its saved weights (to 1e-6) before comparing.", ""]
    summaries = []
    for split in SPLITS:
        table, summary = split_table(pairs, split, names, METRIC[args.task], args.resamples, args.seed)
        summaries.append(summary)
        lines += [f"## {split} ({summary['examples']} examples)", "", table, ""]
    text = "\n".join(lines)
    write_result(args.out or default_output(f"paired-{args.task}"), text)
    return text, summaries


if __name__ == "__main__":
    main()
