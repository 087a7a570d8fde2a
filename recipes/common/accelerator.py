"""The Accelerate runtime of a run: the `Accelerator` (after checking `--output_dir`), its trackers, and the seed."""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch
import transformers
from accelerate import Accelerator
from accelerate.utils import set_seed

from .checkpoint import check_output_dir
from .errors import RecipeError


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
    if not accelerator.is_local_main_process:
        transformers.utils.logging.set_verbosity_error()
    return accelerator
