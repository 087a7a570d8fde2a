"""Knowledge distillation for the recipes: a frozen teacher's logits as soft targets next to the task loss.

    loss = (1 − α) · task loss + α · T² · KL(softmax(teacher / T) ‖ softmax(student / T))

(Hinton et al., 2015). The KL is taken over the task's own logits: per counted token for NER (labels != -100), per
example for sentence classification, per training example's candidate list for the recommender (the softmax over its
positive and negatives that its task loss uses). T² keeps the soft term's gradient on the scale of the task loss's
when T changes. The teacher is any model that produces the same logits: the `--output_dir` of the same recipe run
with `--method full` (a Transformers model folder) or with an adapter method (an adapter folder, reloaded onto its
base as `benchmarks/paired.py` does), or another model with the same label set and tokenizer. It runs in eval mode
under `torch.no_grad` on the student's device, under the run's mixed precision (what Accelerate's
`prepare_model(teacher, evaluation_mode=True)` does, without registering it, so that checkpoints hold the student
only), and is never trained or saved.

With `--distill_alpha 0` (the default) nothing here runs: the teacher is not even loaded, so the run is the plain one,
byte for byte.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn
from transformers import AutoTokenizer

import lra_peft  # noqa: F401  (registers LRA with PEFT, so that an LRA adapter can be a teacher)

from .errors import RecipeError
from .methods import resolve_model

# (model, batch) -> (task loss, logits (..., classes)); for Transformers models `model(**batch)`'s loss and logits.
Outputs = Callable[[nn.Module, dict], tuple[torch.Tensor, torch.Tensor]]


def add_args(parser: argparse.ArgumentParser) -> None:
    """The distillation flags, one group shared by every recipe."""
    group = parser.add_argument_group("distillation")
    group.add_argument("--teacher_model_name_or_path", default=None,
                       help="Folder of a teacher: a run of the same recipe (e.g. --method full, or an adapter run) or "
                            "any model with the same labels and tokenizer. Used only with --distill_alpha > 0.")
    group.add_argument("--distill_alpha", type=float, default=0.0,
                       help="Weight α of the distillation term in [0, 1]: loss = (1 − α)·task + α·T²·KL(teacher ‖ "
                            "student). 0 = off (the teacher is not loaded).")
    group.add_argument("--distill_temperature", type=float, default=2.0,
                       help="Temperature T (> 0) that softens both distributions in the distillation term.")


def check_args(args: argparse.Namespace) -> None:
    """Reject distillation settings that cannot work, before any heavy work."""
    if not (math.isfinite(args.distill_alpha) and 0.0 <= args.distill_alpha <= 1.0):
        raise RecipeError(f"--distill_alpha={args.distill_alpha} must be in [0, 1] (0 = no distillation)")
    if not (math.isfinite(args.distill_temperature) and args.distill_temperature > 0):
        raise RecipeError(f"--distill_temperature={args.distill_temperature} must be a positive number")
    if args.distill_alpha > 0 and not args.teacher_model_name_or_path:
        raise RecipeError(f"--distill_alpha={args.distill_alpha:g} needs a teacher: pass --teacher_model_name_or_path "
                          "<folder> (e.g. the --output_dir of this recipe run with --method full)")


def enabled(args: argparse.Namespace) -> bool:
    return args.distill_alpha > 0 and bool(args.teacher_model_name_or_path)


def settings(args: argparse.Namespace) -> Optional[dict]:
    """What metrics.json records under "distillation": None for a plain run."""
    if not enabled(args):
        return None
    return {"teacher": args.teacher_model_name_or_path, "alpha": args.distill_alpha,
            "temperature": args.distill_temperature}


def card_line(args: argparse.Namespace) -> str:
    """The model card's line on distillation ("" for a plain run)."""
    if not enabled(args):
        return ""
    return (f"- Distilled from `{args.teacher_model_name_or_path}`: loss = (1 − α)·task + α·T²·KL(teacher ‖ student), "
            f"α = {args.distill_alpha:g}, T = {args.distill_temperature:g}\n")


