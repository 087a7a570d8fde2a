"""Singular-triplet initialisation: exact or randomized SVD of a weight matrix, and random orthonormal factors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, Optional

import torch

# The randomized SVD keeps the last power iterates as a block Krylov basis of at most max(2r, KRYLOV_MAX_DIM) vectors:
# a far better top-r estimate than plain subspace iteration for the same products with W (see `randomized_top_svd`).
KRYLOV_MAX_DIM = 128
# A new Krylov direction whose part outside the basis is below this fraction of its length is numerically dependent.
_DEPENDENT = 1e-4


def top_or_bottom_svd(
    weight: torch.Tensor, r: int, which: Literal["principal", "minor"], niter: Optional[int] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The r largest (`"principal"`) or smallest (`"minor"`) singular triplets of a 2-D `weight` (out × in).

    Returns `(U, S, V)` in float32 with U: out×r, S: r, V: in×r, so that `U @ diag(S) @ V.T` is the rank-r part.
    `niter=None` computes an exact SVD; an integer uses a randomized SVD with that many power iterations (principal
    only; see `randomized_top_svd`).
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
        u, s, vh = exact_svd(w)
        if which == "principal":
            return u[:, :r].contiguous(), s[:r].contiguous(), vh[:r].T.contiguous()
        return u[:, -r:].contiguous(), s[-r:].contiguous(), vh[-r:].T.contiguous()
    if which != "principal":
        raise ValueError("a randomized SVD only finds the largest singular values; use niter=None for 'minor'")
    return randomized_top_svd(w, r, niter)


def exact_svd(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`torch.linalg.svd(w, full_matrices=False)`, computed on the tall side.

    LAPACK works on column-major matrices: the transpose of a wide row-major `w` is a tall column-major one it takes
    without a copy, and on CPU its SVD runs about twice as fast as that of `w` itself (4096 × 11008 fp32, one thread:
    benchmarks/results/init_4096x11008.md).
    """
    if w.shape[0] < w.shape[1]:
        v, s, uh = torch.linalg.svd(w.T, full_matrices=False)
        return uh.T, s, v.T
    return torch.linalg.svd(w, full_matrices=False)


def _orthonormal_rows(rows: torch.Tensor) -> torch.Tensor:
    """Orthonormal rows spanning the rows of `rows` (k × d, k ≤ d)."""
    q, _ = torch.linalg.qr(rows.T)  # rows.T is column-major: LAPACK's own layout, no copy
    return q.T


def _new_directions(basis: torch.Tensor, rows: torch.Tensor) -> Optional[torch.Tensor]:
    """Orthonormal rows for what `rows` adds to the row space of `basis` (orthonormal rows), or None if nothing."""
    lengths = torch.linalg.vector_norm(rows, dim=1)
    rows = rows - (rows @ basis.T) @ basis
    q, r = torch.linalg.qr(rows.T)
    q = q[:, r.diagonal().abs() > _DEPENDENT * lengths]
    if q.shape[1] == 0:
        return None
    q = q - basis.T @ (basis @ q)  # a second Gram-Schmidt pass ("twice is enough")
    return torch.linalg.qr(q)[0].T.contiguous()


