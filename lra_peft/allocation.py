"""Adaptive rank allocation over λ: AdaLoRA's importance score and cubic budget schedule, for ΔW = s · U · diag(λ) · Vᵀ.

Each (λᵢ, Uᵢ, Vᵢ) triplet of an adapted layer gets the score

    score_i = S(λᵢ) + mean_j S(U_ji) + mean_j S(V_ji),    S(θ) = Ī(θ) · Ū(θ)

where Ī is the exponential moving average (factor `beta1`) of the sensitivity I = |θ · ∇θ| and Ū the moving average
(factor `beta2`) of its uncertainty |I − Ī| (Zhang et al., 2023, "AdaLoRA"). The budget (total rank over all adapted
layers) falls from Σ r_layer to `target_r` · (number of layers) along a cubic between `init_warmup` and
`total_step − final_warmup`; every `mask_interval` steps the globally least important triplets are pruned by zeroing
their λ. Pruning is permanent (the budget only shrinks) and every layer keeps at least its best triplet, because an LRA
layer cannot have rank 0.
"""

from __future__ import annotations

import math
import warnings
import weakref
from typing import Any, Optional

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .config import LRAConfig
from .format import FACTORS, KEY_PREFIX, exact_pattern_key, split_factor_key
from .layer import LRALayer

# Allocators that have pruned something. After every optimizer step (PyTorch's global step hook) their pruned λ are
# zeroed again, so that the optimizer (Adam's momentum) cannot move them even between two update_and_allocate calls.
_PRUNED_ALLOCATORS: weakref.WeakSet[RankAllocator] = weakref.WeakSet()
_step_hook: Optional[torch.utils.hooks.RemovableHandle] = None


def _remask_after_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    for allocator in list(_PRUNED_ALLOCATORS):
        allocator.reapply_masks()


def _track_pruned(allocator: RankAllocator) -> None:
    global _step_hook
    _PRUNED_ALLOCATORS.add(allocator)
    if _step_hook is None:
        _step_hook = register_optimizer_step_post_hook(_remask_after_optimizer_step)


def budget_schedule(
    step: int, *, init_budget: int, target_budget: int, init_warmup: int, final_warmup: int, total_step: int
) -> int:
    """The total rank allowed after optimizer step `step` (AdaLoRA's cubic schedule).

    `init_budget` until `init_warmup`, `target_budget` from `total_step − final_warmup` on, and in between
    `target + (init − target) · (1 − progress)³` rounded down, where progress goes linearly from 0 to 1.
    """
    final_step = total_step - final_warmup
    if step <= init_warmup:
        return init_budget
    if step >= final_step:
        return target_budget
    remaining = 1.0 - (step - init_warmup) / (final_step - init_warmup)
    return int((init_budget - target_budget) * remaining**3 + target_budget)


def alpha_keeping_scale(scale: float, rank: int) -> float:
    """An `lra_alpha` with `lra_alpha / rank == scale` exactly in floating point.

    A layer cut from r to `rank` must keep its scale s = lra_alpha / r, or its output would change on load.
    """
    alpha = scale * rank
    for _ in range(8):
        if alpha / rank == scale:
            return alpha
        alpha = math.nextafter(alpha, math.inf if alpha / rank < scale else -math.inf)
    return scale * rank  # off by one ulp at worst; never reached for ordinary values


