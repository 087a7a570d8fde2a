"""What a run leaves in `--output_dir`: the adapter (or full model), tokenizer, labels, metrics.json, the report and
the model card, swapped in atomically; and the upload with `--push_to_hub`."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Optional

from huggingface_hub import HfApi
from torch import nn

import lra_peft
from lra_peft.hub import public_base_model

from . import distill
from .args import command
from .card import RunOutputs, lra_card_section, model_card
from .checkpoint import CHECKPOINT_PREFIX, EARLIER_OUTPUTS, EPOCH_CHECKPOINT_PREFIX, atomic_dir, replace_earlier_outputs
from .errors import RecipeError
from .loop import EvalFn, TrainResult
from .lora_inits import save_adapter
from .methods import count_parameters, find_peft_model


def _flat_metrics(prefix: str, metrics: dict) -> dict:
    return {f"{prefix}_{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


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
        "command": command(),
        "distillation": distill.settings(args),
        "args": {k: (v if isinstance(v, (int, float, str, bool, list, type(None))) else str(v))
                 for k, v in vars(args).items() if k != "hub_token"},
    }
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (tmp / run.report_name).write_text(run.report_text)
    hub_base = public_base_model(args.model_name_or_path, args.hub_base_model_id)
    # The recipes never resize the vocabulary, so the embedding matrix is never saved with an adapter (PEFT's "auto"
    # would look the base's config up on the Hub to find that out, now that the base is named by Hub id).
    state = {"state_dict": full_state} if full_state is not None and saved is unwrapped else {}
    with public_base_name(saved, peft_model, hub_base):
        if peft_model is not None:  # PiSSA / CorDA / LoRA-GA LoRA: converted for the original base (lora_inits.py)
            save_adapter(saved, tmp, save_embedding_layers=False, **state)
        else:
            saved.save_pretrained(str(tmp), safe_serialization=True, **state)
        lra_section = lra_card_section(peft_model, run) if args.method == "lra" else ""
    # The recipe's card replaces the one PEFT (or lra_peft's save hook) just wrote: one card, one of each section.
    (tmp / "README.md").write_text(model_card(args, run, metrics, peft_model is not None, hub_base, lra_section))
    if output_dir.absolute().resolve() in EARLIER_OUTPUTS:
        # --overwrite_output_dir: an earlier run's files (say an adapter, after this --method full run) must not
        # survive next to this run's, where from_pretrained would pick them up.
        replace_earlier_outputs(output_dir, tmp)
    else:
        for item in sorted(tmp.iterdir(), key=lambda p: p.name == "README.md"):
            os.replace(item, output_dir / item.name)  # the card last: it describes files already in place
        tmp.rmdir()
    if args.push_to_hub:
        push_to_hub(args, output_dir)
    return metrics


def finish_run(args: argparse.Namespace, accelerator: Any, model: nn.Module, tokenizer: Any, result: TrainResult,
               evaluate: EvalFn, run: RunOutputs, started: float, print_report: bool = False) -> Optional[dict]:
    """A recipe's closing steps: evaluate the model `train` kept on the test split, print the scores (or the whole
    report), save the outputs (and push them with --push_to_hub), and end the trackers. Returns metrics.json's
    content on the main process, None on the others."""
    test_metrics, test_report = evaluate(accelerator.unwrap_model(model), "test")
    if print_report:
        accelerator.print(test_report)
    else:
        accelerator.print("test: " + ", ".join(f"{k} {v:.4f}" for k, v in test_metrics.items()))
    report = f"{run.report_title}\n\n{test_report}" if run.report_title else test_report
    # eval_metrics: of the model kept, the best epoch's with --load_best_model_at_end.
    run = dataclasses.replace(run, eval_metrics=result.eval_metrics, test_metrics=test_metrics, report_text=report)
    metrics = save_outputs(args, accelerator, model, tokenizer, result, run, started)
    accelerator.end_training()
    return metrics


def push_to_hub(args: argparse.Namespace, output_dir: Path) -> None:
    """Upload the run's files (not checkpoints or logs): LRA adapters through `lra_peft.push_to_hub` (which refreshes
    the LRA section of the card), anything else with `HfApi.upload_folder`, as Transformers' no_trainer examples."""
    repo_id = args.hub_model_id or output_dir.absolute().name
    try:
        if args.method == "lra":
            lra_peft.push_to_hub(output_dir, repo_id)
            return
        api = HfApi()  # the token comes from HF_TOKEN or the cached login only
        repo_id = api.create_repo(repo_id, exist_ok=True).repo_id
        api.upload_folder(repo_id=repo_id, folder_path=str(output_dir), commit_message="lra-peft recipe run",
                          ignore_patterns=[f"{CHECKPOINT_PREFIX}*", f"{EPOCH_CHECKPOINT_PREFIX}*", "runs/*", ".*", "*/*"])
    except Exception as exc:  # noqa: BLE001 - the run's files are safe on disk; say why the upload failed
        raise RecipeError(f"--push_to_hub: uploading {output_dir} to {repo_id} failed ({type(exc).__name__}: {exc}); "
                          "the adapter and metrics are saved locally, push them later with `lra-peft push` or "
                          "`hf upload`") from None
