"""Task quality at a fixed budget: every recipe (recipes/*.py) × method × seed, mean ± std over seeds.

Each run is one subprocess, `python recipes/<task>.py --method M --seed S ... --output_dir D` (or `accelerate launch
...` with --launcher accelerate); the recipe writes `D/metrics.json`, which this script reads. Runs whose metrics.json
already exists with the same arguments are reused (pass --fresh to rerun them), so an interrupted sweep continues
where it stopped, and a later sweep over more methods or seeds re-tabulates the earlier runs without repeating them.

    .venv/bin/python benchmarks/quality.py --quick   # reduced: 160 train / 200 eval examples, 20 steps of 8
    .venv/bin/python benchmarks/quality.py           # full: each recipe's default schedule on all its data (hours)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import (  # noqa: E402
    REPO_ROOT,
    LoadRecorder,
    default_output,
    machine_lines,
    markdown_table,
    write_result,
)

# Each row's recipe flags. The adaptive methods start at rank 12 and prune to an average of 8 per layer, so their final
# budget equals LoRA's and LRA's r = 8.
METHOD_FLAGS = {
    "lra": ("--method", "lra"),
    "lra-adaptive": ("--method", "lra", "--r", "12", "--target_r", "8"),
    # LRA with the task-aware initialisations (lra_peft.preprocess on --calibration_samples training examples)
    "lra-corda": ("--method", "lra", "--init_weights", "corda"),
    "lra-gradient": ("--method", "lra", "--init_weights", "gradient"),
    "lora": ("--method", "lora"),
    "adalora": ("--method", "adalora", "--r", "12", "--target_r", "8"),
    "full": ("--method", "full"),
}
METHODS = ("lra", "lra-adaptive", "lora", "adalora", "full")
SEEDS = (42, 0, 1)  # 42 first: the recipes' default seed, so a one-seed sweep is the recipes run at their defaults
# The headline metric of each recipe (metrics.json has it as test_<name> and eval_<name>); unknown recipes report
# every numeric test_ metric.
PRIMARY = {"ner": "f1", "sentiment": "accuracy", "intent": "accuracy", "recommend": "ndcg_at_10"}
# The test metrics listed per run, below the summary (recommend: the model's and the popularity baseline's).
DETAIL = {"ner": ("precision", "recall", "f1", "token_accuracy"), "sentiment": ("accuracy", "f1"),
          "intent": ("accuracy", "macro_f1"),
          "recommend": ("hr_at_10", "ndcg_at_10", "auc", "popularity_hr_at_10", "popularity_ndcg_at_10",
                        "popularity_auc")}


@dataclass(frozen=True)
class Budget:
    max_train_steps: int | None  # None: each recipe's default schedule (its --num_train_epochs)
    max_train_samples: int | None
    max_eval_samples: int | None
    flags: tuple[str, ...] = ()  # more recipe flags that belong to the budget


FULL = Budget(max_train_steps=None, max_train_samples=None, max_eval_samples=None)
QUICK = Budget(max_train_steps=20, max_train_samples=160, max_eval_samples=200,
               flags=("--per_device_train_batch_size", "8", "--max_length", "64"))


# Recipes without a shared dataset or default model to run on (instruct.py needs --model_name_or_path of a causal LM
# and --train_file): left out of the default sweep; name them in --recipes (with their flags after --) to run them.
NOT_IN_DEFAULT_SWEEP = {"instruct"}


def find_recipes(recipe_dir: Path) -> list[str]:
    return sorted(p.stem for p in recipe_dir.glob("*.py")
                  if not p.name.startswith("_") and p.stem not in NOT_IN_DEFAULT_SWEEP)


def recipe_args(method: str, seed: int, budget: Budget, output_dir: Path, extra: list[str]) -> list[str]:
    if method not in METHOD_FLAGS:
        raise SystemExit(f"unknown method {method!r}; use one of {', '.join(METHOD_FLAGS)}")
    args = [*METHOD_FLAGS[method], "--seed", str(seed), "--output_dir", str(output_dir)]
    if budget.max_train_steps is not None:
        args += ["--max_train_steps", str(budget.max_train_steps)]
    if budget.max_train_samples is not None:
        args += ["--max_train_samples", str(budget.max_train_samples)]
    if budget.max_eval_samples is not None:
        args += ["--max_eval_samples", str(budget.max_eval_samples)]
    return args + list(budget.flags) + extra


# Paths that the recipe resolves after parsing, or that name where the run went: not defaults that change results.
NOT_COMPARED = {"output_dir", "model_name_or_path", "data_dir", "overwrite_output_dir"}
# Recipe flags that only --method lra reads (recipes/common/args.py): a new default for them leaves other methods' runs valid.
LRA_ONLY = {"init_weights", "uv_lr_scale", "uv_gain", "calibration_samples"}


def _same_planned_length(now: dict, metrics: dict) -> bool:
    """Whether today's task default epochs and --min_train_steps plan the epochs the run ran: they act only through
    them, not at all when --num_train_epochs / --max_train_steps is given, and only the default epochs act when
    --max_train_samples cuts the data (recipes/common/schedule.py plan_schedule)."""
    from common.schedule import planned_epochs  # imported with the recipe (_recipe_module)

    if any(now.get(k) is not None for k in ("num_train_epochs", "max_train_steps")):
        return True
    default = now.get("task_num_train_epochs")
    if now.get("max_train_samples") is not None:
        return default == metrics.get("args", {}).get("task_num_train_epochs")
    epochs, steps = metrics.get("epochs"), metrics.get("train_steps")
    if not (epochs and steps and default):
        return False
    return planned_epochs(default, now["min_train_steps"] or 0, math.ceil(steps / epochs)) == epochs


def changed_defaults(recipe: Path, args: list[str], metrics: dict) -> list[str]:
    """The flags whose value the recipe resolves differently today from what the run recorded in metrics.json.

    The same command line can mean a different run once a recipe's default changes (say --init_weights), so a run is
    reused only if the recipe's `parse_args(args)` still gives the values it ran with. Recipes without `parse_args`
    (or runs without recorded `args`) are compared by their command line alone.
    """
    recorded = metrics.get("args")
    # Importing runs a script's top level: only recipes that define parse_args (and so keep main() behind
    # `if __name__ == "__main__"`, as recipes/*.py do) are imported.
    if not isinstance(recorded, dict) or "\ndef parse_args(" not in recipe.read_text():
        return []
    module = _recipe_module(recipe)
    ignored = NOT_COMPARED | (LRA_ONLY if recorded.get("method") != "lra" else set())
    now = {k: v for k, v in vars(module.parse_args(args)).items() if k not in ignored}
    now = json.loads(json.dumps(now))  # tuples -> lists etc., as metrics.json stores them
    # --num_train_epochs left out is planned from the data when the recipe runs (at least the task's default epochs,
    # recipes/common/schedule.py plan_schedule), and the run records the epochs it planned: a run that ran those is the same run.
    # The task's default epochs and the minimum act only through that plan (not at all under an explicit epoch flag).
    planning = ("min_train_steps", "task_num_train_epochs")
    if any(k in now and now[k] != recorded.get(k) for k in planning) \
            and _same_planned_length(now, metrics):
        for k in planning:
            now.pop(k, None)
    if "num_train_epochs" in now and now["num_train_epochs"] is None \
            and recorded.get("num_train_epochs") == metrics.get("epochs"):
        now.pop("num_train_epochs")
    return [f"--{k} {recorded.get(k)!r} -> {v!r}" for k, v in now.items() if k in recorded and recorded[k] != v]


def flags_without_output_dir(args: list[str]) -> list[str]:
    """A run's flags without where it went (the same run may have been made in another folder)."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == "--output_dir":
            skip = True
        elif a != "--overwrite_output_dir":
            out.append(a)
    return out


