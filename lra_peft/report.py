"""`rank_report`: the rank each adapted layer really uses (its non-zero λ), and the λ magnitudes behind it."""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from ._io import atomic_write_bytes
from .layer import LRALayer
from .model import LRAModel
from .snapshot import ModelOrDir, load_snapshot

_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)\.")


@dataclass
class LayerRank:
    """One adapted module: `r` allocated columns, of which `rank` have |λ| > tol."""

    name: str
    r: int
    rank: int
    lambda_abs: list[float]  # |λ| sorted in decreasing order (length r)
    out_features: int
    in_features: int
    scaling: float

    @property
    def layer_index(self) -> Optional[int]:
        """The block number in the module path (`...layer.3.attention...` -> 3), or None (e.g. embeddings)."""
        match = _LAYER_INDEX.search(self.name)
        return int(match.group(1)) if match else None

    @property
    def module(self) -> str:
        """The module path inside its block (`encoder.layer.3.attention.self.query` -> `attention.self.query`)."""
        match = _LAYER_INDEX.search(self.name)
        return self.name[match.end():] if match else self.name


@dataclass
class RankReport:
    """Per-layer ranks of one LRA adapter; `layers` is keyed by module path relative to the base model."""

    adapter_name: str
    layers: dict[str, LayerRank] = field(default_factory=dict)
    tol: float = 0.0

    @property
    def ranks(self) -> dict[str, int]:
        return {name: layer.rank for name, layer in self.layers.items()}

    @property
    def lambdas(self) -> dict[str, list[float]]:
        return {name: layer.lambda_abs for name, layer in self.layers.items()}

    @property
    def total_rank(self) -> int:
        return sum(layer.rank for layer in self.layers.values())

    @property
    def total_r(self) -> int:
        return sum(layer.r for layer in self.layers.values())

    @property
    def mean_rank(self) -> float:
        return self.total_rank / max(len(self.layers), 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapter_name": self.adapter_name,
            "tol": self.tol,
            "total_rank": self.total_rank,
            "total_r": self.total_r,
            "layers": {
                name: {
                    "r": layer.r,
                    "rank": layer.rank,
                    "lambda_abs": layer.lambda_abs,
                    "shape": [layer.out_features, layer.in_features],
                    "scaling": layer.scaling,
                }
                for name, layer in self.layers.items()
            },
        }

    def __str__(self) -> str:
        width = max((len(name) for name in self.layers), default=6)
        lines = [f"{'module':<{width}}  {'shape':>11}  {'r':>4}  {'rank':>4}  {'|λ| max':>9}  {'|λ| min≠0':>9}"]
        for name, layer in self.layers.items():
            nonzero = [v for v in layer.lambda_abs if v > self.tol]
            top = f"{layer.lambda_abs[0]:.3g}" if layer.lambda_abs else "-"
            low = f"{nonzero[-1]:.3g}" if nonzero else "-"
            shape = f"{layer.out_features}x{layer.in_features}"
            lines.append(f"{name:<{width}}  {shape:>11}  {layer.r:>4}  {layer.rank:>4}  {top:>9}  {low:>9}")
        lines.append(f"total rank {self.total_rank} of {self.total_r} allocated, mean {self.mean_rank:.2f} per layer")
        return "\n".join(lines)


def rank_report(model_or_adapter_dir: ModelOrDir, adapter_name: str = "default", tol: float = 0.0) -> RankReport:
    """Per-layer ranks (entries of λ with |λ| > `tol`) and sorted |λ| of an LRA adapter.

    Args:
        model_or_adapter_dir: A model holding LRA layers (a `PeftModel`, an `LRAModel` or a model with injected
            layers), or the folder of a saved adapter (read directly; the base model is not needed).
        adapter_name: Which adapter of a model to report.
        tol: |λ| at or below this counts as pruned. Adaptive rank sets pruned λ to exactly 0, hence the default 0.

    Example:
        >>> report = lra_peft.rank_report("out/adapter")
        >>> report.ranks["encoder.layer.0.attention.self.query"]
        5
    """
    if not tol >= 0:  # also NaN, which every comparison would turn into "all pruned"
        raise ValueError(f"tol={tol} is invalid: use a threshold >= 0")
    if isinstance(model_or_adapter_dir, (str, os.PathLike)):
        snapshot = load_snapshot(model_or_adapter_dir)
        entries = [
            (name, layer.lam, layer.out_features, layer.in_features, layer.scaling)
            for name, layer in snapshot.layers.items()
        ]
        return _build(snapshot.adapter_name, entries, tol)
    if isinstance(model_or_adapter_dir, nn.Module):
        return _build(adapter_name, _live_entries(model_or_adapter_dir, adapter_name), tol)
    raise TypeError(
        f"expected a model with LRA layers or the path of a saved adapter folder, got "
        f"{type(model_or_adapter_dir).__name__}"
    )


