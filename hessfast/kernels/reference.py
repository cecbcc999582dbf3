"""Pure-PyTorch references of hessfast's kernels, and the accumulation contract of every backend.

Each reference is the CPU/GPU fallback (``backend="torch"``), the yardstick of tests/kernels/test_kernels*.py
(a backend's error against a float64 evaluation of the same inputs may be at most twice the
same-precision reference's) and the baseline of bench/bench_kernels.py.  They are written as fast
as plain PyTorch allows (BLAS ``mm``/``addmm_``, no temporaries of size P beyond one clone), so
benchmark ratios are honest.

Accumulation contract (every backend: "torch", "cpu", "cuda", "triton"; every kernel):

* No arithmetic below float32.  A bfloat16 basis is widened exactly to float32 on load and all
  its products and sums are float32; blocks W, U, V are float32 or float64.
* Dot products, row norms and Gram matrices over the P columns accumulate in at least the
  block's dtype: float32 for float32 blocks (with a float32 or bfloat16 basis), float64 for
  float64.  The compiled backends sum each tile of columns (a cache-sized tile of one thread's
  columns on "cpu", the 256-column chunks of one thread block on "cuda", the BLOCK_P columns of
  one program on "triton") in the block's dtype and combine the tile sums in float64; "torch" is
  BLAS and torch reductions in the block's dtype throughout.
* Updates (W -= h^T Q, W <- M W) run in the block's dtype with the coefficients rounded to it.
* Returned in the block's dtype: CGS2's W2, coeffs and norms (norms = sqrt of the accumulated
  sum of squares), CholeskyQR2's Qb and R, the squared-HVP running sum_u.  Returned in float64:
  the squared-HVP sums sum_sq and sum_vu (each chunk's contribution accumulated as above, then
  added in float64) and CholeskyQR2's b x b Gram matrices; the b x b Cholesky factorisations
  and triangular inverses run in float64 torch on every backend (:mod:`hessfast.kernels.cholqr2`).
* Reductions run in a fixed order for a given thread count (CPU) or launch geometry (GPU): the
  same inputs give the same bits.

So every output's error is of the order of the block's unit roundoff times the size of the
terms it sums (|W| |Q| for a coefficient, not its possibly cancelled value): the same order as
the reference's, which the tests use as the yardstick.
"""
from __future__ import annotations

import torch

from .cholqr2 import TORCH_PRIMITIVES, cholqr2


def cgs2_reference(Q: torch.Tensor, k: int, W: torch.Tensor):
    """Classical Gram-Schmidt applied twice against the first k rows of Q (paper Appendix D).

    Args:
        Q: (m+1, P) basis rows; rows 0..k-1 are used (orthonormal in exact arithmetic).  Of W's
            dtype, or bfloat16 with a float32 W (rows are widened to float32 a few at a time).
        k: number of basis rows, 0 <= k <= m+1.
        W: (b, P) block to project (not modified).

    Returns:
        W2 (b, P) = W1 - h2^T Q_k with W1 = W - h1^T Q_k, h1 = Q_k W^T, h2 = Q_k W1^T;
        coeffs (b, k) = (h1 + h2)^T; norms (b,) the row norms of W2, all in W's dtype.  Four
        passes over Q_k, BLAS ``mm``/``addmm_`` in W's dtype: the products h and the updates
        accumulate in W's dtype, the norms by torch's reduction in W's dtype (the accumulation
        contract of the module docstring, at its minimum).
    """
    W2 = W.clone()
    if Q.dtype == W.dtype:
        Qk = Q[:k]
        h1 = W2 @ Qk.T                       # (b, k)   pass 1
        W2.addmm_(h1, Qk, alpha=-1)          # W1       pass 2
        h2 = W2 @ Qk.T                       #          pass 3
        W2.addmm_(h2, Qk, alpha=-1)          # W2       pass 4
        return W2, h1 + h2, torch.linalg.vector_norm(W2, dim=1)
    step = max(1, 2 ** 22 // max(Q.shape[1], 1))  # rows widened at a time (16 MiB of float32)
    chunks = [(i, min(i + step, k)) for i in range(0, k, step)]
    coeffs = torch.zeros(W.shape[0], k, dtype=W.dtype, device=W.device)
    for _ in range(2):
        h = torch.cat([W2 @ Q[i:j].to(W.dtype).T for i, j in chunks], dim=1) if k else coeffs[:, :0]
        for i, j in chunks:
            W2.addmm_(h[:, i:j], Q[i:j].to(W.dtype), alpha=-1)
        coeffs += h
    return W2, coeffs, torch.linalg.vector_norm(W2, dim=1)


def cholqr2_reference(W: torch.Tensor):
    """CholeskyQR2 of the rows of W with a modified Gram-Schmidt fallback, in plain PyTorch.

    The one driver of :mod:`hessfast.kernels.cholqr2` over torch's ``W @ W.T`` and ``M @ W``
    (the compiled backends run the same driver over their own two passes).

    Args:
        W: (b, P) block, b <= P (not modified).

    Returns:
        (Qb, R, method): Qb (b, P) with orthonormal rows, R (b, b) upper triangular with
        W^T = Qb^T R (diag(R) >= 0), and the method used ("cholqr2", "cholqr+mgs", "mgs" or "empty").
        Rows dependent on earlier rows come back as zero rows of Qb with R[i, i] = 0.
    """
    X = W.clone(memory_format=torch.contiguous_format)
    R = torch.empty(W.shape[0], W.shape[0], dtype=W.dtype, device=W.device)
    return X, R, cholqr2(X, R, TORCH_PRIMITIVES)


def qr_reference(W: torch.Tensor):
    """Householder QR (LAPACK geqrf), the independent oracle of :func:`cholqr2_reference`.

    W (b, P) -> (Qb (b, P), R (b, b)) with W^T = Qb^T R and diag(R) >= 0.
    """
    Qt, R = torch.linalg.qr(W.T)
    s = torch.where(torch.diagonal(R) < 0, -1.0, 1.0).to(W.dtype)
    return (Qt * s).T, R * s[:, None]


def sqhvp_reference(U: torch.Tensor, V: torch.Tensor):
    """One chunk of the streamed squared-HVP sums of :class:`hessfast.kernels.SquaredHVPAccumulator`.

    Args:
        U: (c, b, P) per-sample products u_{i,r} = H_i v_r for c samples and b probes.
        V: (b, P) probes v_r.

    Returns:
        sum_sq (b,) float64 = sum_i ||u_{i,r}||^2, sum_u (b, P) = sum_i u_{i,r} (U's dtype),
        sum_vu (b,) float64 = sum_i v_r . u_{i,r}.  The sums accumulate in U's dtype (BLAS, torch's
        reductions) and are widened to float64 at the end.
    """
    sum_sq = (torch.linalg.vector_norm(U, dim=(0, 2)) ** 2).double()
    sum_vu = torch.bmm(U.transpose(0, 1), V.unsqueeze(2)).sum((1, 2)).double()   # (b, c, P) @ (b, P, 1)
    return sum_sq, U.sum(0), sum_vu
