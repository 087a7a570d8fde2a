"""The run's Hub model card: metadata with a model-index, what was trained on what, the metrics, how to load it."""

from __future__ import annotations

import argparse
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from huggingface_hub import ModelCard, ModelCardData
from torch import nn

from lra_peft.hub import INSTALL_LINE, card_section, eval_results, framework_versions
from lra_peft.snapshot import snapshot_from_model

from . import distill


@dataclass
class RunOutputs:
    """What a recipe hands to `save_outputs` (or `finish_run`, which fills the metrics and report) at the end of a run."""

    task: str
    dataset: str
    pipeline: str  # e.g. "token-classification"
    auto_class: str  # e.g. "AutoPeftModelForTokenClassification"
    base_auto_class: str  # e.g. "AutoModelForTokenClassification"
    report_name: str
    eval_metrics: dict = field(default_factory=dict)
    test_metrics: dict = field(default_factory=dict)
    report_text: str = ""
    # `finish_run`: the line above the test split's report in `report_name` (none: the report alone).
    report_title: str = ""
    labels: Optional[list[str]] = None
    extra_metrics: dict = field(default_factory=dict)
    # Replaces the default "how to load" code of the model card when set; "{load}" in it stands for the lines that
    # import and load `model` and `tokenizer`, "{ref}" for where the run's folder is.
    usage: str = ""


# Hub ids of the datasets the recipes read by default from ../shared/data (copies of these; see its README.md).
HUB_DATASETS = {"conll2003": "eriktks/conll2003", "sst2": "stanfordnlp/sst2", "banking77": "PolyAI/banking77"}


def lra_card_section(peft_model: nn.Module, run: RunOutputs) -> str:
    """lra_peft's card section (base, ranks, targets) for the recipe's card, without the sections the card has."""
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
        *([_public_command_line(distill.card_line(args))] if distill.enabled(args) else []),
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
