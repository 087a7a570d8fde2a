"""Text-based movie recommendation on MovieLens (ml-latest-small) with LRA (or --method lora|adalora|vera|full).

    accelerate launch recipes/recommend.py                # MiniLM + LRA r=8, ../shared/data/movielens-small

The model reads a user's profile as text (their most recent liked titles and the genres those share) and a candidate
movie as text (title, genres and, unless --no-popularity_in_text, its popularity decile in the training period),
embeds both with the same encoder (mean pooling, as MiniLM was trained) and scores a
like by the cosine of the two, scaled by 1/--temperature. Training: for each liked movie of the training period, a
softmax over it and --train_negatives movies the user had not rated by then.

Split (leave-last-out by time, per user): a rating >= --positive_threshold is a like; a user's last like (by time) is
the test item, the one before it the validation item, and training uses only what the user did strictly before the
validation like's time, so nothing from the user's future reaches training. Each held-out like is ranked against
--num_eval_negatives movies the user never rated: HR@10, NDCG@10 and AUC, for the model and for a popularity baseline
(number of training-period ratings of a movie), which the model must beat.
"""

from __future__ import annotations

import argparse
import bisect
import random
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from common.accelerator import make_accelerator
from common.args import TaskDefaults
from common.args import parse_args as parse_recipe_args
from common.batching import IndexedCollator, eval_dataloader
from common.calibration import CalibrationData
from common.data import column, line_of_row, load_csv, require_nonempty, resolve_data_dir, take
from common.distill import load_teacher, make_loss
from common.errors import RecipeError, run_main
from common.loop import train
from common.methods import apply_method, load_model, load_tokenizer
from common.outputs import RunOutputs, finish_run
from common.schedule import plan_schedule
from torch import nn
from transformers import AutoModel

# shipped_train_examples: the shipped data's 2,412 training examples (users × their latest likes) are 76 steps at
# 1 epoch, fewer than MIN_TRAIN_STEPS: the shared rule makes 76 this recipe's minimum (docs/recipes.md).
DEFAULTS = TaskDefaults(dataset="movielens-small", learning_rate=1e-3, full_learning_rate=5e-5, num_train_epochs=1,
                        per_device_train_batch_size=32, per_device_eval_batch_size=128, max_length=96,
                        shipped_train_examples=2412,
                        # Each method's best validation cell (seed 42, NDCG@10; docs/results.md): LoRA 1e-3 constant
                        # after 5 warm-up steps, 47.41 (linear 46.42; 5e-4 44.48, 2e-3 47.16); LRA 2e-3 linear, 47.22
                        # (5e-4 45.69, 1e-3 46.56, 4e-3 43.12; 1e-3 after warm-up 46.03).
                        method_defaults={"lra": {"learning_rate": 2e-3},
                                         "lora": {"lr_scheduler_type": "constant_with_warmup", "num_warmup_steps": 5}})
FILES = ("ratings.csv", "movies.csv")
K = 10  # HR@K, NDCG@K


def add_task_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--positive_threshold", type=float, default=4.0, help="A rating >= this is a like.")
    group.add_argument("--profile_size", type=int, default=5, help="Recent liked titles in a user's profile text.")
    group.add_argument("--max_targets_per_user", type=int, default=4,
                       help="Training examples per user: their most recent likes of the training period.")
    group.add_argument("--train_negatives", type=int, default=3, help="Sampled negatives per training example.")
    group.add_argument("--num_eval_negatives", type=int, default=99, help="Unrated movies ranked with each held-out like.")
    group.add_argument("--temperature", type=float, default=0.05, help="Scores are cosine / temperature.")
    group.add_argument("--item_max_length", type=int, default=32, help="Token limit of a movie's text.")
    group.add_argument("--split_seed", type=int, default=42, help="Seed of the negative sampling of the split.")
    group.add_argument("--popularity_in_text", action=argparse.BooleanOptionalAction, default=True,
                       help="Add the movie's training-period popularity decile to its text ('Popularity: 7/10').")


# --------------------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class Rating:
    user: int
    item: int
    rating: float
    timestamp: int


