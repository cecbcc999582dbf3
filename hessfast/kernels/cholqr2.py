"""CholeskyQR2 with a modified Gram-Schmidt fallback, written once over per-backend primitives.

A backend supplies only the two passes over the (b, P) block (:class:`Primitives`); everything
of size b x b (the Cholesky factorisations, the triangular inverses, R) runs here in float64 torch,
and the rare ill-conditioned block goes through :func:`mgs2` in plain torch on W's device.

    G1 = W W^T = L1 L1^T,  W1 = L1^-1 W,  G2 = W1 W1^T = L2 L2^T,  Qb = L2^-1 W1,  R = L2^T L1^T

is backward stable while cond(W) <= (100 eps)^(-1/2), eps the dtype's machine epsilon (Yamamoto,
Nakatsukasa, Yanagisawa & Fukaya 2015).  max/min diag(L1) is a lower bound of cond(W): a ratio
above that limit (or a failed factorisation) sends the block to MGS2 before another pass over W.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch


def max_cond(dtype: torch.dtype) -> float:
    """Largest cond(W) CholeskyQR2 accepts in ``dtype``: (100 eps)^(-1/2), eps = finfo(dtype).eps."""
    return 1.0 / (100.0 * torch.finfo(dtype).eps) ** 0.5


def mgs_tol(dtype: torch.dtype, b: int) -> float:
    """MGS2 drops a row whose norm falls below this fraction of its norm before projection."""
    return 16.0 * torch.finfo(dtype).eps * b ** 0.5


class Primitives(NamedTuple):
    """The per-backend passes over a (b, P) block W of CholeskyQR2.

    gram(W) -> G: (b, b) float64, G = W W^T (symmetric).
    apply_small(W, M): W <- M W in place, M (b, b) float64 rounded to W's dtype by the backend.
    apply_gram(W, M) -> G: both in one pass (W <- M W, then G = W W^T); None: the two calls.
    """

    gram: Callable[[torch.Tensor], torch.Tensor]
    apply_small: Callable[[torch.Tensor, torch.Tensor], None]
    apply_gram: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None


def _factor(G: torch.Tensor, eye: torch.Tensor, cond_limit: Optional[float]):
    """(L, L^-1) for the Cholesky factor G = L L^T (float64), or None when the factorisation
    fails or max/min diag(L) exceeds ``cond_limit`` (None: no limit).  It runs between two passes
    over the block, so it makes few small torch calls and reads diag(L) back once.  L^-1 is formed
    as (L^-T)^T: torch returns the solve column-major, so its transpose is already C-contiguous."""
    L, info = torch.linalg.cholesky_ex(G)
    d = torch.diagonal(L).tolist()
    if int(info) != 0 or not all(map(math.isfinite, d)):
        return None
    if cond_limit is not None and not max(d) <= cond_limit * min(d):
        return None
    return L, torch.linalg.solve_triangular(L.mT, eye, upper=True).mT


def cholqr2(W: torch.Tensor, R: torch.Tensor, prims: Primitives) -> str:
    """Orthonormalise the rows of W (b, P) in place and fill R (b, b) with W^T = Qb^T R.

    Returns the method used: "cholqr2", "cholqr+mgs" (the second factorisation failed, so MGS2
    finished the once-orthogonalised block), "mgs" (the block was too ill-conditioned) or "empty"
    (b = 0).
    """
    if W.shape[0] == 0:
        return "empty"
    eye = torch.eye(W.shape[0], dtype=torch.float64, device=W.device)
    first = _factor(prims.gram(W), eye, max_cond(W.dtype))
    if first is None:
        Qb, Rm = mgs2(W)
        W.copy_(Qb)
        R.copy_(Rm)
        return "mgs"
    L1, M1 = first
    if prims.apply_gram is not None:
        G2 = prims.apply_gram(W, M1)
    else:
        prims.apply_small(W, M1)
        G2 = prims.gram(W)
    second = _factor(G2, eye, None)
    if second is None:
        Qb, Rm = mgs2(W)
        W.copy_(Qb)
        R.copy_(Rm.double() @ L1.T)  # copy_ rounds to R's dtype
        return "cholqr+mgs"
    L2, M2 = second
    prims.apply_small(W, M2)
    R.copy_(L2.T @ L1.T)
    return "cholqr2"


def mgs2(W: torch.Tensor):
    """Modified Gram-Schmidt with each projection applied twice: W (b, P) -> (Qb, R), W unchanged.

    Qb (b, P) has orthonormal rows and R (b, b) is upper triangular with W^T = Qb^T R.  A row
    (numerically) dependent on the earlier ones, i.e. whose norm drops below :func:`mgs_tol` of
    its norm before projection, becomes a zero row with R[i, i] = 0.  Dots accumulate in W's dtype.
    """
    b = W.shape[0]
    X = W.clone()
    R = torch.zeros(b, b, dtype=torch.float64, device=W.device)
    tol = mgs_tol(W.dtype, b)
    live = []
    for i in range(b):
        orig = float(torch.linalg.vector_norm(X[i]))
        for _ in range(2):
            for l in live:
                c = torch.dot(X[l], X[i])
                X[i] -= c * X[l]
                R[l, i] += float(c)
        nrm = float(torch.linalg.vector_norm(X[i]))
        if not nrm > tol * orig or nrm == 0.0:
            X[i] = 0
            continue
        X[i] /= nrm
        R[i, i] = nrm
        live.append(i)
    return X, R.to(W.dtype)


def _gram_torch(W: torch.Tensor) -> torch.Tensor:
    G = (W @ W.T).double()
    return (G + G.T) / 2


def _apply_small_torch(W: torch.Tensor, M: torch.Tensor) -> None:
    W.copy_(M.to(W.dtype) @ W)


TORCH_PRIMITIVES = Primitives(_gram_torch, _apply_small_torch)