def randomized_top_svd(
    w: torch.Tensor, r: int, niter: int, max_dim: int = KRYLOV_MAX_DIM
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-r singular triplets of `w` (m × n) from 2·niter + 2 products of w with r-column blocks.

    This is as many products, each as wide, as the subspace iteration of `torch.svd_lowrank(w, q=r, niter)` (PEFT's
    `pissa_niter_[n]`), which dominate the cost. But where subspace iteration keeps only its last block, this keeps the
    last ones as a block Krylov basis (Musco & Musco, 2015) of up to max(2r, `max_dim`) vectors, which contains that
    last block: the rank-r approximation found is never worse, and usually far better. The thin factors are kept as
    rows (r × d), so that every product with w is a wide-times-W GEMM, which BLAS runs faster than W-times-thin.
    A matrix whose short side is at most that many vectors gets the exact SVD (as cheap there, and exact).
    Returns `(U, S, V)` like `top_or_bottom_svd`.
    """
    a = w if w.shape[0] <= w.shape[1] else w.T  # s × l with s ≤ l: the basis lives on the short side
    s = a.shape[0]
    max_dim = max(2 * r, max_dim)
    if s <= max_dim:  # the basis could hold the whole short side: the exact SVD costs about as much
        u, sigma, vh = exact_svd(w)
        return u[:, :r].contiguous(), sigma[:r].contiguous(), vh[:r].T.contiguous()
    depth = min(niter, max_dim // r - 1)
    omega = torch.randn(r, a.shape[1], dtype=a.dtype, device=a.device)
    q = _orthonormal_rows(omega @ a.T)
    for _ in range(niter - depth):  # plain subspace iteration, then `depth` Krylov steps
        q = _orthonormal_rows(_orthonormal_rows(q @ a) @ a.T)
    basis = q.contiguous()
    projected = [basis @ a]  # the rows of basis · a, block by block: the Krylov steps need them anyway
    for _ in range(depth):
        new = _new_directions(basis, projected[-1] @ a.T)
        if new is None:  # the basis already holds the whole range
            break
        projected.append(new @ a)
        basis = torch.cat([basis, new])
    # Rayleigh-Ritz: basis · a = P Σ Qᵀ; a ≈ basisᵀ · basis · a. P and Σ come from the eigendecomposition of the small
    # Gram matrix (k × k, formed in float64 so that squaring the spectrum costs no accuracy in the top r), Q = (basis·a)ᵀ
    # P Σ⁻¹: two GEMMs and a k × k eigh instead of an SVD of the l × k matrix, which dominated on small W.
    projected_rows = torch.cat(projected)
    rows64 = projected_rows.to(torch.float64)
    evals, evecs = torch.linalg.eigh(rows64 @ rows64.T)
    top = evecs[:, -r:].flip(1)  # eigh sorts ascending
    sigma = evals[-r:].flip(0).clamp_min(0).sqrt()
    left = top.to(a.dtype)
    u_short = basis.T @ left
    v_long = (projected_rows.T @ left) / sigma.to(a.dtype).clamp_min(torch.finfo(a.dtype).tiny)
    u, v = (u_short, v_long) if a is w else (v_long, u_short)
    return u.contiguous(), sigma.to(a.dtype).contiguous(), v.contiguous()


def random_orthonormal(rows: int, r: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A `rows × r` float32 matrix with orthonormal columns (or orthonormal rows when r > rows)."""
    gaussian = torch.randn(max(rows, r), min(rows, r), generator=generator)
    q, _ = torch.linalg.qr(gaussian)
    return q if rows >= r else q.T[:rows]


# ----------------------------------------------------------------------------------------- task-aware initialisations
# CorDA regularises the input second moment before inverting it: C̃ = C + CORDA_DAMPING · mean(diag C) · I. 0.01 is
# the damping PEFT's `preprocess_corda` starts from; a fixed value keeps the identity (W − ΔW₀)·C̃ = tail of W·C̃ exact.
CORDA_DAMPING = 1e-2


def regularised_covariance(covariance: torch.Tensor, damping: float = CORDA_DAMPING) -> torch.Tensor:
    """C̃ = C + damping · mean(diag C) · I in float64 (in × in), positive definite for any C ⪰ 0 that is not 0."""
    c = covariance.detach().to(torch.float64)
    c = (c + c.T) / 2  # summed in float32 batch by batch: make it exactly symmetric
    mean_diag = c.diagonal().mean()
    if not torch.isfinite(c).all() or mean_diag <= 0:
        raise ValueError(
            "the calibration inputs of this layer have no energy (their second moment XᵀX is zero or not finite); "
            "check that run_model() runs the model on real batches"
        )
    return c + damping * mean_diag * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)


