"""PEFT's own LoRA converter (`peft.convert_to_lora` / `peft.save_as_lora`) for LRA models, exact.

PEFT converts a layer by taking `get_delta_weight(adapter)` and truncating its SVD. For LRA that delta is relative to
the layer's *current* base weight, which for a `"principal"`/`"minor"` adapter that owns the residual is W − ΔW₀,
while the converted LoRA adapter is applied to the original W. So LRA layers are converted from the residual-free
factors that `lra_peft.export_lora` writes (B = [s·U·diag(λ) | −s·U₀·diag(λ₀)], A = [V | V₀]ᵀ):

- `rank` (int) at least the exact rank k of those factors (r, or 2r with an SVD initialisation): the factors
  themselves, rank k (PEFT records it in `rank_pattern`); the LoRA adapter reproduces the LRA one exactly.
- a smaller int rank, or a float energy threshold: the truncated SVD of the residual-free ΔW, as PEFT does for
  other methods.

`lra_peft.peft_hooks` wraps `peft.tuners.lora.conversion._convert_module_to_lora`, which `convert_to_lora` looks up
at call time, so that LRA layers go through `lra_to_lora` and every other layer through PEFT's code.
Linear and Conv1D layers are converted; Embedding and Conv2d layers are not (PEFT's converter writes Linear LoRA
keys only): `lra_peft.export_lora` converts those.
"""

from __future__ import annotations

from typing import Union

import torch
from peft.tuners.lora.conversion import _find_cutoff_index

from .snapshot import LayerFactors


def layer_factors(module, adapter_name: str) -> LayerFactors:
    """The factors of `adapter_name` in a live `LRALayer` (matrix view: U out × r, λ r, V in × r)."""
    init = adapter_name in module.lra_U0
    return LayerFactors(
        name=adapter_name,
        U=module.lra_U[adapter_name].detach(),
        lam=module.lra_lambda[adapter_name].detach(),
        V=module.lra_V[adapter_name].detach(),
        scaling=float(module.scaling[adapter_name]),
        U0=module.lra_U0[adapter_name] if init else None,
        lam0=module.lra_lambda0[adapter_name] if init else None,
        V0=module.lra_V0[adapter_name] if init else None,
    )


@torch.no_grad()
def lra_to_lora(module, rank: Union[int, float], adapter_name: str = "default") -> tuple[torch.Tensor, torch.Tensor, int]:
    """`(lora_A, lora_B, rank)` of one LRA layer, relative to the original base weight (see the module docstring).

    lora_A is rank × in, lora_B is out × rank, in the adapter's dtype.
    """
    dtype = module.lra_U[adapter_name].dtype
    B, A = layer_factors(module, adapter_name).residual_free_factors()  # float32: out × k, k × in
    if not (isinstance(rank, int) and rank >= B.shape[1]):
        U, S, Vh = torch.linalg.svd(B @ A, full_matrices=False)
        k = rank if isinstance(rank, int) else _find_cutoff_index(S, threshold=rank)
        if k > U.shape[1]:
            raise ValueError(
                f"The chosen rank {k} is larger than the weight shape ({U.shape[1]}), please choose a lower rank."
            )
        B, A = U[:, :k] * S[:k], Vh[:k]
    return A.to(dtype).contiguous(), B.to(dtype).contiguous(), B.shape[1]
