"""Choose each method's learning rate and schedule on the validation split, from one grid shared by every method.

Each grid cell is one recipe run (`recipes/<task>.py --method M --learning_rate LR --lr_scheduler_type S
[--num_warmup_steps W] --seed 42`); runs whose `metrics.json` already exists with the same arguments are reused, so
a sweep can be interrupted and continued, and a later, wider grid re-tabulates the cells already run. Each finished
run's `metrics.json` (which holds its exact command) is also copied to `benchmarks/results/tune/`, so the scores
behind a choice survive a fresh checkout. The winner of each method is the cell with the best *validation* score
(the recipe's primary metric); test scores are neither shown nor used here.

    .venv/bin/python benchmarks/tune.py --recipe ner --methods lra,lora --learning_rates 1e-3 \
        --schedules linear,linear+warmup,constant,constant+warmup --warmup_steps 26
    .venv/bin/python benchmarks/tune.py --recipe ner --methods full --learning_rates 2e-5,5e-5,1e-4,2e-4 ...

Schedules: `linear` and `constant` (no warm-up), `linear+warmup` and `constant+warmup` (`--num_warmup_steps
--warmup_steps`; the constant one is Transformers' `constant_with_warmup`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import REPO_ROOT, RESULTS_DIR, LoadRecorder, machine_lines, markdown_table, write_result  # noqa: E402
from quality import FULL, METHOD_FLAGS, PRIMARY, archived_run, recipe_args, run_one  # noqa: E402

SCHEDULES = {
    "linear": ("linear", False),
    "linear+warmup": ("linear", True),
    "constant": ("constant", False),
    "constant+warmup": ("constant_with_warmup", True),
}
ARCHIVE = RESULTS_DIR / "tune"


def cell_name(recipe: str, method: str, lr: str, schedule: str, seed: int) -> str:
    return f"{recipe}-{method}-lr{lr}-{schedule.replace('+', '-')}-seed{seed}"


def cell_flags(lr: str, schedule: str, warmup_steps: int) -> list[str]:
    if schedule not in SCHEDULES:
        raise SystemExit(f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")
    name, warm = SCHEDULES[schedule]
    # Every flag of the cell explicit, so that a recipe's per-method defaults (TaskDefaults.method_defaults) never
    # change what a cell means.
    return ["--learning_rate", lr, "--lr_scheduler_type", name, "--num_warmup_steps", str(warmup_steps if warm else 0)]


def archive(name: str, metrics: dict) -> None:
    ARCHIVE.mkdir(parents=True, exist_ok=True)
    (ARCHIVE / f"{name}.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")


def archived(name: str, recipe: Path, run_args: list[str]) -> dict | None:
    """The archived metrics.json of a cell run earlier with the same flags (its run folder may be gone: the archive is
    what a fresh checkout has), or None when there is none or the recipe now resolves its flags differently."""
    return archived_run(ARCHIVE / f"{name}.json", recipe, run_args)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--methods", required=True, help=f"comma list of {', '.join(METHOD_FLAGS)}")
    parser.add_argument("--learning_rates", required=True, help="comma list, e.g. 5e-4,1e-3,2e-3")
    parser.add_argument("--schedules", default="linear", help=f"comma list of {', '.join(SCHEDULES)}")
    parser.add_argument("--warmup_steps", type=int, default=0, help="warm-up of the +warmup schedules, in steps")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--tag", default="", help="appended to the cell names, for cells that differ by the flags after --")
    parser.add_argument("--runs-dir", default=str(REPO_ROOT / "outputs" / "tune"))
    parser.add_argument("--existing-only", action="store_true", help="run nothing; tabulate the cells already run")
    parser.add_argument("--out", default=None)
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more flags passed to every run")
    args = parser.parse_args(argv)

    recipe = REPO_ROOT / "recipes" / f"{args.recipe}.py"
    metric = f"eval_{PRIMARY[args.recipe]}"
    runs_dir = Path(args.runs_dir)
    extra = [a for a in args.extra if a != "--"]
    schedules = args.schedules.split(",")
    if any(SCHEDULES[s][1] for s in schedules if s in SCHEDULES) and args.warmup_steps <= 0:
        raise SystemExit("a +warmup schedule needs --warmup_steps > 0")

    load = LoadRecorder()
    rows, best = [], {}
    for method in args.methods.split(","):
        for lr in args.learning_rates.split(","):
            for schedule in schedules:
                name = cell_name(args.recipe, method, lr, schedule, args.seed) + (f"-{args.tag}" if args.tag else "")
                run_args = recipe_args(method, args.seed, FULL, runs_dir / name,
                                       cell_flags(lr, schedule, args.warmup_steps) + extra)
                metrics = None if (runs_dir / name / "metrics.json").exists() else archived(name, recipe, run_args)
                if metrics is None:
                    metrics = run_one(recipe, run_args, runs_dir / name, "accelerate", False, runs_dir / "logs",
                                      args.existing_only)
                if metrics is None:
                    rows.append([method, lr, schedule, "not run", ""])
                    continue
                archive(name, metrics)
                score = float(metrics[metric])
                print(f"{name}: {metric} {score:.4f}", flush=True)
                rows.append([method, lr, schedule, f"{100 * score:.2f}", f"[run](tune/{name}.json)"])
                if method not in best or score > best[method][0]:
                    best[method] = (score, lr, schedule)
    load.stop()
    winners = [[m, lr, s, f"{100 * score:.2f}"] for m, (score, lr, s) in best.items()]
    text = "\n".join([
        f"# Validation grid: {args.recipe}",
        "",
        *machine_lines(),
        load.line(own_load=2, interleaved=False),
        f"- Command: `python benchmarks/tune.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"- Seed {args.seed}; each recipe default otherwise; warm-up {args.warmup_steps} steps where a schedule has one.",
        f"- Score: validation {PRIMARY[args.recipe]} × 100 (the test split is not read for the choice).",
        "",
        markdown_table(["method", "learning rate", "schedule", f"validation {PRIMARY[args.recipe]}", "metrics.json"],
                       rows),
        "",
        "Best cell per method (by validation):",
        "",
        markdown_table(["method", "learning rate", "schedule", f"validation {PRIMARY[args.recipe]}"], winners),
    ])
    out = args.out or RESULTS_DIR / f"tune-{args.recipe}-{'-'.join(args.methods.split(','))}.md"
    write_result(out, text)
    shutil.rmtree(runs_dir / "__pycache__", ignore_errors=True)
    return text


if __name__ == "__main__":
    main()