def corda_factors(
    weight: torch.Tensor, covariance: torch.Tensor, r: int, method: Literal["ipm", "kpm"] = "ipm",
    damping: float = CORDA_DAMPING,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CorDA: the rank-r part of W oriented by the layer's inputs (Yang et al., 2024).

    With C̃ the regularised input second moment (`regularised_covariance`, in × in) and W·C̃ = P Σ Qᵀ, the adapter is
    ΔW₀ = P_r Σ_r Q_rᵀ C̃⁻¹ (the r largest triplets for `"ipm"`, instruction-previewed; the r smallest for `"kpm"`,
    knowledge-preserving), so that ‖(W − ΔW₀)·C̃‖_F is the norm of the other singular values of W·C̃.

    Returns `(U, S, V)` in float32 (U: out × r orthonormal, S: r, V: in × r with unit columns, not orthogonal) with
    `U @ diag(S) @ V.T = ΔW₀`.
    """
    if weight.dim() != 2 or covariance.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(
            f"CorDA needs a 2-D weight (out × in) and an in × in covariance, got {tuple(weight.shape)} and "
            f"{tuple(covariance.shape)}"
        )
    if r > min(weight.shape):
        raise ValueError(f"r={r} exceeds the rank of a {tuple(weight.shape)} weight; lower `r` or use `rank_pattern`.")
    c = regularised_covariance(covariance, damping)
    u, s, vh = torch.linalg.svd(weight.detach().to(torch.float64) @ c, full_matrices=False)
    keep = slice(0, r) if method == "ipm" else slice(s.numel() - r, s.numel())
    # Qᵀ C̃⁻¹ = (C̃⁻¹ Q)ᵀ since C̃ is symmetric; a Cholesky solve is stabler than forming the inverse.
    v = torch.cholesky_solve(vh[keep].T.contiguous(), torch.linalg.cholesky(c))
    norms = torch.linalg.vector_norm(v, dim=0)
    return u[:, keep].float().contiguous(), (s[keep] * norms).float(), (v / norms).float().contiguous()


def gradient_factors(
    gradient: torch.Tensor, r: int, scale: float, niter: Optional[int] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoRA-GA-style factors from the accumulated task gradient G = ∂L/∂W (out × in).

    U = the top-r left and V the top-r right singular vectors of G, and ΔW₀ = scale · U Vᵀ: every direction starts
    with the same weight, so that the first gradient step of (U, λ, V) is s²·(1 + 2·λ₀²)·(rank-r truncation of G),
    i.e. along full fine-tuning's own step (see docs/initialisation.md). Returns `(U, S, V)` with S = scale · 1.
    """
    u, _, v = top_or_bottom_svd(gradient, r, "principal", niter=niter)
    if not torch.isfinite(u).all() or not torch.isfinite(v).all():
        raise ValueError("the accumulated gradient of this layer is not finite; check the calibration loss")
    return u, torch.full((r,), float(scale)), v


# ---------------------------------------------------------------------- quantized-residual refinement (QPiSSA)
def refine_quantized_init(
    weight: torch.Tensor,
    U: torch.Tensor,
    S: torch.Tensor,
    V: torch.Tensor,
    quantize_dequantize: Callable[[torch.Tensor], torch.Tensor],
    iters: int,
    which: Literal["principal", "minor"],
    niter: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[float]]:
    """Alternate "quantize the residual, re-fit the rank-r part to what quantization lost" (QPiSSA / LoftQ).

    Args:
        weight: W, out × in, float32.
        U, S, V: the initial rank-r part A = U · diag(S) · Vᵀ (U: out×r, S: r, V: in×r), W's top (or bottom) triplets.
        quantize_dequantize: residual (out × in) -> dequant(Q(residual)), exactly as the base layer stores it.
        iters: number of alternations; 0 returns the input.
        which: `"principal"` re-fits A as the top-r SVD of W − dequant(Q(W − A)). `"minor"` keeps the adapter in
            W's minor subspaces (span U, span V) and re-fits A as the best matrix there: U Uᵀ (W − Q) V Vᵀ.
        niter: power iterations of a randomized SVD (`None`: exact), for `"principal"`.

    Returns:
        `(U, S, V, errors)`: the factors with the smallest ‖W − (dequant(Q(W − A)) + A)‖_F seen (never worse than the
        input) and that error for the input and after each alternation.
    """

    def error_of(U_: torch.Tensor, S_: torch.Tensor, V_: torch.Tensor) -> tuple[float, torch.Tensor]:
        low_rank = (U_ * S_) @ V_.T
        quantized = quantize_dequantize(weight - low_rank)
        return torch.linalg.norm(weight - quantized - low_rank).item(), quantized

    best = (U, S, V)
    best_error, quantized = error_of(U, S, V)
    errors = [best_error]
    U_minor, V_minor = U, V
    for _ in range(iters):
        lost = weight - quantized
        if which == "principal":
            U, S, V = top_or_bottom_svd(lost, U.shape[1], "principal", niter=niter)
        else:
            core = U_minor.T @ lost @ V_minor
            P, S, Rh = torch.linalg.svd(core)
            U, V = U_minor @ P, V_minor @ Rh.T
        error, quantized = error_of(U, S, V)
        errors.append(error)
        if error < best_error:
            best, best_error = (U.contiguous(), S.contiguous(), V.contiguous()), error
    return (*best, errors)