def _live_entries(model: nn.Module, adapter_name: str) -> list[tuple]:
    root = model
    if hasattr(model, "get_base_model"):
        root = model.get_base_model()
    elif isinstance(model, LRAModel):
        root = model.model
    entries = []
    known: set[str] = set()
    for name, module in root.named_modules():
        if not isinstance(module, LRALayer):
            continue
        known |= set(module.lra_lambda.keys())
        if adapter_name in module.lra_lambda:
            lam = module.lra_lambda[adapter_name]
            entries.append((name, lam, module.out_features, module.in_features, float(module.scaling[adapter_name])))
    if not entries:
        if known:
            raise ValueError(f"the model has no LRA adapter {adapter_name!r}; its LRA adapters are {sorted(known)}")
        raise ValueError("the model has no LRA layers (create it with get_peft_model(model, LRAConfig(...)))")
    return entries


def _build(adapter_name: str, entries: list[tuple], tol: float) -> RankReport:
    report = RankReport(adapter_name=adapter_name, tol=tol)
    for name, lam, out_features, in_features, scaling in entries:
        magnitudes = torch.sort(lam.detach().float().abs().cpu(), descending=True).values
        report.layers[name] = LayerRank(
            name=name,
            r=magnitudes.numel(),
            rank=int((magnitudes > tol).sum()),
            lambda_abs=magnitudes.tolist(),
            out_features=out_features,
            in_features=in_features,
            scaling=scaling,
        )
    return report


PLOT_INSTALL = "pip install matplotlib  (in a clone of lra-peft: pip install -e \".[plot]\")"


def require_matplotlib() -> None:
    """Raise an ImportError naming the install command when matplotlib (only needed for plots) is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError(f"plotting rank reports needs matplotlib, which is not installed: {PLOT_INSTALL}") from None


def plot_rank_report(report: RankReport, path: Union[str, os.PathLike]) -> Path:
    """Save a PNG: a heatmap of rank per block × module, and the sorted |λ| of every layer.

    Uses matplotlib's Agg canvas directly, so it changes no global backend and needs no display. matplotlib is an
    optional dependency (the `plot` extra): without it this raises an ImportError that says how to install it.
    """
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers = list(report.layers.values())
    modules = list(dict.fromkeys(layer.module for layer in layers))
    indices = sorted({layer.layer_index for layer in layers}, key=lambda i: (i is None, i if i is not None else 0))
    grid = torch.full((len(indices), len(modules)), float("nan"))
    for layer in layers:
        grid[indices.index(layer.layer_index), modules.index(layer.module)] = layer.rank

    fig = Figure(figsize=(max(8.0, 4 + 0.9 * len(modules)), max(4.0, 1.5 + 0.3 * len(indices))))
    FigureCanvasAgg(fig)
    heat, curves = fig.subplots(1, 2, gridspec_kw={"width_ratios": [max(len(modules), 2), 3]})
    vmax = max(max(lr.r for lr in layers), 1)
    image = heat.imshow(grid.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
    heat.set_xticks(range(len(modules)), modules, rotation=45, ha="right", fontsize=8)
    heat.set_yticks(range(len(indices)), ["-" if i is None else str(i) for i in indices], fontsize=8)
    heat.set_xlabel("module")
    heat.set_ylabel("layer")
    heat.set_title(f"rank per layer (adapter {report.adapter_name!r})")
    if grid.numel() <= 400:
        for (row, col), value in _ndenumerate(grid):
            if value == value:  # skip NaN (module absent in that block)
                color = "black" if value > vmax / 2 else "white"  # readable on viridis' bright and dark ends
                heat.text(col, row, str(int(value)), ha="center", va="center", color=color, fontsize=7)
    fig.colorbar(image, ax=heat, label="non-zero λ")

    positive = [v for layer in layers for v in layer.lambda_abs if v > 0]
    for layer in layers:
        values = [v for v in layer.lambda_abs if v > 0]
        if values:
            curves.plot(range(1, len(values) + 1), values, marker=".", linewidth=0.8, alpha=0.7)
    if positive:
        curves.set_yscale("log")
    curves.set_xlabel("index (sorted)")
    curves.set_ylabel("|λ|")
    curves.set_title(f"sorted |λ| of {len(layers)} layers")
    fig.tight_layout()

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def _ndenumerate(grid: torch.Tensor):
    for row in range(grid.shape[0]):
        for col in range(grid.shape[1]):
            yield (row, col), float(grid[row, col])