def archived_run(path: Path, recipe: Path, run_args: list[str]) -> dict | None:
    """The archived metrics.json at `path` if it is the run `run_args` asks for today, else None.

    A run that recorded its resolved flags (metrics.json "args") is compared by them with what the recipe resolves
    `run_args` to today, so a command that spelled a default out, or left it implicit, is still the same run; other
    runs (or recipes without `parse_args`) by their command line, output folder aside."""
    if not path.exists():
        return None
    metrics = json.loads(path.read_text())
    if isinstance(metrics.get("args"), dict) and "\ndef parse_args(" in recipe.read_text():
        return None if changed_defaults(recipe, run_args, metrics) else metrics
    command = metrics.get("command", "").split()
    at = [i for i, a in enumerate(command) if Path(a).name == recipe.name]  # the recipe, whatever its folder
    ran = command[at[0] + 1:] if at else None
    if ran is None or flags_without_output_dir(ran) != flags_without_output_dir(run_args):
        return None
    return metrics


_MODULES: dict[Path, Any] = {}


def _recipe_module(recipe: Path) -> Any:
    if recipe not in _MODULES:
        import importlib.util

        sys.path.insert(0, str(recipe.parent))  # the recipes import their shared `common` package
        try:
            spec = importlib.util.spec_from_file_location(f"_quality_recipe_{recipe.stem}", recipe)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module  # dataclasses look their module up there
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(recipe.parent))
        _MODULES[recipe] = module
    return _MODULES[recipe]


