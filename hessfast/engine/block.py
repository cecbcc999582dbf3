"""Block Lanczos with full reorthogonalisation: b probes share one Krylov iteration.

With Q_0 R_0 = V0 (the b probes, orthonormalised), each block step computes W = A Q_j for b vectors
at once (``matmat``: the b HVPs share the primal pass), projects W out of the whole basis with the
fused CGS2 kernel (which also yields A_j = Q_j A Q_j^T), and orthonormalises the rest,
W^T = Q_{j+1}^T B_j (CholeskyQR2).  After s = ceil(m / b) steps the block tridiagonal
T = tridiag(B_{j-1}, A_j, B_j^T) (s b x s b) is Q A Q^T; its eigenvalues are the Ritz values.

Quadrature weights (block Gauss quadrature, the block form of the paper's Theorem 13): with
T = S diag(theta) S^T and S_1 the first b rows of S, V0 V0^T-moments satisfy
V0 f(A) V0^T ~= R_0^T S_1 f(theta) S_1^T R_0, exactly for polynomials of degree <= 2s - 1.  So for
probe i the weights are w_{i,l} = ((R_0^T S_1)[i, l])^2 / ||v_i||^2: they sum to 1 (S_1 S_1^T = I)
and give v_i^T f(A) v_i / ||v_i||^2, the same estimator as single-vector SLQ for that probe, while a
repeated eigenvalue can be found up to b times (single-vector Lanczos finds one copy).

Deflation: a row of the new block that is (numerically) dependent on the basis (R[i, i] below
100 eps ||T||) is replaced by a random vector orthogonal to everything so far, with zero coupling
(B_j[i, :] = 0); T stays exactly Q A Q^T.  When no such vector exists the space is exhausted and
the iteration stops (``info["breakdown"]``).

API used by :func:`hessfast.lanczos` (``block_size=b``):
    block_lanczos(matmat, V0, m, reorth="full", backend="auto", progress=None, seed=None)
        -> (ritz (M,), weights (b, M), info)          M = s * b (fewer on breakdown)
    block_lanczos_spectrum(matmat, probes, m, block_size, reorth="full", backend="auto", bar=None)
        -> (ritz (num_probes, M), weights (num_probes, M), steps list, breakdown list)
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch

from ..kernels import orthonormalize, reorthogonalize
from .lanczos import check_basis_dtype

__all__ = ["block_lanczos", "block_lanczos_spectrum"]


def _check_block(fn, name, X, b, P, dtype, device):
    if not isinstance(X, torch.Tensor) or X.shape != (b, P):
        shape = tuple(X.shape) if isinstance(X, torch.Tensor) else type(X).__name__
        raise ValueError(f"{fn}: {name} must be a ({b}, {P}) tensor, got {shape}")
    if X.dtype != dtype or X.device != device:
        raise ValueError(f"{fn}: {name} must be {dtype} on {device}, got {X.dtype} on {X.device}")


def _orthonormal_block(Q, k, W, tol, gen, backend):
    """Orthonormalise W (b, P) against Q[:k] (already projected) and among its rows.

    Returns (Qn (b, P), B (b, b) float64, exhausted). Rows with B[i, i] <= tol are replaced by
    random unit vectors orthogonal to Q[:k] and to the other rows, with B[i, :] = 0.
    """
    b, P = W.shape
    Qn, B = orthonormalize(W, backend=backend)
    B = B.double()
    bad = [i for i in range(b) if not float(B[i, i]) > tol]
    for i in bad:
        B[i, :] = 0.0
        Qn[i] = 0.0
    for i in bad:
        for _ in range(3):  # a random vector loses at most a little to the projections; retry if not
            v = torch.randn(P, generator=gen, dtype=torch.float64).to(W)
            v, _, _ = reorthogonalize(Q, k, v[None], backend=backend)
            for _ in range(2):
                v = v - (v @ Qn.T) @ Qn
            n = float(torch.linalg.vector_norm(v))
            if n > 1e-3 * math.sqrt(P) * torch.finfo(W.dtype).eps ** 0.25:
                Qn[i] = v[0] / n
                break
        else:
            return Qn, B, True
    return Qn, B, False


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
    if reorth not in ("full", "none"):
        raise ValueError(f"{fn}: unknown reorth {reorth!r}; choose 'full' or 'none'")
    if V0.dim() != 2 or V0.shape[0] < 1:
        raise ValueError(f"{fn}: V0 must have shape (b, P) with b >= 1, got {tuple(V0.shape)}")
    b, P = V0.shape
    if not 1 <= m <= P:
        raise ValueError(f"{fn}: m = {m} must lie in [1, P = {P}]")
    s = math.ceil(m / b)
    if s * b > P:
        s = P // b if P // b >= 1 else 1
    dtype, device = V0.dtype, V0.device
    eps = torch.finfo(dtype).eps
    gen = torch.Generator().manual_seed(int(seed) if seed is not None else 0)
    full = reorth == "full"
    rows = s * b if full else 3 * b
    qdtype = check_basis_dtype(basis_dtype, dtype, reorth)
    Q = torch.zeros(rows, P, dtype=qdtype, device=device)

    V = V0.detach()
    tol0 = 100 * eps * float(torch.linalg.vector_norm(V, dim=1).max())
    Q0, R0, _ = _orthonormal_block(Q, 0, V, tol0, gen, backend)
    Q[:b] = Q0
    A_blocks, B_blocks = [], []
    anorm, deflated, breakdown = 0.0, 0, False
    for j in range(s):
        lo = (j * b) if full else (j % 3) * b
        Qj = Q[lo:lo + b] if qdtype == dtype else Q[lo:lo + b].to(dtype)
        W = matmat(Qj)
        _check_block(fn, "matmat(X)", W, b, P, dtype, device)
        W = W.detach()
        if not bool(torch.isfinite(W).all()):
            raise FloatingPointError(f"{fn}: matmat returned NaN or Inf at block step {j}")
        if full:
            W, coeffs, _ = reorthogonalize(Q, (j + 1) * b, W.clone(), backend=backend)
            C = coeffs[:, j * b:(j + 1) * b].double()
        else:
            C = (W @ Qj.T).double()
            W = W - C.to(dtype) @ Qj
            if j > 0:
                W = W - B_blocks[-1].T.to(dtype) @ Q[((j - 1) % 3) * b:((j - 1) % 3) * b + b]
        A = (C + C.T) / 2  # C[r, i] = q_i . A q_r
        A_blocks.append(A.cpu())
        anorm = max(anorm, float(torch.linalg.matrix_norm(A, 2)) + (float(torch.linalg.matrix_norm(B_blocks[-1], 2))
                                                                    if B_blocks else 0.0))
        if progress is not None:
            progress(b)
        if j == s - 1:
            break
        nlo = ((j + 1) * b) if full else ((j + 1) % 3) * b
        k = (j + 1) * b if full else 0
        Qn, B, exhausted = _orthonormal_block(Q, k, W, 100 * eps * max(anorm, 1e-300), gen, backend)
        deflated += int((torch.diagonal(B) == 0).sum())
        if exhausted:
            breakdown = True
            break
        Q[nlo:nlo + b] = Qn
        B_blocks.append(B.cpu())

    n = len(A_blocks)
    T = np.zeros((n * b, n * b))
    for j, A in enumerate(A_blocks):
        T[j * b:(j + 1) * b, j * b:(j + 1) * b] = A.numpy()
    for j, B in enumerate(B_blocks[: n - 1]):
        T[(j + 1) * b:(j + 2) * b, j * b:(j + 1) * b] = B.numpy()
        T[j * b:(j + 1) * b, (j + 1) * b:(j + 2) * b] = B.numpy().T
    theta, S = np.linalg.eigh(T)
    Y = R0.cpu().numpy().T @ S[:b]                      # (b, M): row i = R_0^T S_1 for probe i
    norms2 = (V.double() ** 2).sum(1).cpu().numpy()
    weights = Y ** 2 / norms2[:, None]
    info = {"steps": n, "breakdown": breakdown, "deflated": deflated, "T": T}
    return theta, weights, info


def block_lanczos_spectrum(matmat, probes: torch.Tensor, m: int, block_size: int, *, reorth: str = "full",
                           backend: str = "auto", bar=None, basis_dtype: Optional[torch.dtype] = None):
    """Run the probes (num_probes, P) in blocks of ``block_size`` (the last block may be smaller).

    Returns ritz (num_probes, M) and weights (num_probes, M) float64 (M = the largest Ritz count of
    any block; shorter rows are padded with NaN and weight 0), the Ritz count per probe and whether
    each probe's block broke down (invariant subspace found).
    """
    num, P = probes.shape
    results = []
    for start in range(0, num, block_size):
        V = probes[start:start + block_size]
        upd = (lambda n, b=V.shape[0]: bar.update(n * b)) if bar is not None else None
        theta, w, info = block_lanczos(matmat, V, m, reorth=reorth, backend=backend, progress=upd, seed=start,
                                       basis_dtype=basis_dtype)
        results.append((theta, w, info))
    M = max(len(t) for t, _, _ in results)
    ritz = np.full((num, M), np.nan)
    weights = np.zeros((num, M))
    steps, breakdown = [], []
    for i, (theta, w, info) in enumerate(results):
        rows = slice(i * block_size, i * block_size + w.shape[0])
        ritz[rows, : len(theta)] = theta
        weights[rows, : len(theta)] = w
        steps += [len(theta)] * w.shape[0]
        breakdown += [info["breakdown"]] * w.shape[0]
    return ritz, weights, steps, breakdown