@dataclass
class Movie:
    title: str
    genres: list[str]


def _rows(path: Path, columns: Sequence[str]):
    """(row index, row) of a MovieLens CSV read through `datasets` (common.data.load_csv), every field a string as
    written; a row with missing or extra fields raises a `RecipeError` naming file and line."""
    def bad(row: dict) -> bool:
        return None in row or any(row.get(c) is None for c in columns)

    def describe(line: int, row: dict, header: list[str]) -> str:
        return f"expected the fields {header}, got {list(row.values())}"

    dataset = load_csv(path, columns, bad_row=bad, describe=describe)
    yield from enumerate(dict(zip(columns, values)) for values in zip(*(column(dataset, c) for c in columns)))


def read_ratings(path: Path) -> list[Rating]:
    ratings = []
    for index, row in _rows(path, ("userId", "movieId", "rating", "timestamp")):
        try:
            ratings.append(Rating(int(row["userId"]), int(row["movieId"]), float(row["rating"]), int(row["timestamp"])))
        except ValueError:
            raise RecipeError(f"{path}:{line_of_row(path, index)}: userId, movieId and timestamp must be integers and "
                              f"rating a number, got {row}") from None
    return ratings


def read_movies(path: Path) -> dict[int, Movie]:
    movies = {}
    for index, row in _rows(path, ("movieId", "title", "genres")):
        try:
            item = int(row["movieId"])
        except ValueError:
            raise RecipeError(f"{path}:{line_of_row(path, index)}: movieId must be an integer, got "
                              f"{row['movieId']!r}") from None
        genres = [] if row["genres"] in ("", "(no genres listed)") else row["genres"].split("|")
        movies[item] = Movie(row["title"].strip(), genres)
    return movies


@dataclass
class TrainExample:
    user: int
    profile: list[int]  # liked items before the target, oldest first
    target: int
    negatives: list[int]


@dataclass
class EvalCase:
    user: int
    profile: list[int]
    positive: int
    negatives: list[int]


@dataclass
class Split:
    train: list[TrainExample]
    validation: list[EvalCase]
    test: list[EvalCase]
    popularity: Counter  # ratings per movie in the training period
    cutoff: dict[int, int]  # per user: training uses only events strictly before this time
    skipped_users: int = 0
    train_events: dict[int, list[Rating]] = field(default_factory=dict)


def leave_last_out(ratings: Sequence[Rating], movies: dict[int, Movie], threshold: float, profile_size: int,
                   max_targets: int, train_negatives: int, eval_negatives: int, seed: int) -> Split:
    """The per-user, by-time split described in the module docstring; deterministic for a given `seed`.

    Users with fewer than three likes (a test, a validation and a training like) are left out. Ties in time are broken
    by movie id; events at the validation like's exact time count as future too.
    """
    rng = random.Random(seed)
    catalog = sorted(movies)
    by_user: dict[int, list[Rating]] = defaultdict(list)
    for r in ratings:
        if r.item in movies:
            by_user[r.user].append(r)

    def sample(exclude: set[int], n: int) -> list[int]:
        if len(catalog) - len(exclude) < n:
            raise RecipeError(f"cannot sample {n} movies a user has not rated: only {len(catalog) - len(exclude)} "
                              "are left; lower --num_eval_negatives / --train_negatives")
        out: list[int] = []
        chosen: set[int] = set()
        while len(out) < n:
            item = catalog[rng.randrange(len(catalog))]
            if item not in exclude and item not in chosen:
                chosen.add(item)
                out.append(item)
        return out

    split = Split([], [], [], Counter(), {})
    for user in sorted(by_user):
        events = sorted(by_user[user], key=lambda r: (r.timestamp, r.item))
        likes = [r for r in events if r.rating >= threshold]
        cutoff = likes[-2].timestamp if len(likes) >= 2 else None
        past = [r for r in events if cutoff is not None and r.timestamp < cutoff]
        past_likes = [r for r in past if r.rating >= threshold]
        if len(likes) < 3 or not past_likes:
            split.skipped_users += 1
            continue
        test, validation = likes[-1], likes[-2]
        split.cutoff[user] = cutoff
        split.train_events[user] = past
        split.popularity.update(r.item for r in past)
        known = {r.item for r in past}  # what the user had rated by the cutoff: the only history training may use
        for target in past_likes[-max_targets:]:
            profile = [r.item for r in past_likes if r.timestamp < target.timestamp][-profile_size:]
            split.train.append(TrainExample(user, profile, target.item, sample(known, train_negatives)))
        rated_ever = {r.item for r in events}  # the evaluation protocol: negatives are movies never rated
        for case, held_out in ((split.validation, validation), (split.test, test)):
            profile = [r.item for r in likes if r.timestamp < held_out.timestamp][-profile_size:]
            case.append(EvalCase(user, profile, held_out.item, sample(rated_ever, eval_negatives)))
    return split


