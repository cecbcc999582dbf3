"""Batched Gram-Schmidt of a block's rows: CholeskyQR2 with a modified Gram-Schmidt fallback.

Used by block Lanczos (the QR of each new block, W^T = Q_{j+1}^T B_j) and to start several
probes at once. ``ORTH_IMPLS[backend](W, R) -> method`` overwrite W with Qb and fill R.
"""
from __future__ import annotations

import torch

from ._checks import check_tensor, stream_ptr
from .dispatch import cpu_module, cuda_module, resolve_backend
from .reference import cholqr2_reference, mgs2_reference


def _orth_torch(W, R):
    Qb, Rr, method = cholqr2_reference(W)
    W.copy_(Qb)
    R.copy_(Rr)
    return method


def _orth_cpu(W, R):
    return cpu_module().cholqr2(W.numpy(), R.numpy(), torch.get_num_threads())


def _cholqr2_driver(W, R, gram, apply_small):
    """CholeskyQR2 on device kernels ``gram(W) -> G (b, b) float64`` and ``apply_small(W, M)`` (W <- M W).

    The b x b factorisations run in float64 with torch; falls back to MGS like the reference.
    """
    eps = torch.finfo(W.dtype).eps
    max_cond = 1.0 / (100.0 * eps) ** 0.5
    L, info = torch.linalg.cholesky_ex(gram(W))
    d = torch.diagonal(L)
    if int(info) != 0 or not bool(d.max() <= max_cond * d.min()):
        Qb, Rm = mgs2_reference(W)
        W.copy_(Qb)
        R.copy_(Rm)
        return "mgs"
    eye = torch.eye(W.shape[0], dtype=torch.float64, device=W.device)
    apply_small(W, torch.linalg.solve_triangular(L, eye, upper=False))
    L2, info = torch.linalg.cholesky_ex(gram(W))
    if int(info) != 0:
        Qb, Rm = mgs2_reference(W)
        W.copy_(Qb)
        R.copy_((Rm.double() @ L.T).to(W.dtype))
        return "cholqr+mgs"
    apply_small(W, torch.linalg.solve_triangular(L2, eye, upper=False))
    R.copy_((L2.T @ L.T).to(W.dtype))
    return "cholqr2"


def _orth_cuda(W, R):
    mod = cuda_module()
    b, P = W.shape
    size = W.element_size()

    def gram(X):
        G = torch.empty(b, b, dtype=X.dtype, device=X.device)
        work = torch.empty(mod.workspace(b, b, P, size), dtype=X.dtype, device=X.device)
        mod.gram(size, X.data_ptr(), b, P, G.data_ptr(), work.data_ptr(), stream_ptr(X))
        G = G.double()
        return (G + G.T) / 2

    def apply_small(X, M):
        M = M.to(X.dtype).contiguous()
        if b * b * size > 48 * 1024:  # the kernel stages M in 48 KiB of shared memory: b > 78 (f64), > 110 (f32)
            X.copy_(M @ X)
            return
        out = torch.empty_like(X)
        mod.apply_small(size, X.data_ptr(), b, P, M.data_ptr(), out.data_ptr(), stream_ptr(X))
        X.copy_(out)

    with torch.cuda.device(W.device):
        return _cholqr2_driver(W, R, gram, apply_small)


def _orth_triton(W, R):
    from .triton_kernels import apply_small_triton, gram_triton

    return _cholqr2_driver(W, R, gram_triton, apply_small_triton)


ORTH_IMPLS = {"torch": _orth_torch, "cpu": _orth_cpu, "cuda": _orth_cuda, "triton": _orth_triton}


def orthonormalize(W: torch.Tensor, backend: str = "auto", return_method: bool = False):
    """Orthonormalise the b rows of W among themselves: W^T = Qb^T R.

    CholeskyQR2 (G = W W^T = R1^T R1, W1 = R1^-T W, repeated once) reads W a few times and is
    stable while cond(W) <= (100 u)^(-1/2); beyond that, or if a Cholesky factorisation fails, it
    falls back to modified Gram-Schmidt with each projection applied twice.  Rows (numerically)
    dependent on earlier rows come back as zero rows with R[i, i] = 0 (block Lanczos deflates them).

    Args:
        W: (b, P) float32/float64 block, b <= P. Not modified.
        backend: "auto", "torch", "cpu", "cuda" or "triton".
        return_method: also return "cholqr2", "cholqr+mgs" or "mgs".

    Returns:
        (Qb, R): Qb (b, P) with orthonormal rows, R (b, b) upper triangular, diag(R) >= 0.

    Example:
        >>> Qb, R = orthonormalize(torch.tensor([[3.0, 4.0], [1.0, 0.0]], dtype=torch.float64), backend="torch")
        >>> [[round(x, 12) for x in row] for row in R.tolist()]
        [[5.0, 0.6], [0.0, 0.8]]
    """
    fn = "hessfast.kernels.orthonormalize"
    check_tensor(fn, "W", W, 2, "(b, P)")
    b, P = W.shape
    if b > P:
        raise ValueError(f"{fn}: W (b, P) needs b <= P to have b orthonormal rows, got shape {tuple(W.shape)}")
    name = resolve_backend(backend, W)
    X = W.detach().clone(memory_format=torch.contiguous_format)
    R = torch.empty(b, b, dtype=W.dtype, device=W.device)
    method = ORTH_IMPLS[name](X, R) if b > 0 else "empty"
    return (X, R, method) if return_method else (X, R)
