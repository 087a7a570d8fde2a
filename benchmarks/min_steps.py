"""How many optimizer steps a recipe needs on a small training set, read on the validation split.

Runs one recipe on a small training slice (`--max_train_samples N`) for each S in `--steps` (`--max_train_steps S`,
so the learning-rate schedule spans the S steps as in a real run of that length) and each variant in `--variants`,
and tabulates the validation score (the recipe's primary metric). The test split is not shown and chooses nothing.
Per variant, the smallest S whose score is within `--tolerance` points of the variant's best is reported: the
evidence behind the recipes' minimum number of optimizer steps (`common/schedule.py` plan_schedule, docs/recipes.md).

Resumable: a run whose `metrics.json` exists (in `--runs-dir`, or archived in `benchmarks/results/min_steps/`) with
the same arguments is reused, not rerun; each finished run's `metrics.json` (holding its exact command) is archived
there. Run it several times with different `--steps` / `--variants`: the table shows every archived run of the
recipe and slice.

    nice -n 19 .venv/bin/python benchmarks/min_steps.py --recipe ner --max_train_samples 3000 \
        --max_eval_samples 500 --steps 100,200,400,800 --variants lra,lora
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import REPO_ROOT, RESULTS_DIR, LoadRecorder, machine_lines, markdown_table, write_result  # noqa: E402
from quality import PRIMARY, archived_run, run_one  # noqa: E402

# The variants compared: each method at the recipe's defaults; the -uv1 ones without the U/V learning-rate rule
# (issue #23, early steps); the -principal ones for recipes whose LRA default is another init (intent, sentiment:
# minor, whose λ₀ is below the rule's gain, so the rule changes nothing there).
VARIANTS = {
    "lra": ("--method", "lra"),
    "lra-uv1": ("--method", "lra", "--uv_lr_scale", "1"),
    "lra-principal": ("--method", "lra", "--init_weights", "principal"),
    "lra-principal-uv1": ("--method", "lra", "--init_weights", "principal", "--uv_lr_scale", "1"),
    "lora": ("--method", "lora"),
}
ARCHIVE = RESULTS_DIR / "min_steps"


def run_name(recipe: str, variant: str, samples: int, steps: int, seed: int) -> str:
    return f"{recipe}-n{samples}-{variant}-s{steps}-seed{seed}"


def run_args(variant: str, samples: int, eval_samples: int, steps: int, seed: int, output_dir: Path,
             extra: list[str]) -> list[str]:
    if variant not in VARIANTS:
        raise SystemExit(f"unknown variant {variant!r}; use one of {', '.join(VARIANTS)}")
    return [*VARIANTS[variant], "--seed", str(seed), "--output_dir", str(output_dir), "--max_train_samples",
            str(samples), "--max_eval_samples", str(eval_samples), "--max_train_steps", str(steps), *extra]


def archived(name: str, recipe: Path, args: list[str]) -> dict | None:
    """The archived metrics.json of the run `name` if it is the run `args` asks for with today's recipe defaults."""
    return archived_run(ARCHIVE / f"{name}.json", recipe, args)


