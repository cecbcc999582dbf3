"""Fused CGS2 reorthogonalisation of a block against a Lanczos basis (paper Appendix D).

``reorthogonalize`` is the public entry point; ``CGS2_IMPLS[backend](Q, k, W, coeffs, norms)`` are
the per-backend implementations with preallocated outputs (used by the tests to poison outputs).
"""
from __future__ import annotations

import torch

from ._checks import check_tensor, stream_ptr
from .dispatch import cpu_module, cuda_module, resolve_backend
from .reference import cgs2_reference


def _cgs2_torch(Q, k, W, coeffs, norms):
    W2, c, n = cgs2_reference(Q, k, W)
    W.copy_(W2)
    coeffs.copy_(c)
    norms.copy_(n)


def _cgs2_cpu(Q, k, W, coeffs, norms):
    q = Q.view(torch.int16).numpy() if Q.dtype == torch.bfloat16 else Q.numpy()  # numpy has no bfloat16
    cpu_module().cgs2(q, k, W.numpy(), coeffs.numpy(), norms.numpy(), torch.get_num_threads())


def _cgs2_cuda(Q, k, W, coeffs, norms):
    mod = cuda_module()
    b, P = W.shape
    with torch.cuda.device(W.device):
        work = torch.empty(mod.workspace(k, b, P, Q.element_size()), dtype=W.dtype, device=W.device)
        mod.cgs2(W.element_size(), Q.element_size(), Q.data_ptr(), Q.stride(0), k, W.data_ptr(), b, P,
                 coeffs.data_ptr(), norms.data_ptr(), work.data_ptr(), stream_ptr(W))


def _cgs2_triton(Q, k, W, coeffs, norms):
    from .triton_kernels import cgs2_triton

    cgs2_triton(Q, k, W, coeffs, norms)


BASIS_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def block_dtype(basis_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the blocks W projected against a basis of ``basis_dtype`` (float32 for bfloat16)."""
    return torch.float32 if basis_dtype == torch.bfloat16 else basis_dtype


CGS2_IMPLS = {"torch": _cgs2_torch, "cpu": _cgs2_cpu, "cuda": _cgs2_cuda, "triton": _cgs2_triton}


def reorthogonalize(Q: torch.Tensor, k: int, W: torch.Tensor, backend: str = "auto"):
    """Project W out of the span of the first k rows of Q, twice (CGS2, "twice is enough").

    h1 = Q_k W^T,  W1 = W - h1^T Q_k,  h2 = Q_k W1^T,  W2 = W1 - h2^T Q_k  with Q_k = Q[:k].
    The compiled backends read Q_k three times instead of four (h2 is formed in the pass that forms W1).
    Every backend meets the accumulation contract stated in :mod:`hessfast.kernels.reference`.

    Args:
        Q: (m+1, P) basis rows, float32 or float64; rows 0..k-1 are used. Needs unit column stride
            (``Q.stride(1) == 1``), as a preallocated Lanczos basis has.  A bfloat16 basis is
            accepted with a float32 W: rows are widened exactly on load and all arithmetic is
            float32 (half the memory traffic; see :func:`hessfast.lanczos`'s ``basis_dtype``).
        k: number of basis rows to project against, 0 <= k <= Q.shape[0].
        W: (b, P) block (or a single (P,) vector) of Q's dtype (float32 for a bfloat16 Q) and
            device. It may be overwritten: do not reuse it after the call.
        backend: "auto", "torch", "cpu", "cuda" or "triton" (see :func:`resolve_backend`).

    Returns:
        (W2, coeffs, norms): W2 (b, P) the projected block (possibly W's storage), coeffs (b, k)
        = h1 + h2 (for single-vector Lanczos coeffs[0, k-1] is alpha), norms (b,) the row norms
        of W2 (beta). For a 1-D W: W2 (P,), coeffs (k,), norms ().

    Example:
        >>> Q = torch.eye(3, 5, dtype=torch.float64)
        >>> W2, c, n = reorthogonalize(Q, 2, torch.arange(5.0, dtype=torch.float64)[None], backend="torch")
        >>> W2.tolist(), c.tolist(), n.tolist()
        ([[0.0, 0.0, 2.0, 3.0, 4.0]], [[0.0, 1.0]], [5.385164807134504])
    """
    fn = "hessfast.kernels.reorthogonalize"
    check_tensor(fn, "Q", Q, 2, "(m+1, P)", dtypes=BASIS_DTYPES)
    vector = isinstance(W, torch.Tensor) and W.dim() == 1
    if vector:
        W = W.reshape(1, -1)
    P = Q.shape[1]
    check_tensor(fn, "W", W, 2, f"(b, {P}) or ({P},)", dtype=block_dtype(Q.dtype), device=Q.device)
    if W.shape[1] != P:
        raise ValueError(f"{fn}: W must have shape (b, {P}) to match Q (m+1, {P}), got {tuple(W.shape)}")
    if not 0 <= int(k) <= Q.shape[0]:
        raise ValueError(f"{fn}: k={k} must lie in [0, Q.shape[0]={Q.shape[0]}]")
    k = int(k)
    name = resolve_backend(backend, W)
    Q, W = Q.detach(), W.detach()
    if name != "torch":
        if Q.stride(1) != 1 and P > 1:
            raise ValueError(f"{fn}: backend {name!r} needs Q with unit column stride (rows of a contiguous "
                             f"buffer), got strides {Q.stride()}; pass Q.contiguous() or backend='torch'")
        W = W.contiguous()
    b = W.shape[0]
    coeffs = torch.empty(b, k, dtype=W.dtype, device=W.device)
    norms = torch.empty(b, dtype=W.dtype, device=W.device)
    if b > 0:  # an empty block has nothing to project (and a zero-size CUDA launch is an error)
        CGS2_IMPLS[name](Q, k, W, coeffs, norms)
    if vector:
        return W.reshape(-1), coeffs.reshape(-1), norms.reshape(())
    return W, coeffs, norms
