"""Time and accuracy of LRA's `"principal"` initialisation against PEFT's PiSSA (`init_lora_weights="pissa"` and
`"pissa_niter_[n]"`), exact and randomized, on one fp32 weight matrix.

Both sides pay what a user pays: each sample is one `get_peft_model` call on a fresh single-Linear module (the weight
copy made beforehand is not timed). LRA and PEFT alternate (A B A B …, same random seed per round).

Errors (Ŵ_r = the adapter's ΔW at initialisation, W_r = the best rank-r approximation of W from a float64 SVD,
W_res = the frozen residual weight left in the layer):
- rank-r error ‖Ŵ_r − W_r‖_F / ‖W_r‖_F: how far the extracted principal part is from the exact truncation (large
  when singular values near σ_r are close together, even for a good approximation);
- excess ‖W − Ŵ_r‖_F / ‖W − W_r‖_F − 1: how much worse Ŵ_r approximates W than the best rank-r matrix does (the
  usual measure of a randomized SVD; 0 is optimal);
- identity error ‖W_res + Ŵ_r − W‖_F / ‖W‖_F: the model's function at step 0 (should be float32 rounding).

The test matrices are synthetic, W = G/√in + Σ_{i≤128} 10·i^(-0.6) u_i v_iᵀ (Gaussian bulk plus a power-law decaying
set of spikes along random orthonormal directions), so that the top singular values decay as in pretrained weights.
Randomized-SVD errors depend on that spectrum.

    .venv/bin/python benchmarks/init.py            # 1024², 4096², 4096×11008 at r = 16, 64 (long: minutes)
    .venv/bin/python benchmarks/init.py --quick    # 256 × 512 at r = 8 (seconds)
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from _harness import (  # noqa: E402
    LoadRecorder,
    default_output,
    fmt,
    machine_lines,
    markdown_table,
    median,
    paired_ratio,
    write_result,
)
from torch import nn  # noqa: E402

import lra_peft  # noqa: E402

FULL_SIZES = [(1024, 1024), (4096, 4096), (4096, 11008)]


class SingleLinear(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def test_matrix(out_features: int, in_features: int, seed: int = 0, spikes: int = 128) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    bulk = torch.randn(out_features, in_features, generator=generator) / in_features**0.5
    k = min(spikes, out_features, in_features)
    u, _ = torch.linalg.qr(torch.randn(out_features, k, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(in_features, k, generator=generator))
    sigma = 10.0 * torch.arange(1, k + 1, dtype=torch.float32) ** -0.6
    return bulk + (u * sigma) @ v.T


def previous_exact_svd(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """lra_peft's exact SVD before it moved to the tall side: `torch.linalg.svd` of W as stored."""
    return torch.linalg.svd(w, full_matrices=False)