def run_one(recipe: Path, args: list[str], output_dir: Path, launcher: str, fresh: bool, log_dir: Path,
            existing_only: bool = False) -> dict | None:
    """Run one recipe (or reuse its earlier metrics.json when run with the same arguments; with `existing_only`,
    return None instead of running)."""
    metrics_file = output_dir / "metrics.json"
    stamp = output_dir / "benchmark_args.json"
    if not fresh and metrics_file.exists() and stamp.exists() and json.loads(stamp.read_text()) == args:
        metrics = json.loads(metrics_file.read_text())
        changed = changed_defaults(recipe, args, metrics)
        if not changed:
            return metrics
        print(f"{output_dir.name}: rerun, the recipe's defaults changed since it ran ({', '.join(changed)})", flush=True)
    if existing_only:
        return None
    # A rerun replaces the earlier run's files in output_dir, which the recipe only does when told to. The flag is not
    # part of `args`, the run's identity in benchmark_args.json (earlier runs stay reusable).
    run_args = [*args, "--overwrite_output_dir"]
    if launcher == "accelerate":
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", str(recipe), *run_args]
    else:
        cmd = [sys.executable, str(recipe), *run_args]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{output_dir.name}.log"
    started = time.perf_counter()
    with log.open("w") as handle:
        proc = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT, check=False)
    if proc.returncode != 0 or not metrics_file.exists():
        tail = "\n".join(log.read_text().splitlines()[-25:])
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}); last lines of {log}:\n{tail}")
    stamp.write_text(json.dumps(args))
    metrics = json.loads(metrics_file.read_text())
    metrics.setdefault("benchmark_wall_s", round(time.perf_counter() - started, 1))
    return metrics


def headline(recipe: str, metrics: dict) -> dict[str, float]:
    """The metrics to tabulate: the recipe's primary metric on test and validation, or every numeric test_ metric."""
    name = PRIMARY.get(recipe)
    if name is not None and f"test_{name}" in metrics:
        keys = [f"test_{name}", f"eval_{name}"]
    else:
        keys = sorted(k for k, v in metrics.items() if k.startswith("test_") and isinstance(v, (int, float)))
    return {k: float(metrics[k]) for k in keys if isinstance(metrics.get(k), (int, float))}


def run_row(recipe: str, method: str, seed: int, metrics: dict) -> list:
    names = DETAIL.get(recipe, ())
    tests = ", ".join(f"{n} {100 * metrics[f'test_{n}']:.2f}" for n in names
                      if isinstance(metrics.get(f"test_{n}"), (int, float)))
    primary = metrics.get(f"eval_{PRIMARY.get(recipe, '')}")
    return [recipe, method, seed, tests or "n/a", f"{100 * primary:.2f}" if isinstance(primary, (int, float)) else "n/a",
            metrics.get("trainable_params", "n/a"), metrics.get("train_runtime_s", "n/a"),
            metrics.get("total_runtime_s", "n/a")]