def shortest_near_best(scores: dict[int, float], tolerance: float) -> int:
    """The fewest steps whose score (points) is within `tolerance` points of the best of `scores` (steps -> score)."""
    best = max(scores.values())
    return min(s for s, v in scores.items() if v >= best - tolerance)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--max_train_samples", type=int, required=True, help="size of the small training slice")
    parser.add_argument("--max_eval_samples", type=int, default=500, help="validation examples scored")
    parser.add_argument("--steps", required=True, help="comma list of --max_train_steps, e.g. 100,200,400,800")
    parser.add_argument("--variants", default="lra,lora", help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--tolerance", type=float, default=1.0, help="points below the best that still count")
    parser.add_argument("--runs-dir", default=str(REPO_ROOT / "outputs" / "min_steps"))
    parser.add_argument("--recipe-dir", default=str(REPO_ROOT / "recipes"))
    parser.add_argument("--existing-only", action="store_true", help="run nothing; tabulate the runs archived")
    parser.add_argument("--out", default=None)
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more flags passed to every run")
    args = parser.parse_args(argv)

    recipe = Path(args.recipe_dir) / f"{args.recipe}.py"
    metric = PRIMARY[args.recipe]
    runs_dir = Path(args.runs_dir)
    extra = [a for a in args.extra if a != "--"]
    ARCHIVE.mkdir(parents=True, exist_ok=True)

    load = LoadRecorder()
    for variant in args.variants.split(","):
        for steps in (int(s) for s in args.steps.split(",")):
            name = run_name(args.recipe, variant, args.max_train_samples, steps, args.seed)
            flags = run_args(variant, args.max_train_samples, args.max_eval_samples, steps, args.seed,
                             runs_dir / name, extra)
            metrics = None if (runs_dir / name / "metrics.json").exists() else archived(name, recipe, flags)
            if metrics is None:
                metrics = run_one(recipe, flags, runs_dir / name, "python", False, runs_dir / "logs",
                                  args.existing_only)
            if metrics is None:
                continue
            (ARCHIVE / f"{name}.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
            print(f"{name}: eval_{metric} {100 * float(metrics[f'eval_{metric}']):.2f}", flush=True)
    load.stop()

    # The table: every archived run of this recipe, slice and seed (earlier invocations' too).
    table: dict[str, dict[int, tuple[float, dict]]] = {}
    prefix = f"{args.recipe}-n{args.max_train_samples}-"
    for path in sorted(ARCHIVE.glob(f"{prefix}*-seed{args.seed}.json")):
        variant, _, steps = path.stem[len(prefix):].rpartition(f"-seed{args.seed}")[0].rpartition("-s")
        metrics = json.loads(path.read_text())
        command = metrics.get("command", "").split()
        evals = command[command.index("--max_eval_samples") + 1] if "--max_eval_samples" in command else None
        if variant in VARIANTS and evals == str(args.max_eval_samples):
            table.setdefault(variant, {})[int(steps)] = (100 * float(metrics[f"eval_{metric}"]), metrics)
    all_steps = sorted({s for runs in table.values() for s in runs})
    rows, chosen = [], []
    for variant, runs in table.items():
        rows.append([variant, *(f"{runs[s][0]:.2f}" if s in runs else "" for s in all_steps)])
        scores = {s: v for s, (v, _) in runs.items()}
        pick = shortest_near_best(scores, args.tolerance)
        epochs = runs[pick][1].get("train_length", {}).get("epochs_run", runs[pick][1].get("num_train_epochs", ""))
        chosen.append([variant, f"{max(scores.values()):.2f}", pick, epochs, f"{scores[pick]:.2f}"])
    one = next(iter(next(iter(table.values())).values()))[1] if table else {}
    text = "\n".join([
        f"# Minimum training steps on a small slice: {args.recipe}, {args.max_train_samples} training examples",
        "",
        *machine_lines(),
        load.line(own_load=1, interleaved=False),
        f"- Command: `python benchmarks/min_steps.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"- One run's command (the others differ by --method / --max_train_steps): `{one.get('command', '')}`",
        f"- Seed {args.seed}; validation: the first {args.max_eval_samples} examples; each recipe default otherwise "
        "(the schedule spans each run's own --max_train_steps).",
        f"- Score: validation {metric} × 100 (the test split is not read for the choice).",
        "",
        markdown_table(["variant", *(f"{s} steps" for s in all_steps)], rows),
        "",
        f"Fewest steps within {args.tolerance:g} point(s) of the variant's best:",
        "",
        markdown_table(["variant", "best", "fewest steps near it", "epochs", "score there"], chosen),
    ])
    out = args.out or RESULTS_DIR / "min_steps" / f"{args.recipe}-n{args.max_train_samples}.md"
    write_result(out, text)
    shutil.rmtree(runs_dir / "__pycache__", ignore_errors=True)
    return text


if __name__ == "__main__":
    main()