def popularity_levels(popularity: Counter, catalog: Sequence[int]) -> dict[int, int]:
    """Decile 1-10 of each movie's training-period rating count among all movies (unrated movies: 1)."""
    counts = sorted(popularity[i] for i in catalog)
    levels = {}
    for item in catalog:
        below = bisect.bisect_left(counts, popularity[item])  # movies with strictly fewer ratings
        levels[item] = 1 + min(9, 10 * below // len(counts))
    return levels


def movie_text(movie: Movie, popularity_level: Optional[int] = None) -> str:
    text = f"{movie.title}. Genres: {', '.join(movie.genres) or 'unknown'}."
    return text if popularity_level is None else f"{text} Popularity: {popularity_level}/10."


def profile_text(items: list[int], movies: dict[int, Movie]) -> str:
    if not items:
        return "Recently liked: nothing yet."
    titles = "; ".join(movies[i].title for i in reversed(items))  # most recent first: truncation drops the oldest
    genres = Counter(g for i in items for g in movies[i].genres)
    top = ", ".join(g for g, _ in genres.most_common(4))
    return f"Genres liked: {top or 'unknown'}. Recently liked: {titles}."


# -------------------------------------------------------------------------------------------------------- model
class BiEncoder(nn.Module):
    """Scores (profile, movie) pairs by the cosine of mean-pooled embeddings from one shared encoder.

    Profiles and movies go through the encoder inside one `forward`, so DDP sees a single forward per step.
    """

    def __init__(self, encoder: nn.Module, temperature: float) -> None:
        super().__init__()
        self.encoder = encoder
        self.temperature = temperature

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)

    def forward(self, profile_input_ids: torch.Tensor, profile_attention_mask: torch.Tensor,
                item_input_ids: torch.Tensor, item_attention_mask: torch.Tensor,
                return_logits: bool = False) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Softmax loss of each profile's positive (first item of its group) against its sampled negatives; with
        `return_logits` also the (batch, 1 + negatives) scores it is taken over (what distillation compares)."""
        users = self.embed(profile_input_ids, profile_attention_mask)
        items = self.embed(item_input_ids, item_attention_mask).view(users.shape[0], -1, users.shape[1])
        logits = torch.einsum("bh,bnh->bn", users, items) / self.temperature
        loss = F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))
        return (loss, logits) if return_logits else loss


def bi_encoder_outputs(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(task loss, (batch, 1 + negatives) scores) of a `BiEncoder`, through its forward (so DDP sees it)."""
    return model(**batch, return_logits=True)


def drop_pooler(encoder: nn.Module) -> None:
    """The bi-encoder mean-pools the last hidden state: an unused pooler would get an adapter that never sees a
    gradient (trainable parameters that do nothing, and a crash in AdaLoRA's importance update, which reads every
    grad)."""
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None