def mean_std(values: list[float]) -> str:
    if not values:
        return "n/a"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {std:.4f}"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="reduced budget (subsets, few steps)")
    parser.add_argument("--recipes", default=None, help="comma list (default: every recipes/*.py but NOT_IN_DEFAULT_SWEEP)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", default=",".join(str(s) for s in SEEDS))
    parser.add_argument("--max_train_steps", type=int, default=None)
    parser.add_argument("--max_train_samples", type=int, default=None)
    parser.add_argument("--max_eval_samples", type=int, default=None)
    parser.add_argument("--launcher", choices=("python", "accelerate"), default="python")
    parser.add_argument("--recipe-dir", default=str(REPO_ROOT / "recipes"))
    parser.add_argument("--runs-dir", default=None, help="where each run's output_dir goes (default outputs/quality*)")
    parser.add_argument("--fresh", action="store_true", help="rerun runs that already have a metrics.json")
    parser.add_argument("--existing-only", action="store_true",
                        help="run nothing: tabulate the runs already done with these arguments, count the rest as missing")
    parser.add_argument("--out", default=None)
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more flags passed to every recipe")
    args = parser.parse_args(argv)

    base = QUICK if args.quick else FULL
    budget = Budget(
        max_train_steps=args.max_train_steps or base.max_train_steps,
        max_train_samples=args.max_train_samples if args.max_train_samples is not None else base.max_train_samples,
        max_eval_samples=args.max_eval_samples if args.max_eval_samples is not None else base.max_eval_samples,
        flags=base.flags,
    )
    recipe_dir = Path(args.recipe_dir)
    recipes = args.recipes.split(",") if args.recipes else find_recipes(recipe_dir)
    if not recipes:
        raise SystemExit(f"no recipes found in {recipe_dir}")
    methods = args.methods.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    extra = [a for a in args.extra if a != "--"]
    runs_dir = Path(args.runs_dir or REPO_ROOT / "outputs" / ("quality_quick" if args.quick else "quality"))

    load = LoadRecorder()
    rows, runs = [], []
    for recipe in recipes:
        for method in methods:
            results = []
            for seed in seeds:
                output_dir = runs_dir / f"{recipe}-{method}-seed{seed}"
                run_args = recipe_args(method, seed, budget, output_dir, extra)
                metrics = run_one(recipe_dir / f"{recipe}.py", run_args, output_dir, args.launcher, args.fresh,
                                  runs_dir / "logs", args.existing_only)
                if metrics is None:
                    continue
                results.append(metrics)
                runs.append(run_row(recipe, method, seed, metrics))
                print(f"{recipe} {method} seed {seed}: {headline(recipe, metrics)}", flush=True)
            if not results:
                rows.append([recipe, method, 0, "not run", "n/a", "n/a"])
                continue
            keys = list(dict.fromkeys(k for m in results for k in headline(recipe, m)))
            scores = "; ".join(f"{k} {mean_std([headline(recipe, m)[k] for m in results if k in headline(recipe, m)])}"
                               for k in keys)
            trainable = results[0].get("trainable_params", "n/a")
            runtime = [float(m["train_runtime_s"]) for m in results if "train_runtime_s" in m]
            rows.append([recipe, method, len(results), scores, trainable,
                         f"{statistics.median(runtime):.0f}" if runtime else "n/a"])
    load.stop()
    headers = ["recipe", "method", "seeds", "score (mean ± std over seeds)", "trainable params", "train s (median)"]
    steps = budget.max_train_steps or "each recipe's default epochs"
    budget_text = (f"max_train_steps={steps}, max_train_samples={budget.max_train_samples or 'all'}, "
                   f"max_eval_samples={budget.max_eval_samples or 'all'} (validation and test){' '.join(('',) + budget.flags)}")
    text = "\n".join([
        "# Task quality at a fixed budget" + (" (reduced mode: a smoke check, not a result)" if args.quick else ""),
        "",
        *machine_lines(),
        load.line(own_load=min(2, os.cpu_count() or 1), interleaved=False),
        f"- Command: `python benchmarks/quality.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"- Budget, the same for every method: {budget_text}; seeds {seeds}; each recipe's own defaults otherwise "
        f"(learning rate, batch size, r = 8, targets){'; extra recipe flags: ' + ' '.join(extra) if extra else ''}. "
        "Adaptive methods: " + "; ".join(f"{m} = `{' '.join(METHOD_FLAGS[m])}`" for m in ("lra-adaptive", "adalora"))
        + " (final average rank 8, the same budget as r = 8).",
        "- Scores: test_ is the recipe's test split, eval_ its validation split; mean ± sample std over seeds.",
        "",
        markdown_table(headers, rows),
        "",
        "Each run (test metrics in %; train s = the training loop, total s = the whole recipe):",
        "",
        markdown_table(["recipe", "method", "seed", "test metrics", "eval (primary metric)",
                        "trainable params", "train s", "total s"], runs),
    ])
    write_result(args.out or default_output("quality_quick" if args.quick else "quality"), text)
    return text


if __name__ == "__main__":
    main()
