"""Variants of LRA's hot path (`Linear._lowrank`), timed side by side against LoRA on the same model.

`_lowrank` computes s · U · diag(λ) · Vᵀ x. The down-projection x·V can be computed three ways:

- `matmul`: `torch.matmul(x, V)` with V stored row-major (in × r): the first implementation.
- `copy`: `F.linear(x, V.T.contiguous())`: a per-call copy of the tiny V into r × in.
- `transposed`: `F.linear(x, V.T)` with V's storage laid out as r × in (the Parameter is a transposed view, shape
  still in × r), so that no copy is needed.

For each variant: the model is MiniLM (or a tiny model with --quick), LRA r on query/value, a training step
(forward, backward, AdamW) and an inference forward, interleaved with LoRA at the same rank; also the single-layer
forward+backward. Ratios are medians over rounds of the per-round ratio to LoRA.

    .venv/bin/python benchmarks/hotpath.py [--quick] [--rank 8]
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _harness import (  # noqa: E402
    LoadRecorder,
    default_output,
    fmt,
    interleaved,
    machine_lines,
    markdown_table,
    median,
    paired_ratio,
    write_result,
)
from speed import MODELS, build_base, inference_fn, make_batch, train_step_fn, wrap  # noqa: E402
from torch import nn  # noqa: E402

import lra_peft  # noqa: E402


def lowrank_matmul(self, x, U, lam, V, scale):  # noqa: ANN001, ANN201 (same signature as Linear._lowrank)
    return F.linear(torch.matmul(x, V) * (lam * scale), U)


def lowrank_copy(self, x, U, lam, V, scale):  # noqa: ANN001, ANN201
    return F.linear(F.linear(x, V.T.contiguous()) * (lam * scale), U)


def lowrank_linear(self, x, U, lam, V, scale):  # noqa: ANN001, ANN201
    return F.linear(F.linear(x, V.T) * (lam * scale), U)


VARIANTS: dict[str, tuple[Callable, bool]] = {
    # name: (_lowrank implementation, V stored as r × in)
    "matmul": (lowrank_matmul, False),
    "copy": (lowrank_copy, False),
    "transposed": (lowrank_linear, True),
}


class _Patched(nn.Module):
    """Runs a model with `lra_peft.layer.Linear._lowrank` replaced by one variant for the duration of each call."""

    def __init__(self, model: nn.Module, lowrank: Callable) -> None:
        super().__init__()
        self.model = model
        self.lowrank = lowrank

    def __call__(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN204
        saved = lra_peft.layer.Linear._lowrank
        lra_peft.layer.Linear._lowrank = self.lowrank
        try:
            return self.model(*args, **kwargs)
        finally:
            lra_peft.layer.Linear._lowrank = saved


def set_v_layout(model: nn.Module, transposed: bool) -> None:
    """Re-create every LRA V as a Parameter with r × in storage (transposed) or in × r storage (row-major)."""
    for module in model.modules():
        if isinstance(module, lra_peft.layer.Linear):
            for name, V in list(module.lra_V.items()):
                data = V.detach().T.contiguous().T if transposed else V.detach().contiguous()
                module.lra_V[name] = nn.Parameter(data, requires_grad=V.requires_grad)


def variant_models(model: str, r: int) -> tuple[dict[str, nn.Module], nn.Module]:
    template = build_base(model)
    models = {}
    for name, (_, transposed) in VARIANTS.items():
        peft_model = wrap("lra", copy.deepcopy(template), r)
        set_v_layout(peft_model, transposed)
        models[name] = peft_model
    lora = wrap("lora", copy.deepcopy(template), r)
    return models, lora


def model_table(model: str, r: int, rounds: int) -> str:
    spec = MODELS[model]
    models, lora = variant_models(model, r)
    batch = make_batch(spec, lora.config.vocab_size)
    train = {name: train_step_fn(_Patched(m, VARIANTS[name][0]), "lra", batch) for name, m in models.items()}
    train["lora"] = train_step_fn(lora, "lora", batch)
    # train_step_fn builds its optimizer from model.parameters(): _Patched exposes the wrapped model's parameters.
    t_train = interleaved(train, rounds=rounds, warmup=1)
    for m in [*models.values(), lora]:
        m.eval()
    infer = {name: inference_fn(_Patched(m, VARIANTS[name][0]), batch) for name, m in models.items()}
    infer["lora"] = inference_fn(lora, batch)
    t_infer = interleaved(infer, rounds=rounds, warmup=1)
    rows = []
    for name in [*VARIANTS, "lora"]:
        rows.append([name, fmt(median(t_train.wall[name]) * 1e3), fmt(paired_ratio(t_train.wall, name, "lora"), 3),
                     fmt(paired_ratio(t_train.cpu, name, "lora"), 3), fmt(median(t_infer.wall[name]) * 1e3),
                     fmt(paired_ratio(t_infer.wall, name, "lora"), 3), fmt(paired_ratio(t_infer.cpu, name, "lora"), 3)])
    headers = ["variant", "train step ms", "× LoRA", "× LoRA (CPU)", "inference ms", "× LoRA", "× LoRA (CPU)"]
    return (f"### {spec.description}, batch {spec.batch} × {spec.seq}, r = {r}, {rounds} rounds\n\n"
            + markdown_table(headers, rows))


def adapter_term_fns(batch: int, width: int, r: int) -> dict[str, Callable[[], None]]:
    """Forward + backward of the adapter term alone (x requires grad, as inside a model), one closure per variant."""
    torch.manual_seed(0)
    x = torch.randn(batch, width, requires_grad=True)
    grad = torch.randn(batch, width)
    U = nn.Parameter(torch.randn(width, r))
    lam = nn.Parameter(torch.randn(r))
    V_row = torch.randn(width, r)
    A = nn.Parameter(torch.randn(r, width))
    B = nn.Parameter(torch.randn(width, r))
    fns: dict[str, Callable[[], None]] = {}
    for name, (fn, transposed) in VARIANTS.items():
        V = nn.Parameter(V_row.T.contiguous().T if transposed else V_row.clone())
        fns[name] = lambda fn=fn, V=V: fn(None, x, U, lam, V, 1.0).backward(grad)
    fns["lora"] = lambda: (F.linear(F.linear(x, A), B) * 1.0).backward(grad)
    return fns


def layer_rows(batch: int, width: int, ranks: list[int], rounds: int) -> str:
    rows = []
    for r in ranks:
        fns = adapter_term_fns(batch, width, r)
        times = interleaved(fns, rounds=rounds, warmup=2)
        rows.append([r] + [f"{median(times.wall[n]) * 1e6:.0f} (×{paired_ratio(times.wall, n, 'lora'):.2f}, "
                           f"CPU ×{paired_ratio(times.cpu, n, 'lora'):.2f})" for n in fns])
    headers = ["r", *[f"{n}: µs (× LoRA wall, CPU)" for n in VARIANTS], "lora µs"]
    return (f"### Adapter term alone, forward + backward, {batch} tokens × {width} features, {rounds} rounds\n\n"
            + markdown_table(headers, rows))


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rounds = args.rounds or (2 if args.quick else 15)
    load = LoadRecorder()
    sections = [model_table("tiny" if args.quick else "minilm", args.rank, rounds)]
    if args.quick:
        sections.append(layer_rows(32, 64, [4, 8], rounds))
    else:
        sections += [layer_rows(512, 384, [4, 8, 16, 32, 64], rounds),
                     layer_rows(128, 1024, [4, 8, 16, 32, 64], rounds)]
    load.stop()
    text = "\n".join(["# LRA hot-path variants (`Linear._lowrank`)", "", *machine_lines(args.threads), load.line(),
                      f"- Command: `python benchmarks/hotpath.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
                      "", *[s + "\n" for s in sections]])
    write_result(args.out or default_output("hotpath_quick" if args.quick else "hotpath"), text)
    return text


if __name__ == "__main__":
    main()
