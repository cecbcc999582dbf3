"""Pure-PyTorch references of hessfast's kernels.

Each is the CPU/GPU fallback (``backend="torch"``), the oracle of tests/test_kernels*.py and the
baseline of bench/bench_kernels*.py.  They are written as fast as plain PyTorch allows (BLAS
``mm``/``addmm_``, no temporaries of size P beyond one clone), so benchmark ratios are honest.
"""
from __future__ import annotations

import torch


def cgs2_reference(Q: torch.Tensor, k: int, W: torch.Tensor):
    """Classical Gram-Schmidt applied twice against the first k rows of Q (paper Appendix D).

    Args:
        Q: (m+1, P) basis rows; rows 0..k-1 are used (orthonormal in exact arithmetic).  Of W's
            dtype, or bfloat16 with a float32 W (rows are widened to float32 a few at a time).
        k: number of basis rows, 0 <= k <= m+1.
        W: (b, P) block to project (not modified).

    Returns:
        W2 (b, P) = W1 - h2^T Q_k with W1 = W - h1^T Q_k, h1 = Q_k W^T, h2 = Q_k W1^T;
        coeffs (b, k) = (h1 + h2)^T; norms (b,) the row norms of W2.  Four passes over Q_k.
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


def cholqr2_reference(W: torch.Tensor, mgs_fallback: bool = True):
    """CholeskyQR2 of the rows of W with a modified Gram-Schmidt fallback.

    Args:
        W: (b, P) block, b <= P (not modified).

    Returns:
        (Qb, R, method): Qb (b, P) with orthonormal rows, R (b, b) upper triangular with
        W^T = Qb^T R (diag(R) >= 0), and the method used ("cholqr2", "cholqr+mgs" or "mgs").
        Rows dependent on earlier rows come back as zero rows of Qb with R[i, i] = 0.
    """
    eps = torch.finfo(W.dtype).eps
    max_cond = 1.0 / (100.0 * eps) ** 0.5    # CholeskyQR2 is stable while cond(W) <= u^(-1/2)
    X = W.clone()
    G = (X @ X.T).double()
    L, info = torch.linalg.cholesky_ex(G)
    d = torch.diagonal(L)
    if int(info) != 0 or not bool(d.max() <= max_cond * d.min()):
        Qb, R = mgs2_reference(X)
        return Qb, R, "mgs"
    X = torch.linalg.solve_triangular(L.to(X.dtype), X, upper=False)
    G2 = (X @ X.T).double()
    L2, info = torch.linalg.cholesky_ex(G2)
    if int(info) != 0:
        Qb, Rm = mgs2_reference(X)
        return Qb, (Rm.double() @ L.T).to(W.dtype), "cholqr+mgs"
    X = torch.linalg.solve_triangular(L2.to(X.dtype), X, upper=False)
    return X, (L2.T @ L.T).to(W.dtype), "cholqr2"


def mgs2_reference(W: torch.Tensor):
    """Modified Gram-Schmidt with each projection applied twice; W (b, P) -> (Qb, R) as above."""
    b = W.shape[0]
    X = W.clone()
    R = torch.zeros(b, b, dtype=torch.float64, device=W.device)
    tol = 16 * torch.finfo(W.dtype).eps * b ** 0.5
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


def qr_reference(W: torch.Tensor):
    """Householder QR oracle for :func:`cholqr2_reference`: (Qb (b, P), R (b, b)) with diag(R) >= 0."""
    Qt, R = torch.linalg.qr(W.T)
    s = torch.where(torch.diagonal(R) < 0, -1.0, 1.0).to(W.dtype)
    return (Qt * s).T, R * s[:, None]


def sqhvp_reference(U: torch.Tensor, V: torch.Tensor):
    """One chunk of the streamed squared-HVP sums (Hessian-variance issue).

    Args:
        U: (c, b, P) per-sample products u_{i,r} = H_i v_r for c samples and b probes.
        V: (b, P) probes v_r.

    Returns:
        sum_sq (b,) float64 = sum_i ||u_{i,r}||^2, sum_u (b, P) = sum_i u_{i,r} (U's dtype),
        sum_vu (b,) float64 = sum_i v_r . u_{i,r}.
    """
    sum_sq = (torch.linalg.vector_norm(U, dim=(0, 2)) ** 2).double()
    sum_vu = torch.bmm(U.transpose(0, 1), V.unsqueeze(2)).sum((1, 2)).double()   # (b, c, P) @ (b, P, 1)
    return sum_sq, U.sum(0), sum_vu