class PairCollator:
    """Pads profiles and the flattened (positive + negatives) movie texts of a batch separately."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, features: list[dict]) -> dict:
        profiles = self.tokenizer.pad([{"input_ids": f["profile"]} for f in features], return_tensors="pt")
        items = self.tokenizer.pad([{"input_ids": ids} for f in features for ids in f["items"]], return_tensors="pt")
        return {"profile_input_ids": profiles["input_ids"], "profile_attention_mask": profiles["attention_mask"],
                "item_input_ids": items["input_ids"], "item_attention_mask": items["attention_mask"]}


def single_sequences(batch: dict) -> Iterator[dict]:
    """The encoder's inputs for each profile and movie text of a collated batch alone, without its padding (PEFT's
    CorDA init reads one sequence per forward pass; an example here is a profile and several movies)."""
    for prefix in ("profile", "item"):
        for ids, mask in zip(batch[f"{prefix}_input_ids"], batch[f"{prefix}_attention_mask"]):
            length = int(mask.sum())
            yield {"input_ids": ids[None, :length], "attention_mask": mask[None, :length]}


# ------------------------------------------------------------------------------------------------------ metrics
def user_rank_metrics(positive: torch.Tensor, negatives: torch.Tensor) -> dict[str, torch.Tensor]:
    """HR@10, NDCG@10 and AUC of each row's positive score against its negatives (ties count half), per row."""
    higher = (negatives > positive[:, None]).float().sum(1)
    ties = (negatives == positive[:, None]).float().sum(1)
    rank = higher + 0.5 * ties  # 0 = ranked first
    hit = rank < K
    ndcg = torch.where(hit, 1.0 / torch.log2(rank + 2.0), torch.zeros_like(rank))
    return {"hr_at_10": hit.float(), "ndcg_at_10": ndcg, "auc": 1.0 - rank / negatives.shape[1]}


def rank_metrics(positive: torch.Tensor, negatives: torch.Tensor) -> dict[str, float]:
    """The means over rows of `user_rank_metrics`."""
    return {name: values.mean().item() for name, values in user_rank_metrics(positive, negatives).items()}


def popularity_metrics(cases: list[EvalCase], popularity: Counter) -> dict[str, float]:
    scores = torch.tensor([[popularity[c.positive]] + [popularity[n] for n in c.negatives] for c in cases],
                          dtype=torch.float64)
    return {f"popularity_{k}": v for k, v in rank_metrics(scores[:, 0], scores[:, 1:]).items()}


@torch.no_grad()
def weights_fingerprint(model: nn.Module) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters() if p.requires_grad))


@torch.no_grad()
def embed_all(accelerator, model: BiEncoder, loader) -> torch.Tensor:
    """Embeddings of every text of a prepared, indexed loader, in index order, on all processes."""
    was_training = model.training
    model.eval()
    chunks: dict[int, torch.Tensor] = {}
    for batch in loader:
        index = batch.pop("index")
        vectors = model.embed(batch["input_ids"], batch["attention_mask"])
        index, vectors = accelerator.gather_for_metrics((index, vectors.float()))
        for i, v in zip(index.tolist(), vectors.cpu()):
            chunks[i] = v
    model.train(was_training)
    return torch.stack([chunks[i] for i in range(len(chunks))])


def eval_items(split: Split) -> list[int]:
    """Every movie ranked in validation or test (held-out likes and their negatives), sorted."""
    return sorted({i for cases in (split.validation, split.test) for c in cases for i in (c.positive, *c.negatives)})


