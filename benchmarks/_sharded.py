"""The sharded part of device_check.py: recipes/instruct.py under Accelerate's FSDP and DeepSpeed ZeRO-3 configs
(recipes/configs/fsdp.yaml, zero3.yaml), each against one plain process with the same global batch.

No causal LM can be fetched on the device machine, so it trains a small Llama built here (character tokenizer,
random weights) on a generated copy task ("copy bdc" → "bdc"). For each config it records whether the run
finished, its validation loss and exact match, and the largest difference between its saved adapter (written by the
main process from the gathered weights) and the single-process one: the same adapter within 1e-5 is a pass. Accelerate
shards only on GPUs (on CPUs the recipes refuse these configs), and ZeRO-3 needs `pip install deepspeed`: a config
that cannot run here is reported as "not run", with the reason, and is not a failure.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import random
import string
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
RECIPE = REPO_ROOT / "recipes" / "instruct.py"
CONFIGS = {"fsdp": REPO_ROOT / "recipes" / "configs" / "fsdp.yaml",
           "zero3": REPO_ROOT / "recipes" / "configs" / "zero3.yaml"}
TOLERANCE = 1e-5


def build_fixture(folder: Path, hidden_size: int = 256, layers: int = 4) -> tuple[Path, Path]:
    """(model folder, data folder): a random Llama with a character tokenizer, and train/validation JSONL files."""
    import torch
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    chars = sorted(set(string.printable) - set("\x0b\x0c\r\t"))
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *chars])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, initializer_range=0.2))
    model_dir, data_dir = folder / "model", folder / "data"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    words = ["".join(p) for p in itertools.product("abcdef", repeat=3)]
    random.Random(0).shuffle(words)
    for name, chunk in (("train.jsonl", words[:160]), ("validation.jsonl", words[160:192])):
        (data_dir / name).write_text("".join(json.dumps({"prompt": f"copy {w}", "response": w}) + "\n"
                                             for w in chunk))
    return model_dir, data_dir


def launch_commands(model_dir: Path, data_dir: Path, out_root: Path, num_processes: int, steps: int,
                    batch_size: int = 8, port: int = 29571) -> dict[str, list[str]]:
    """{name: command}: "single" (one process, gradient accumulation over `num_processes` micro-batches) and one
    `accelerate launch --config_file` per sharded config, all in float32 with the same global batch."""
    accelerate = str(Path(sys.executable).parent / "accelerate")
    recipe_args = ["--model_name_or_path", str(model_dir), "--train_file", str(data_dir / "train.jsonl"),
                   "--validation_file", str(data_dir / "validation.jsonl"), "--max_train_steps", str(steps),
                   "--per_device_train_batch_size", str(batch_size), "--learning_rate", "1e-3",
                   "--num_generation_samples", "4", "--max_new_tokens", "4", "--logging_steps", "5"]
    commands = {"single": [accelerate, "launch", "--num_processes", "1", "--mixed_precision", "no", str(RECIPE),
                           *recipe_args, "--gradient_accumulation_steps", str(num_processes),
                           "--output_dir", str(out_root / "single")]}
    for i, (name, config) in enumerate(CONFIGS.items()):
        commands[name] = [accelerate, "launch", "--config_file", str(config), "--num_processes", str(num_processes),
                          "--mixed_precision", "no", "--main_process_port", str(port + i), str(RECIPE), *recipe_args,
                          "--output_dir", str(out_root / name)]
    return commands


def why_not_runnable(name: str, device_type: str) -> str:
    """Why config `name` cannot run on this machine ('' when it can)."""
    if device_type != "cuda":
        return "Accelerate shards only on GPUs"
    if name == "zero3" and importlib.util.find_spec("deepspeed") is None:
        return "DeepSpeed is not installed (pip install deepspeed)"
    return ""


def max_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    if x.keys() != y.keys():
        return float("inf")
    return max((x[k].float() - y[k].float()).abs().max().item() for k in x)


def run(folder: Path, device_type: str, num_processes: int, steps: int, timeout: int = 900) -> list[list[Any]]:
    """Rows [config, processes, result details, max |Δ adapter| vs single, verdict] of the sharded runs."""
    model_dir, data_dir = build_fixture(folder)
    commands = launch_commands(model_dir, data_dir, folder / "runs", num_processes, steps)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    results: dict[str, tuple[int, str]] = {}
    rows: list[list[Any]] = []
    for name, command in commands.items():
        reason = why_not_runnable(name, device_type) if name != "single" else ""
        if reason:
            rows.append([name, num_processes, f"not run: {reason}", "", "not run"])
            continue
        proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "error" in line.lower()]
        results[name] = (proc.returncode, errors[-1][:200] if errors else "")
        out = folder / "runs" / name
        if proc.returncode != 0 or not (out / "metrics.json").is_file():
            rows.append([name, 1 if name == "single" else num_processes,
                         f"exit {proc.returncode}: {results[name][1]}", "", "FAIL"])
            continue
        metrics = json.loads((out / "metrics.json").read_text())
        detail = (f"{metrics['train_steps']} steps, eval loss {metrics['eval_loss']:.4f}, exact match "
                  f"{metrics.get('eval_exact_match', float('nan')):.3f}")
        if name == "single":
            rows.append([name, 1, detail, "reference", "PASS"])
            continue
        single = folder / "runs" / "single"
        if not (single / "adapter_model.safetensors").is_file():
            rows.append([name, metrics["num_processes"], detail, "no reference", "FAIL"])
            continue
        diff = max_difference(single, out)
        rows.append([name, metrics["num_processes"], detail, f"{diff:.2e}", "PASS" if diff <= TOLERANCE else "FAIL"])
    return rows
