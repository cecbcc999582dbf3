"""Block Lanczos on a ``matmat`` closure: b probes share one Krylov iteration.

With Q_0 R_0 = V0 (the b probes, orthonormalised), each block step computes W = A Q_j for b vectors
at once (``matmat``: the b HVPs share the primal pass), projects W out of the basis (the fused CGS2
kernel, which also yields A_j = Q_j A Q_j^T) and orthonormalises the rest, W^T = Q_{j+1}^T B_j
(CholeskyQR2). After s = ceil(m / b) steps the block tridiagonal T = tridiag(B_{j-1}, A_j, B_j^T)
(s b x s b) is Q A Q^T; its eigenvalues are the Ritz values, and block Gauss quadrature (the block
form of the paper's Theorem 13, :mod:`.result`) gives each probe its own weights: they reproduce
v_i^T f(A) v_i / |v_i|^2 exactly for polynomials of degree <= 2s - 1, while a repeated eigenvalue
can be found up to b times (single-vector Lanczos finds one copy). Deflation and breakdown follow
the engine's one rule (:mod:`.recurrence`).

API used by :func:`hessfast.lanczos` (``block_size=b``):
    block_lanczos(matmat, V0, m, reorth="full", backend="auto", progress=None, seed=None)
        -> (ritz (M,), weights (b, M), info)          M = s * b (fewer on breakdown)
    block_lanczos_spectrum(matmat, probes, m, block_size, reorth="full", backend="auto", bar=None)
        -> (ritz (num_probes, M), weights (num_probes, M), steps list, breakdown list)
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

from ..utils.memory import block_steps
from .lanczos import check_reorth, local_basis
from .recurrence import Lanczos

__all__ = ["block_lanczos", "block_lanczos_spectrum", "planned_steps", "spectrum_rows"]


def planned_steps(m: int, b: int, P: int) -> int:
    """Block steps s = ceil(m / b) of a run, at most P // b (a Krylov space has at most P dimensions)."""
    s = block_steps(m, b)
    return max(min(s, P // b), 1) if s * b > P else s


def block_lanczos(matmat: Callable[[torch.Tensor], torch.Tensor], V0: torch.Tensor, m: int, *,
                  reorth: str = "full", backend: str = "auto", progress: Optional[Callable[[int], None]] = None,
                  seed: Optional[int] = 0, basis_dtype: Optional[torch.dtype] = None):
    """Block Lanczos on a symmetric operator from the b probes V0.

    Args:
        matmat: maps a (b, P) block X to the (b, P) block of products (A x_r)_r, e.g. ``op.matmat``.
        V0: (b, P) starting probes (float32/float64, any device); rows need not be orthonormal.
        m: Krylov dimension wanted; s = ceil(m / b) block steps, M = s b Ritz values.
        reorth: "full" (every block projected out of the whole basis with fused CGS2) or "none"
            (only the last two blocks: memory of 3 blocks, ghost eigenvalues appear).
        backend: kernel backend for the projections and QRs (see hessfast.kernels.resolve_backend).
        progress: called with b after each block step (e.g. ``tqdm.update``).
        seed: seeds the random vectors that replace deflated rows.
        basis_dtype: dtype of the stored basis (default V0's); ``torch.bfloat16`` with float32 V0 and
            reorth="full" halves its memory (see :func:`hessfast.lanczos`).  Each block is rounded
            once when stored, and the rounded block is the one ``matmat`` multiplies.

    Returns:
        (ritz (M,) float64 ascending, weights (b, M) float64 with rows summing to 1, info dict with
        "steps" (block steps), "breakdown", "deflated" (rows replaced), "T" (M, M) float64).
    """
    fn = "hessfast.block_lanczos"
    try:
        check_reorth(reorth)
    except ValueError as err:
        raise ValueError(f"{fn}: {err}") from None
    if V0.dim() != 2 or V0.shape[0] < 1:
        raise ValueError(f"{fn}: V0 must have shape (b, P) with b >= 1, got {tuple(V0.shape)}")
    b, P = V0.shape
    if not 1 <= m <= P:
        raise ValueError(f"{fn}: m = {m} must lie in [1, P = {P}]")
    s = planned_steps(m, b, P)
    basis = local_basis(reorth, s * b, b, P, V0.dtype, V0.device, basis_dtype, backend)
    run = Lanczos(matmat, basis, seed=seed, step_callback=progress, name=f"{fn}: matmat(X)")
    run.start(V0)
    res = run.run(s)
    theta, w = res.ritz()
    info = {"steps": res.steps, "breakdown": res.breakdown, "deflated": res.deflated, "T": res.T}
    return theta, np.reshape(w, (b, -1)), info


def spectrum_rows(results: list, width: int):
    """Ritz values and weights of (first probe, LanczosResult) runs as (num_probes, width) arrays.

    Rows shorter than ``width`` (a run that broke down) are padded with NaN and weight 0. Returns
    (ritz, weights, Ritz count per probe, breakdown per probe).
    """
    pairs = [(start, res, *res.ritz()) for start, res in results]
    num = sum(res.b for _, res, _, _ in pairs)
    width = max([width] + [len(theta) for _, _, theta, _ in pairs])
    ritz, weights = np.full((num, width), np.nan), np.zeros((num, width))
    steps, breakdown = [0] * num, [False] * num
    for start, res, theta, w in pairs:
        rows = slice(start, start + res.b)
        ritz[rows, : len(theta)] = theta
        weights[rows, : len(theta)] = np.reshape(w, (res.b, -1))
        steps[rows] = [len(theta)] * res.b
        breakdown[rows] = [res.breakdown] * res.b
    return ritz, weights, steps, breakdown


def block_lanczos_spectrum(matmat, probes: torch.Tensor, m: int, block_size: int, *, reorth: str = "full",
                           backend: str = "auto", bar=None, basis_dtype: Optional[torch.dtype] = None):
    """Run the probes (num_probes, P) in blocks of ``block_size`` (the last block may be smaller).

    Returns ritz (num_probes, M) and weights (num_probes, M) float64 (M = the largest planned Ritz
    count s b of any block; shorter rows are padded with NaN and weight 0), the Ritz count per probe
    and whether each probe's block broke down (invariant subspace found).
    """
    num, P = probes.shape
    results, width = [], 0
    for start in range(0, num, block_size):
        V = probes[start:start + block_size]
        b = V.shape[0]
        s = planned_steps(m, b, P)
        basis = local_basis(reorth, s * b, b, P, V.dtype, V.device, basis_dtype, backend)
        run = Lanczos(matmat, basis, seed=start, step_callback=(lambda n, b=b: bar.update(n * b)) if bar else None,
                      name="hessfast.block_lanczos: matmat(X)")
        run.start(V)
        results.append((start, run.run(s)))
        width = max(width, s * b)
    return spectrum_rows(results, width)
