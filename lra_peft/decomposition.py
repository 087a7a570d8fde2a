"""Singular-triplet initialisation: exact or randomized SVD of a weight matrix, and random orthonormal factors."""

from __future__ import annotations

from typing import Literal, Optional

import torch

# Oversampling of the randomized range finder (Halko, Martinsson & Tropp, 2011): sampling a few more directions than
# the rank wanted makes the top-r estimate much more accurate for the same number of power iterations.
RANDOMIZED_OVERSAMPLING = 10


def top_or_bottom_svd(
    weight: torch.Tensor, r: int, which: Literal["principal", "minor"], niter: Optional[int] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The r largest (`"principal"`) or smallest (`"minor"`) singular triplets of a 2-D `weight` (out × in).

    Returns `(U, S, V)` in float32 with U: out×r, S: r, V: in×r, so that `U @ diag(S) @ V.T` is the rank-r part.
    `niter=None` computes an exact SVD; an integer uses a randomized SVD with that many power iterations (principal
    only).
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight matrix, got shape {tuple(weight.shape)}")
    rank_max = min(weight.shape)
    if r > rank_max:
        raise ValueError(
            f"r={r} exceeds the rank of a {tuple(weight.shape)} weight ({rank_max}); lower `r` or use `rank_pattern`."
        )
    w = weight.detach().to(torch.float32)
    if niter is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        if which == "principal":
            return u[:, :r].contiguous(), s[:r].contiguous(), vh[:r].T.contiguous()
        return u[:, -r:].contiguous(), s[-r:].contiguous(), vh[-r:].T.contiguous()
    if which != "principal":
        raise ValueError("a randomized SVD only finds the largest singular values; use niter=None for 'minor'")
    q = min(r + RANDOMIZED_OVERSAMPLING, rank_max)
    u, s, v = torch.svd_lowrank(w, q=q, niter=niter)
    return u[:, :r].contiguous(), s[:r].contiguous(), v[:, :r].contiguous()


def random_orthonormal(rows: int, r: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A `rows × r` float32 matrix with orthonormal columns (or orthonormal rows when r > rows)."""
    gaussian = torch.randn(max(rows, r), min(rows, r), generator=generator)
    q, _ = torch.linalg.qr(gaussian)
    return q if rows >= r else q.T[:rows]