# ------------------------------------------------------------------------------------------------------------ loss
def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
               mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """T² · KL(softmax(teacher / T) ‖ softmax(student / T)), averaged over rows.

    Logits are (..., C): one row per token, example or candidate list. `mask` (...) bool keeps only the rows the task
    loss counts (NER: labels != -100); with no row kept the term is 0. A single logit (C = 1) is a Bernoulli
    probability sigmoid(z / T): the KL of two Bernoullis, which is the softmax KL over the logits (0, z).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    student, teacher = student_logits.float(), teacher_logits.float()
    if student.shape[-1] == 1:
        student = torch.cat([torch.zeros_like(student), student], dim=-1)
        teacher = torch.cat([torch.zeros_like(teacher), teacher], dim=-1)
    log_p_student = F.log_softmax(student / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher / temperature, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)  # (...)
    if mask is None:
        return temperature**2 * kl.mean()
    mask = mask.to(kl.device, torch.bool)
    # Multiplying (not indexing) keeps a graph even when nothing is counted, so backward still works.
    return temperature**2 * (kl * mask).sum() / mask.sum().clamp(min=1)


def hf_outputs(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """A Transformers (or PEFT) model's task loss and logits."""
    out = model(**batch)
    return out.loss, out.logits


def token_mask(batch: dict) -> torch.Tensor:
    """NER: the positions the task loss counts (first sub-word of each word)."""
    return batch["labels"] != -100


@dataclass
class Teacher:
    """A loaded, frozen teacher on the student's device; `permutation` maps the student's label order onto the
    teacher's, `autocast` is the run's mixed-precision context (`accelerator.autocast`)."""

    model: nn.Module
    path: str
    permutation: Optional[list[int]] = None
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext

    @torch.no_grad()
    def logits(self, batch: dict, outputs: Outputs) -> torch.Tensor:
        with self.autocast():
            _, logits = outputs(self.model, batch)
        return logits if self.permutation is None else logits[..., self.permutation]


def make_loss(teacher: Teacher, args: argparse.Namespace, outputs: Outputs = hf_outputs,
              mask: Optional[Callable[[dict], torch.Tensor]] = None) -> Callable[[nn.Module, dict], torch.Tensor]:
    """The recipe's `compute_loss` with distillation: (1 − α)·task loss + α·`distill_kl` on `outputs`' logits."""
    alpha, temperature = args.distill_alpha, args.distill_temperature

    def compute_loss(model: nn.Module, batch: dict) -> torch.Tensor:
        task_loss, student_logits = outputs(model, batch)
        soft = distill_kl(student_logits, teacher.logits(batch, outputs), temperature,
                          None if mask is None else mask(batch))
        return (1 - alpha) * task_loss + alpha * soft

    return compute_loss


# --------------------------------------------------------------------------------------------------------- teacher
def _labels_of(config: Any) -> list[str]:
    id2label = getattr(config, "id2label", None) or {}
    return [str(id2label[i]) for i in sorted(id2label, key=int)]


def _check_tokenizer(folder: Path, tokenizer: Any) -> None:
    """A teacher reads the student's token ids, so a tokenizer saved with it must have the same vocabulary."""
    if tokenizer is None or not any((folder / f).is_file() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
        return
    try:
        theirs = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError):
        return  # no loadable tokenizer there: nothing to compare
    if theirs.get_vocab() != tokenizer.get_vocab():
        raise RecipeError(f"--teacher_model_name_or_path {folder}: its tokenizer's vocabulary differs from the "
                          f"student's ({len(theirs)} vs {len(tokenizer)} tokens), so it would read the wrong tokens; "
                          "use a teacher fine-tuned from the same base model (or --model_name_or_path of the teacher)")