def previous_randomized_svd(w: torch.Tensor, r: int, niter: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """lra_peft's randomized SVD before the block Krylov one: `torch.svd_lowrank` with 10 oversampled columns."""
    u, s, v = torch.svd_lowrank(w, q=min(r + 10, min(w.shape)), niter=niter)
    return u[:, :r].contiguous(), s[:r].contiguous(), v[:, :r].contiguous()


@contextmanager
def previous_decomposition() -> Iterator[None]:
    """Run lra_peft's `"principal"` initialisation with the SVD code it had before this benchmark's changes."""
    from lra_peft import decomposition

    saved = decomposition.exact_svd, decomposition.randomized_top_svd
    decomposition.exact_svd, decomposition.randomized_top_svd = previous_exact_svd, previous_randomized_svd
    try:
        yield
    finally:
        decomposition.exact_svd, decomposition.randomized_top_svd = saved


def peft_config(impl: str, r: int, niter: int | None):
    from peft import LoraConfig

    if impl in ("lra", "previous"):
        return lra_peft.LRAConfig(r=r, target_modules=["lin"], init_weights="principal", svd_niter=niter)
    init = "pissa" if niter is None else f"pissa_niter_{niter}"
    return LoraConfig(r=r, lora_alpha=r, target_modules=["lin"], init_lora_weights=init)


def initialise(impl: str, weight: torch.Tensor, r: int, niter: int | None, seed: int) -> tuple[float, float, nn.Module]:
    """Wall and CPU seconds of one `get_peft_model` call on a fresh module holding `weight`, and the wrapped model."""
    from peft import get_peft_model

    module = SingleLinear(weight)
    config = peft_config(impl, r, niter)
    torch.manual_seed(seed)
    with warnings.catch_warnings(), previous_decomposition() if impl == "previous" else nullcontext():
        warnings.simplefilter("ignore")
        cpu_start, wall_start = time.process_time(), time.perf_counter()
        model = get_peft_model(module, config)
        wall, cpu = time.perf_counter() - wall_start, time.process_time() - cpu_start
    return wall, cpu, model


def errors(model: nn.Module, weight: torch.Tensor, reference: torch.Tensor) -> tuple[float, float, float]:
    """(rank-r error, excess, identity error) of a freshly initialised single-Linear PEFT model."""
    layer = model.base_model.model.lin
    delta = layer.get_delta_weight("default").double()
    residual = layer.get_base_layer().weight.double()
    w = weight.double()
    rank_error = torch.linalg.norm(delta - reference) / torch.linalg.norm(reference)
    excess = torch.linalg.norm(w - delta) / torch.linalg.norm(w - reference) - 1
    identity_error = torch.linalg.norm(residual + delta - w) / torch.linalg.norm(w)
    return rank_error.item(), excess.item(), identity_error.item()


def reference_truncation(weight: torch.Tensor, ranks: list[int]) -> dict[int, torch.Tensor]:
    """The best rank-r approximations of `weight`, from one float64 SVD."""
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    return {r: (u[:, :r] * s[:r]) @ vh[:r] for r in ranks}


def _median_error(errs: dict[str, list[tuple[float, ...]]], index: int) -> str:
    return " / ".join(f"{median([e[index] for e in values]):.1e}" for values in errs.values())


def run(sizes: list[tuple[int, int]], ranks: list[int], niters: list[int | None], rounds_for,
        impls: list[str]) -> list[list[str]]:
    rows = []
    for out_features, in_features in sizes:
        weight = test_matrix(out_features, in_features)
        references = reference_truncation(weight, ranks)
        for r in ranks:
            for niter in niters:
                rounds = rounds_for(out_features * in_features, niter)
                # The previous exact path is PEFT's own (`torch.linalg.svd` of W as stored): not run twice.
                row_impls = [impl for impl in impls if not (impl == "previous" and niter is None)]
                wall: dict[str, list[float]] = {impl: [] for impl in row_impls}
                cpu: dict[str, list[float]] = {impl: [] for impl in row_impls}
                errs: dict[str, list[tuple[float, float, float]]] = {impl: [] for impl in row_impls}
                for round_index in range(rounds):
                    shift = round_index % len(row_impls)
                    for impl in row_impls[shift:] + row_impls[:shift]:
                        seconds, cpu_seconds, model = initialise(impl, weight, r, niter, seed=round_index)
                        wall[impl].append(seconds)
                        cpu[impl].append(cpu_seconds)
                        errs[impl].append(errors(model, weight, references[r]))
                        del model

                rows.append([
                    f"{out_features}×{in_features}",
                    r,
                    "exact" if niter is None else f"niter={niter}",
                    rounds,
                    fmt(median(wall["lra"]), 3),
                    fmt(median(wall["peft"]), 3),
                    fmt(paired_ratio(wall, "lra", "peft"), 2),
                    fmt(paired_ratio(cpu, "lra", "peft"), 2),
                    *([fmt(median(wall["previous"]), 3), fmt(paired_ratio(cpu, "previous", "peft"), 2)]
                      if "previous" in row_impls else ["= PEFT", "1"] if "previous" in impls else []),
                    _median_error(errs, 0),
                    _median_error(errs, 1),
                    " / ".join(f"{max(e[2] for e in values):.0e}" for values in errs.values()),
                ])
                print(" | ".join(str(c) for c in rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one small matrix, r = 8 (smoke test)")
    parser.add_argument("--sizes", default=None, help="comma list of OUTxIN, e.g. 1024x1024,4096x11008")
    parser.add_argument("--ranks", default=None, help="comma list, default 16,64")
    parser.add_argument("--niters", default="exact,2,4,16", help="comma list of 'exact' and power-iteration counts")
    parser.add_argument("--rounds", type=int, default=None, help="rounds for every size (default: fewer for big)")
    parser.add_argument("--with-previous", action="store_true",
                        help="also time lra_peft's SVD code from before this benchmark's changes (oversampled "
                             "svd_lowrank, SVD of W as stored)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.sizes:
        sizes = [tuple(int(n) for n in s.split("x")) for s in args.sizes.split(",")]
    else:
        sizes = [(256, 512)] if args.quick else FULL_SIZES
    ranks = [int(r) for r in (args.ranks or ("8" if args.quick else "16,64")).split(",")]
    niters = [None if n == "exact" else int(n) for n in args.niters.split(",")]

    def rounds_for(numel: int, niter: int | None) -> int:
        if args.rounds:
            return args.rounds
        if args.quick:
            return 2
        if numel >= 4096 * 11008:
            return 1 if niter is None else 3
        if numel >= 4096 * 4096:
            return 2 if niter is None else 4
        return 6

    load = LoadRecorder()
    impls = ["lra", "peft", "previous"] if args.with_previous else ["lra", "peft"]
    rows = run(sizes, ranks, niters, rounds_for, impls)
    load.stop()
    names = " / ".join({"lra": "LRA", "peft": "PEFT", "previous": "prev"}[impl] for impl in impls)
    previous = ["prev LRA s", "prev / PEFT (CPU)"] if args.with_previous else []
    headers = ["W (out×in)", "r", "SVD", "rounds", "LRA s", "PEFT PiSSA s", "LRA / PEFT (wall)", "LRA / PEFT (CPU)",
               *previous, f"rank-r err {names}", f"excess {names}", f"identity err {names}"]
    text = "\n".join([
        "# Principal (PiSSA) initialisation: LRA vs PEFT",
        "",
        *machine_lines(args.threads),
        load.line(),
        f"- Command: `python benchmarks/init.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        "- Time: one `get_peft_model(SingleLinear(W), config)` call (fp32), wall clock, median over rounds; "
        "LRA / PEFT is the median of per-round ratios, of wall-clock and of CPU time (one torch thread: CPU time "
        "leaves out waiting for other processes). LRA: `LRAConfig(r, init_weights=\"principal\", svd_niter=n)`; "
        "PEFT: `LoraConfig(r, lora_alpha=r, init_lora_weights=\"pissa\"` or `\"pissa_niter_n\")`.",
        "- rank-r err: ‖ΔW₀ − W_r‖_F / ‖W_r‖_F against the float64 rank-r truncation W_r; excess: "
        "‖W − ΔW₀‖_F / ‖W − W_r‖_F − 1 (both medians over rounds); identity err: max over rounds of "
        "‖W_res + ΔW₀ − W‖_F / ‖W‖_F.",
        "- W = G/√in + Σ_{i≤128} 10·i^(-0.6) u_i v_iᵀ (Gaussian bulk plus decaying spikes), seed 0.",
        *(["- prev: lra_peft's SVD code before the benchmark-driven changes (randomized: `torch.svd_lowrank` with "
           "q = r + 10; exact: `torch.linalg.svd` of W as stored, which is PEFT's exact path, so not run again), run in "
           "the same rounds; its errors are the third of each triple."] if args.with_previous
          else []),
        "",
        markdown_table(headers, rows),
    ])
    write_result(args.out or default_output("init_quick" if args.quick else "init"), text)
    return text


if __name__ == "__main__":
    main()