class _LayerGroup:
    """Adapted layers whose U, V have the same shapes, dtype and device, so that their statistics stack.

    Statistics are held as `[G, ...]` tensors (cheap to score on a mask step) and updated every step through views of
    their rows (one `torch._foreach_*` call over all layers).
    """

    def __init__(self, names: list[str], layers: list[LRALayer], adapter: str) -> None:
        self.names = names
        self.lam = [layer.lra_lambda[adapter] for layer in layers]
        self.U = [layer.lra_U[adapter] for layer in layers]
        self.V = [layer.lra_V[adapter] for layer in layers]
        self.rank = self.lam[0].shape[0]
        ref = self.lam[0]
        self.alive = torch.ones(len(layers), self.rank, dtype=torch.bool, device=ref.device)
        self.mask = torch.ones(len(layers), self.rank, dtype=ref.dtype, device=ref.device)  # alive as λ's dtype
        self.stats: dict[str, torch.Tensor] = {}
        for kind, params in (("lam", self.lam), ("U", self.U), ("V", self.V)):
            for stat in ("ipt", "unc"):
                self.stats[f"{kind}_{stat}"] = torch.zeros(len(params), *params[0].shape, dtype=params[0].dtype,
                                                           device=params[0].device)

    def params_and_stat_rows(self) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        params, ipt, unc = [], [], []
        for kind, group_params in (("lam", self.lam), ("U", self.U), ("V", self.V)):
            params += group_params
            ipt += list(self.stats[f"{kind}_ipt"].unbind(0))
            unc += list(self.stats[f"{kind}_unc"].unbind(0))
        return params, ipt, unc

    def triplet_scores(self) -> torch.Tensor:
        """`[G, r]` float32 scores; pruned triplets -inf, each layer's best alive triplet +inf (the rank-1 floor)."""
        s = self.stats
        score = (
            s["lam_ipt"] * s["lam_unc"]
            + (s["U_ipt"] * s["U_unc"]).mean(dim=1)
            + (s["V_ipt"] * s["V_unc"]).mean(dim=1)
        ).float()
        # A step with overflowed (fp16) gradients must not decide the allocation.
        score = torch.nan_to_num(score, nan=0.0, posinf=torch.finfo(torch.float32).max, neginf=0.0)
        score = score.masked_fill(~self.alive, -math.inf)
        return score.scatter(1, score.argmax(dim=1, keepdim=True), math.inf)