def _read_model(model_cls: Any, folder: Path, labels: Optional[Sequence[str]],
                prepare: Callable[[nn.Module], None]) -> tuple[nn.Module, list[str]]:
    """(teacher model, its label names) from a full model folder or an adapter folder (onto its recorded base)."""
    metrics_file = folder / "metrics.json"
    run_args: dict[str, Any] = {}
    if metrics_file.is_file():
        run_args = json.loads(metrics_file.read_text()).get("args", {})
        if run_args.get("load_in_8bit") or run_args.get("load_in_4bit"):
            raise RecipeError(f"--teacher_model_name_or_path {folder}: a run on an 8/4-bit base cannot be reloaded "
                              "as a teacher here; use a full-precision run (e.g. --method full)")
    saved_labels = json.loads((folder / "labels.json").read_text()) if (folder / "labels.json").is_file() else None
    kwargs: dict[str, Any] = {}
    if labels is not None and saved_labels is not None:
        kwargs = {"num_labels": len(saved_labels), "id2label": dict(enumerate(saved_labels)),
                  "label2id": {label: i for i, label in enumerate(saved_labels)}}
    if (folder / "adapter_config.json").is_file():
        # adapter_config.json names the base by Hub id (or not at all) for publishing; the run's metrics.json records
        # the folder it was actually loaded from, which is what reloads it here without the Hub.
        base = run_args.get("model_name_or_path")
        if not (isinstance(base, str) and Path(base).is_dir()):
            base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
        try:
            base = resolve_model(base)
        except RecipeError as exc:
            raise RecipeError(f"--teacher_model_name_or_path {folder}: the adapter's base model: {exc}") from None
        model = model_cls.from_pretrained(base, **kwargs)
        prepare(model)
        model = PeftModel.from_pretrained(model, str(folder))
    elif (folder / "config.json").is_file():
        model = model_cls.from_pretrained(str(folder), **kwargs)
        prepare(model)
    else:
        raise RecipeError(f"--teacher_model_name_or_path {folder}: neither a model folder (config.json) nor an "
                          "adapter folder (adapter_config.json); pass the --output_dir of a finished recipe run")
    return model, (list(saved_labels) if saved_labels is not None else _labels_of(model.config))


def load_teacher(args: argparse.Namespace, accelerator: Any, model_cls: Any, labels: Optional[Sequence[str]],
                 tokenizer: Any = None, prepare: Callable[[nn.Module], None] = lambda model: None,
                 wrap: Callable[[nn.Module], nn.Module] = lambda model: model) -> Optional[Teacher]:
    """The frozen teacher of `--teacher_model_name_or_path` on the student's device, or None when distillation is off.

    `labels` are the student's label names (None for a task without labels, the recommender); the teacher must have
    the same set (in any order: its logits are reordered to the student's). `prepare` edits the loaded base model
    (before an adapter goes on), `wrap` turns it into what produces the task's logits (the recommender's bi-encoder).
    """
    if not enabled(args):
        if args.teacher_model_name_or_path:
            accelerator.print(f"--teacher_model_name_or_path {args.teacher_model_name_or_path} is not used: "
                              "--distill_alpha is 0 (pass a value in (0, 1] to distil)")
        return None
    folder = Path(args.teacher_model_name_or_path).expanduser()
    if not folder.is_dir():
        raise RecipeError(f"--teacher_model_name_or_path {folder} is not a folder; pass the --output_dir of a "
                          "finished recipe run (e.g. with --method full)")
    _check_tokenizer(folder, tokenizer)
    model, teacher_labels = _read_model(model_cls, folder, labels, prepare)
    permutation = None
    if labels is not None:
        if sorted(teacher_labels) != sorted(labels):
            missing, extra = sorted(set(labels) - set(teacher_labels)), sorted(set(teacher_labels) - set(labels))
            raise RecipeError(
                f"--teacher_model_name_or_path {folder}: the teacher's labels ({len(teacher_labels)}) differ from the "
                f"student's ({len(labels)}): missing {missing[:8]}, extra {extra[:8]}; use a teacher trained on the "
                "same label set (e.g. this recipe run on the same data with --method full)")
        if list(teacher_labels) != list(labels):
            permutation = [teacher_labels.index(label) for label in labels]
    model = wrap(model)
    model.requires_grad_(False)
    model.eval()
    # What `accelerator.prepare_model(model, evaluation_mode=True)` does (device, mixed precision, no DDP), without
    # registering the teacher with the accelerator: registered, `save_state` would write it into every checkpoint.
    model.to(accelerator.device)
    accelerator.print(f"distilling from {folder} (α = {args.distill_alpha:g}, T = {args.distill_temperature:g})")
    return Teacher(model=model, path=str(folder), permutation=permutation, autocast=accelerator.autocast)
