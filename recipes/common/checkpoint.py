"""Checkpoints and the output folder: what a checkpoint holds (trainable weights, Accelerate's state, the loop's
position), finding and pruning checkpoints, and the checks and atomic swap that keep `--output_dir` to one run's files.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file, save_file
from torch import nn

from lra_peft._io import swap_in_dir, temp_dir_beside

from .errors import RecipeError

CHECKPOINT_PREFIX = "step_"
EPOCH_CHECKPOINT_PREFIX = "epoch_"  # as run_ner_no_trainer.py: epoch_N after epoch N (from 0)
PROGRESS_FILE = "progress.json"
TRAINABLE_STATE_FILE = "trainable_state.safetensors"  # a checkpoint's model part: trainable weights and buffers only
BEST_STATE_FILE = "best_state.safetensors"  # --load_best_model_at_end: the best epoch's trainable weights
# One atomic-folder helper for the library and the recipes (lra_peft/_io.py). Called through these module names, so
# that tests/test_reliability_resume.py can interrupt a run at the swap.
atomic_dir = temp_dir_beside
commit_dir = swap_in_dir


# Per output folder (resolved path): the entries an earlier run left there, by name -> (inode, mtime), when
# --overwrite_output_dir lets this run replace them. `save_outputs` swaps them for this run's outputs.
EARLIER_OUTPUTS: dict[Path, dict[str, tuple[int, int]]] = {}


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
    EARLIER_OUTPUTS.pop(out.resolve(), None)
    if not entries:
        return
    if args.overwrite_output_dir:
        EARLIER_OUTPUTS[out.resolve()] = {name: _identity(out / name) for name in entries}
    elif args.resume_from_checkpoint is None:
        shown = ", ".join(entries[:6]) + (", ..." if len(entries) > 6 else "")
        raise RecipeError(f"--output_dir {args.output_dir} already exists and is not empty (it holds {shown}); pass "
                          "--overwrite_output_dir to replace those files with this run's outputs, or choose another "
                          "--output_dir")


def _identity(path: Path) -> tuple[int, int]:
    stat = path.lstat()
    return stat.st_ino, stat.st_mtime_ns


def replace_earlier_outputs(output_dir: Path, final_files: Path) -> None:
    """Make `output_dir` hold this run's files only: `final_files`' content plus what this run wrote there
    (checkpoints, tracker logs), swapped in by renames so that the folder never mixes two runs' outputs."""
    out = output_dir.absolute().resolve()
    earlier = EARLIER_OUTPUTS.pop(out, {})
    new = atomic_dir(out.parent / f"{out.name}.new")
    os.replace(final_files, new)
    for item in out.iterdir():
        if item.name not in earlier or _identity(item) != earlier[item.name]:
            if not (new / item.name).exists():
                os.replace(item, new / item.name)  # written by this run: keep it
    commit_dir(new, out)


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
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        return  # these save sharded models their own way; `weights` is empty for them

    def file_name(i: int) -> str:
        return TRAINABLE_STATE_FILE if i == 0 else TRAINABLE_STATE_FILE.replace(".", f"_{i}.", 1)

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        if accelerator.is_main_process:
            for i, model in enumerate(models):
                save_file(trainable_state(accelerator.unwrap_model(model)), os.path.join(output_dir, file_name(i)))
        weights.clear()  # Accelerate would save each model's full state dict next to it

    def load_hook(models: list, input_dir: str) -> None:
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