class RankAllocator:
    """Importance statistics, budget and λ masks of one adapter of an [`LRAModel`] (see the module docstring).

    Created by `LRAModel.update_and_allocate` on its first call; `step` counts optimizer steps taken, including the
    current one (1 after the first `optimizer.step()`, as `Trainer.state.global_step`).
    """

    def __init__(self, model: nn.Module, adapter_name: str, config: LRAConfig) -> None:
        self.adapter_name = adapter_name
        self.config = config
        by_key: dict[tuple, list[tuple[str, LRALayer]]] = {}
        for name, module in model.named_modules():
            if isinstance(module, LRALayer) and adapter_name in module.lra_lambda:
                U, V = module.lra_U[adapter_name], module.lra_V[adapter_name]
                key = (tuple(U.shape), tuple(V.shape), U.dtype, U.device)
                by_key.setdefault(key, []).append((name, module))
        if not by_key:
            raise ValueError(f"Adapter {adapter_name!r} has no LRA layers to allocate ranks over.")
        self.groups = [_LayerGroup([n for n, _ in items], [m for _, m in items], adapter_name)
                       for items in by_key.values()]
        self.layers = {n: m for items in by_key.values() for n, m in items}
        self.num_layers = len(self.layers)
        self.init_budget = sum(g.alive.numel() for g in self.groups)
        self.target_budget = config.target_r * self.num_layers
        if self.target_budget > self.init_budget:
            raise ValueError(
                f"LRAConfig.target_r={config.target_r} asks for {self.target_budget} ranks over {self.num_layers} "
                f"layers, but adapter {adapter_name!r} only has {self.init_budget} (rank_pattern lowers some "
                "layers): lower target_r."
            )
        self.budget = self.init_budget
        self.num_alive = self.init_budget
        self.num_updates = 0
        self.last_step: Optional[int] = None
        self.finalized = False
        self._warned_past_end = False
        self._params, self._ipt_rows, self._unc_rows = [], [], []
        for group in self.groups:
            params, ipt, unc = group.params_and_stat_rows()
            self._params += params
            self._ipt_rows += ipt
            self._unc_rows += unc
        self._lambdas = [lam for g in self.groups for lam in g.lam]
        self._mask_rows = [row for g in self.groups for row in g.mask.unbind(0)]

    # ------------------------------------------------------------------------------------------------ schedule
    @property
    def final_step(self) -> int:
        return self.config.total_step - self.config.final_warmup

    def budget_at(self, step: int) -> int:
        return budget_schedule(
            step, init_budget=self.init_budget, target_budget=self.target_budget,
            init_warmup=self.config.init_warmup, final_warmup=self.config.final_warmup,
            total_step=self.config.total_step,
        )

    def step(self, step: int) -> None:
        """Apply the masks, update the importance statistics and, on a mask step, prune to the scheduled budget."""
        self.last_step = step
        self.reapply_masks()
        if self.finalized:
            if step > self.config.total_step and not self._warned_past_end:
                self._warned_past_end = True
                warnings.warn(
                    f"update_and_allocate(step={step}) is past LRAConfig.total_step={self.config.total_step}: the "
                    f"ranks of adapter {self.adapter_name!r} are final and only kept pruned from now on. If training "
                    "is meant to be longer, set total_step to the number of optimizer steps.",
                    stacklevel=3,
                )
            return
        if step < self.final_step:
            self._update_importance()
            if step > self.config.init_warmup and step % self.config.mask_interval == 0:
                self._prune_to(self.budget_at(step))
            return
        if self.num_updates == 0 and self.num_alive > self.target_budget:
            warnings.warn(
                f"Adaptive rank allocation of adapter {self.adapter_name!r} reached its final budget at step {step} "
                "without a single importance update: the ranks kept are arbitrary. Call update_and_allocate(step) "
                "after every optimizer step from the start of training.",
                stacklevel=3,
            )
        self._prune_to(self.target_budget)
        self.finalized = True
        for group in self.groups:  # the statistics are no longer needed: give the memory back
            group.stats = {}
        self._params, self._ipt_rows, self._unc_rows = [], [], []

    def _update_importance(self) -> None:
        params, ipt_rows, unc_rows = self._params, self._ipt_rows, self._unc_rows
        grads = [p.grad for p in params]
        if any(g is None for g in grads):
            kept = [i for i, g in enumerate(grads) if g is not None]
            if not kept:
                raise RuntimeError(
                    f"update_and_allocate found no gradients on adapter {self.adapter_name!r}. Call it after "
                    "optimizer.step() and before optimizer.zero_grad(); with transformers.Trainer, pass "
                    "callbacks=[lra_peft.LRARankCallback()] instead of calling it yourself."
                )
            params = [params[i] for i in kept]
            grads = [grads[i] for i in kept]
            ipt_rows = [ipt_rows[i] for i in kept]
            unc_rows = [unc_rows[i] for i in kept]
        with torch.no_grad():
            sensitivity = torch._foreach_mul(params, grads)
            torch._foreach_abs_(sensitivity)
            torch._foreach_lerp_(ipt_rows, sensitivity, 1.0 - self.config.beta1)
            torch._foreach_sub_(sensitivity, ipt_rows)  # reuse the buffer: |I − Ī| is the uncertainty sample
            torch._foreach_abs_(sensitivity)
            torch._foreach_lerp_(unc_rows, sensitivity, 1.0 - self.config.beta2)
        self.num_updates += 1

    def _prune_to(self, budget: int) -> None:
        keep_count = min(budget, self.num_alive)
        if keep_count >= self.num_alive:
            self.budget = budget
            return
        scores = [g.triplet_scores() for g in self.groups]
        device = scores[0].device
        flat = torch.cat([s.flatten().to(device) for s in scores])
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[flat.topk(keep_count, sorted=False).indices] = True
        for group, chunk in zip(self.groups, keep.split([g.alive.numel() for g in self.groups])):
            group.alive &= chunk.view_as(group.alive).to(group.alive.device)
            group.mask.copy_(group.alive)
        self.num_alive = keep_count
        self.budget = budget
        self.reapply_masks()
        _track_pruned(self)

    def reapply_masks(self) -> None:
        """Zero the pruned λ again: the optimizer (Adam's momentum) moves them after every step."""
        if self.num_alive < self.init_budget:
            with torch.no_grad():
                torch._foreach_mul_(self._lambdas, self._mask_rows)

    # -------------------------------------------------------------------------------------------------- results
    def keep_masks(self) -> dict[str, torch.Tensor]:
        """Per layer name (relative to the tuner's model): a bool `[r]` mask of the triplets still alive."""
        return {name: row for g in self.groups for name, row in zip(g.names, g.alive.unbind(0))}

    def ranks(self) -> dict[str, int]:
        """Per layer name: its current rank (number of triplets alive)."""
        return {name: count for g in self.groups for name, count in zip(g.names, g.alive.sum(dim=1).tolist())}


