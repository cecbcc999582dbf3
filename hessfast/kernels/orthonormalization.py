"""Orthonormalisation of a block's rows: CholeskyQR2 with an MGS2 fallback, on every backend.

Used by block Lanczos (the QR of each new block, W^T = Q_{j+1}^T B_j) and to start several
probes at once.  The algorithm is :func:`hessfast.kernels.cholqr2.cholqr2`, written once; each
backend here supplies only its two passes over the block (:class:`~hessfast.kernels.cholqr2.Primitives`).
``ORTH_IMPLS[backend](W, R) -> method`` overwrite W with Qb and fill R.
"""
from __future__ import annotations

import numpy as np
import torch

from ._checks import check_tensor, stream_ptr
from .cholqr2 import TORCH_PRIMITIVES, Primitives, cholqr2
from .dispatch import cpu_module, cuda_module, resolve_backend


def _cpu_primitives() -> Primitives:
    # M comes C-contiguous from the driver; G is made by numpy, whose calls cost less than torch's
    # between two passes over the block.
    mod, nt = cpu_module(), torch.get_num_threads()

    def gram(X):
        G = np.empty((X.shape[0], X.shape[0]))
        mod.gram(X.numpy(), G, nt)
        return torch.from_numpy(G)

    def apply_small(X, M):
        mod.apply_small(X.numpy(), M.numpy(), None, nt)

    def apply_gram(X, M):  # the product and the next Gram matrix in one pass over X
        G = np.empty((X.shape[0], X.shape[0]))
        mod.apply_small(X.numpy(), M.numpy(), G, nt)
        return torch.from_numpy(G)

    return Primitives(gram, apply_small, apply_gram)


def _cuda_primitives(b: int, P: int, dtype: torch.dtype) -> Primitives:
    mod = cuda_module()
    size = torch.empty((), dtype=dtype).element_size()

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

    return Primitives(gram, apply_small)


def _orth_torch(W, R):
    return cholqr2(W, R, TORCH_PRIMITIVES)


def _orth_cpu(W, R):
    return cholqr2(W, R, _cpu_primitives())


def _orth_cuda(W, R):
    with torch.cuda.device(W.device):
        return cholqr2(W, R, _cuda_primitives(*W.shape, W.dtype))


def _orth_triton(W, R):
    from .triton_kernels import apply_small_triton, gram_triton

    return cholqr2(W, R, Primitives(gram_triton, apply_small_triton))


ORTH_IMPLS = {"torch": _orth_torch, "cpu": _orth_cpu, "cuda": _orth_cuda, "triton": _orth_triton}


def orthonormalize(W: torch.Tensor, backend: str = "auto", return_method: bool = False):
    """Orthonormalise the b rows of W among themselves: W^T = Qb^T R.

    CholeskyQR2 (G = W W^T = R1^T R1, W1 = R1^-T W, repeated once) reads W a few times and is
    stable while cond(W) <= (100 eps)^(-1/2); beyond that, or if a Cholesky factorisation fails, it
    falls back to modified Gram-Schmidt with each projection applied twice.  Rows (numerically)
    dependent on earlier rows come back as zero rows with R[i, i] = 0 (block Lanczos deflates them).
    Every backend runs the same driver (:mod:`hessfast.kernels.cholqr2`) under the accumulation
    contract of :mod:`hessfast.kernels.reference`.

    Args:
        W: (b, P) float32/float64 block, b <= P. Not modified.
        backend: "auto", "torch", "cpu", "cuda" or "triton".
        return_method: also return "cholqr2", "cholqr+mgs" or "mgs" ("empty" when b = 0).

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