class RankingEvaluator:
    """Ranks each validation or test user's held-out like against its negatives with a `BiEncoder`.

    `item_ids` maps (at least) every movie of `eval_items(split)` to the token ids of its text, `encode(texts,
    max_length)` tokenizes profiles. Calling it returns (metrics, report), the recipe's per-epoch evaluation.
    """

    def __init__(self, args: argparse.Namespace, accelerator, tokenizer, split: Split, movies: dict[int, Movie],
                 item_ids: dict[int, list[int]], encode) -> None:
        self.args, self.accelerator, self.tokenizer = args, accelerator, tokenizer
        self.cases = {"validation": split.validation, "test": split.test}
        items = eval_items(split)
        self.item_loader = self._loader([item_ids[i] for i in items])
        self.item_row = {item: row for row, item in enumerate(items)}
        self.profile_loaders = {name: self._loader(encode([profile_text(c.profile, movies) for c in group],
                                                          args.max_length)) for name, group in self.cases.items()}
        self.baselines = {name: popularity_metrics(group, split.popularity) for name, group in self.cases.items()}
        self.item_cache: dict[float, torch.Tensor] = {}

    def _loader(self, token_ids: list[list[int]]):
        features = [{"input_ids": ids, "index": i} for i, ids in enumerate(token_ids)]
        pad = IndexedCollator(lambda batch: self.tokenizer.pad(batch, return_tensors="pt"))
        return self.accelerator.prepare(eval_dataloader(features, pad, self.args.per_device_eval_batch_size))

    def scores(self, model: BiEncoder, name: str) -> torch.Tensor:
        """(users, 1 + negatives) cosine scores of the `name` split's users; the held-out like is column 0."""
        users = embed_all(self.accelerator, model, self.profile_loaders[name])
        # Encoding the catalogue is most of the cost: reuse it while the weights are unchanged (last epoch -> test).
        key = weights_fingerprint(model)
        if key not in self.item_cache:
            self.item_cache.clear()
            self.item_cache[key] = embed_all(self.accelerator, model, self.item_loader)
        items = self.item_cache[key]
        rows = torch.tensor([[self.item_row[c.positive]] + [self.item_row[n] for n in c.negatives]
                             for c in self.cases[name]])
        return torch.einsum("uh,unh->un", users, items[rows])

    def __call__(self, model: BiEncoder, name: str) -> tuple[dict, str]:
        scores = self.scores(model, name)
        cases, args = self.cases[name], self.args
        metrics = {**rank_metrics(scores[:, 0], scores[:, 1:]), **self.baselines[name], "num_users": len(cases)}
        report = "\n".join([f"{name}: {len(cases)} users, each held-out like ranked against "
                            f"{args.num_eval_negatives} movies the user never rated", "",
                            f"{'scorer':<12} {'HR@10':>8} {'NDCG@10':>8} {'AUC':>8}",
                            f"{'model':<12} {metrics['hr_at_10']:>8.4f} {metrics['ndcg_at_10']:>8.4f} "
                            f"{metrics['auc']:>8.4f}",
                            f"{'popularity':<12} {metrics['popularity_hr_at_10']:>8.4f} "
                            f"{metrics['popularity_ndcg_at_10']:>8.4f} {metrics['popularity_auc']:>8.4f}", ""])
        return metrics, report


def load_split(args: argparse.Namespace) -> tuple[dict[int, Movie], Split, Path]:
    """The movies and the leave-last-out split of `args.data_dir` (or the shared MovieLens), cut to the sample limits."""
    folder = resolve_data_dir(args.data_dir, DEFAULTS.dataset, FILES)
    movies = read_movies(folder / "movies.csv")
    ratings = read_ratings(folder / "ratings.csv")
    require_nonempty(movies, "movies", str(folder / "movies.csv"))
    split = leave_last_out(ratings, movies, args.positive_threshold, args.profile_size, args.max_targets_per_user,
                           args.train_negatives, args.num_eval_negatives, args.split_seed)
    split.train = take(split.train, args.max_train_samples)
    split.validation = take(split.validation, args.max_eval_samples)
    split.test = take(split.test, args.max_eval_samples)
    for name in ("train", "validation", "test"):
        require_nonempty(getattr(split, name), name, f"{folder / 'ratings.csv'}: users need >= 3 likes (rating >= "
                         f"{args.positive_threshold:g}) to be split")
    return movies, split, folder


def item_token_ids(args: argparse.Namespace, tokenizer, movies: dict[int, Movie], split: Split,
                   items: Sequence[int]) -> dict[int, list[int]]:
    """Token ids of each movie's text (with its popularity decile unless --no-popularity_in_text)."""
    levels = popularity_levels(split.popularity, sorted(movies)) if args.popularity_in_text else {}
    texts = [movie_text(movies[i], levels.get(i)) for i in items]
    return dict(zip(items, tokenizer(texts, truncation=True, max_length=args.item_max_length)["input_ids"]))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The recipe's flags with every default resolved (what `main` runs with and metrics.json records)."""
    return parse_recipe_args(__doc__.splitlines()[0], DEFAULTS, add_task_args, argv=argv)