# ---------------------------------------------------------------------------------------------------------- saving
def cut_adapter_state_dict(
    allocator: Optional[RankAllocator],
    layers: dict[str, LRALayer],
    config: LRAConfig,
    adapter_name: str,
    state_dict: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Cut U, λ, V of `adapter_name` in a PEFT state dict to the triplets still alive, and record the ranks.

    The ranks go into `config.rank_pattern` (and `config.alpha_pattern`, so that s = lra_alpha / r stays the same at
    the new rank), which PEFT then writes to adapter_config.json; loading creates layers of those ranks. ΔW₀'s factors
    (U0, λ0, V0 of SVD-initialised adapters) are never cut. `layers` maps names relative to the tuner's model to layers.
    """
    if allocator is None:
        _warn_if_allocation_never_ran(layers, config, adapter_name)
        return state_dict
    if allocator.num_alive == allocator.init_budget:
        return state_dict
    keys: dict[tuple[str, str], str] = {}
    for key in state_dict:
        parsed = split_factor_key(key, adapter_name)
        if parsed is not None and parsed[1] in FACTORS:
            keys[(parsed[0].removeprefix(KEY_PREFIX), parsed[1])] = key
    rank_pattern, alpha_pattern = {}, {}
    for name, keep in allocator.keep_masks().items():
        index = keep.nonzero().flatten()
        for kind, dim in (("lra_lambda", 0), ("lra_U", 1), ("lra_V", 1)):
            key = keys.get((name, kind))
            if key is None:
                continue
            tensor = state_dict[key]
            if tensor.shape[dim] != keep.numel():
                raise ValueError(
                    f"Cannot cut {key} of shape {tuple(tensor.shape)} to the allocated ranks: the allocator tracks "
                    f"rank {keep.numel()} for this layer. Save the model's own state dict (no `state_dict=` argument)."
                )
            state_dict[key] = tensor.index_select(dim, index.to(tensor.device)).contiguous()
        pattern_key = exact_pattern_key(name, allocator.layers)
        rank_pattern[pattern_key] = int(index.numel())
        alpha_pattern[pattern_key] = alpha_keeping_scale(layers[name].scaling[adapter_name], int(index.numel()))
    # Every layer of the adapter now has its own entry, which supersedes any user pattern (PEFT would otherwise take
    # whichever matching key comes first in the sorted adapter_config.json).
    config.rank_pattern = rank_pattern
    config.alpha_pattern = alpha_pattern
    return state_dict


def _warn_if_allocation_never_ran(layers: dict[str, LRALayer], config: LRAConfig, adapter_name: str) -> None:
    if config.target_r is None or config.inference_mode:
        return
    adapted = [layer for layer in layers.values() if adapter_name in layer.lra_lambda]
    total = sum(layer.lra_lambda[adapter_name].numel() for layer in adapted)
    if total > config.target_r * len(adapted):
        warnings.warn(
            f"LRAConfig.target_r={config.target_r} configures adaptive rank allocation for adapter {adapter_name!r}, "
            f"but it never ran: the adapter is saved at its full rank ({total} in total instead of "
            f"{config.target_r * len(adapted)}). Call model.update_and_allocate(step) after every optimizer.step(), "
            "or pass callbacks=[lra_peft.LRARankCallback()] to transformers.Trainer.",
            stacklevel=2,
        )


def check_not_loading_cut_into_full_rank(
    modules: dict[str, nn.Module], config: LRAConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
) -> None:
    """Raise a clear ValueError when a checkpoint cut by allocation is loaded into an existing full-rank adapter.

    That is what `Trainer(resume_from_checkpoint=...)` does; the kept triplets' original positions (which the
    optimizer state refers to) are not in the checkpoint, so such a run cannot be resumed exactly.
    """
    if config.target_r is None:
        return
    shorter = []
    for key, tensor in state_dict.items():
        parsed = split_factor_key(key, adapter_name)
        if parsed is None or parsed[1] != "lra_lambda" or not parsed[0]:
            continue
        name = parsed[0]
        layer = modules.get(name, modules.get(name.removeprefix(KEY_PREFIX)))
        if isinstance(layer, LRALayer) and adapter_name in layer.lra_lambda and tensor.dim() == 1 \
                and tensor.numel() < layer.lra_lambda[adapter_name].numel():
            shorter.append(f"{name.removeprefix(KEY_PREFIX)}: rank {tensor.numel()} in the checkpoint, "
                           f"{layer.lra_lambda[adapter_name].numel()} in the model")
    if shorter:
        raise ValueError(
            f"This checkpoint of adapter {adapter_name!r} was cut to the ranks chosen by adaptive rank allocation "
            f"({'; '.join(shorter[:3])}{' ...' if len(shorter) > 3 else ''}), and cannot be loaded into the "
            f"existing full-rank adapter {adapter_name!r}. Resuming a run with adaptive rank allocation from a "
            "checkpoint (Trainer(resume_from_checkpoint=...)) is not supported. To keep training the allocated "
            "adapter, load it into a fresh base model: PeftModel.from_pretrained(base, path, is_trainable=True). "
            "Nothing was loaded."
        )