def main(argv: Optional[Sequence[str]] = None) -> Optional[dict]:
    started = time.perf_counter()
    args = parse_args(argv)
    if args.dataset_name:
        raise RecipeError("recommend.py reads MovieLens files only: drop --dataset_name and pass --data_dir <folder "
                          "with ratings.csv and movies.csv>")
    if args.load_in_8bit or args.load_in_4bit:
        raise RecipeError("recommend.py trains an encoder without a task head; --load_in_8bit/--load_in_4bit are "
                          "supported by the classification recipes only")

    # Data: the leave-last-out split, then every movie's and training profile's text as token ids.
    movies, split, _ = load_split(args)
    accelerator = make_accelerator(args)
    tokenizer = load_tokenizer(args)
    accelerator.print(f"{len(split.train)} training examples; {len(split.test)} users evaluated "
                      f"({split.skipped_users} with too few likes left out)")

    def encode(texts: list[str], max_length: int) -> list[list[int]]:
        return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]

    needed = sorted({i for e in split.train for i in (e.target, *e.negatives)} | set(eval_items(split)))
    item_ids = item_token_ids(args, tokenizer, movies, split, needed)
    train_profiles = encode([profile_text(e.profile, movies) for e in split.train], args.max_length)
    train_features = [{"profile": p, "items": [item_ids[e.target]] + [item_ids[n] for n in e.negatives],
                       "length": len(p) + sum(len(item_ids[i]) for i in (e.target, *e.negatives))}
                      for p, e in zip(train_profiles, split.train)]
    schedule = plan_schedule(args, len(train_features), accelerator.num_processes)

    # Model and method: the adapter goes on the encoder, which the bi-encoder wraps.
    encoder = load_model(AutoModel, args)
    drop_pooler(encoder)
    calibration = CalibrationData(train_features, PairCollator(tokenizer), lambda m, batch: m(**batch),
                                  wrap=lambda enc: BiEncoder(enc, args.temperature), sequences=single_sequences)
    encoder = apply_method(encoder, args, "FEATURE_EXTRACTION", schedule.max_train_steps, calibration=calibration)
    model = BiEncoder(encoder, args.temperature)
    evaluate = RankingEvaluator(args, accelerator, tokenizer, split, movies, item_ids, encode)

    # Train. Distillation (off by default): per training example, over the scores of its positive and negatives (the
    # distribution the task loss uses), with the teacher encoder in the same bi-encoder (same --temperature).
    teacher = load_teacher(args, accelerator, AutoModel, None, tokenizer, prepare=drop_pooler,
                           wrap=lambda encoder: BiEncoder(encoder, args.temperature))
    compute_loss = (lambda m, batch: m(**batch)) if teacher is None else make_loss(teacher, args, bi_encoder_outputs)
    result = train(args, accelerator, model, train_features, PairCollator(tokenizer), evaluate, schedule,
                   task="recommend", compute_loss=compute_loss)
    usage = (
        "import torch.nn.functional as F\n{load}\nmodel.eval()\n\n"
        "def embed(texts):\n    batch = tokenizer(texts, padding=True, truncation=True, return_tensors='pt')\n"
        "    hidden = model(**batch).last_hidden_state\n    mask = batch['attention_mask'].unsqueeze(-1)\n"
        "    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)\n\n"
        'user = embed(["Genres liked: Comedy, Drama. Recently liked: Toy Story (1995); Heat (1995)."])\n'
        f'movies = embed(["{movie_text(Movie("Jumanji (1995)", ["Adventure", "Children", "Fantasy"]), 8 if args.popularity_in_text else None)}"])\n'
        "scores = user @ movies.T  # higher = more likely to be liked"
    )
    return finish_run(args, accelerator, model, tokenizer, result, evaluate, RunOutputs(
        task="recommend", dataset="movielens-small", pipeline="feature-extraction",
        auto_class="AutoPeftModelForFeatureExtraction", base_auto_class="AutoModel",
        report_name="ranking_report.txt", usage=usage,
        extra_metrics={"train_examples": len(split.train), "skipped_users": split.skipped_users}),
        started, print_report=True)


if __name__ == "__main__":
    run_main(main)
