"""Stochastic Lanczos quadrature of curvature operators (Section 7.2, 8 and Appendix D of the paper).

m Lanczos steps from a unit probe q_0 build an orthonormal basis Q = [q_0 .. q_{m-1}] (m x P rows)
and a symmetric tridiagonal T_m = Q A Q^T with diagonal alpha (m,) and off-diagonal beta (m-1,).
With full reorthogonalisation every new vector is projected out of the stored basis by classical
Gram-Schmidt applied twice ("twice is enough"); alpha_j is the projection coefficient on q_j and
beta_j the norm of what is left. The eigenvalues of T_m (Ritz values) and the squared first
components of its eigenvectors (Gauss-quadrature weights, Theorem 13) form the :class:`Spectrum`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import scipy.linalg
import torch

from ..kernels import reorthogonalize
from ..utils.memory import available_memory

REORTH = ("full", "none")


class NonFiniteError(FloatingPointError, ValueError):
    """A curvature-vector product returned NaN or Inf."""


class BasisMemoryError(MemoryError, ValueError):
    """The Lanczos basis does not fit in the memory available on its device."""


@dataclass
class LanczosResult:
    """One Lanczos run: ``alpha`` (k,), ``beta`` (k-1,) float64, optional ``basis`` (k, P), k <= m."""

    alpha: np.ndarray
    beta: np.ndarray
    basis: Optional[torch.Tensor]
    breakdown: bool

    @property
    def steps(self) -> int:
        return len(self.alpha)

    def ritz(self) -> tuple:
        """Ritz values (k,) ascending and quadrature weights (k,) summing to 1."""
        if self.steps == 1:
            return self.alpha.copy(), np.ones(1)
        theta, S = scipy.linalg.eigh_tridiagonal(self.alpha, self.beta)
        return theta, S[0] ** 2


class TridiagonalRecorder:
    """The bookkeeping every Lanczos loop shares: alpha/beta, the NaN check and the breakdown test.

    Call :meth:`step` with alpha_j and beta_j = ||w_j|| after each projection; it returns True when
    the loop goes on with q_{j+1} = w_j / beta_j, False after the last step or on breakdown
    (beta_j <= breakdown_tol, default 100 eps ||T||: the Krylov space is invariant).
    """

    def __init__(self, m: int, dtype: torch.dtype, breakdown_tol: Optional[float] = None,
                 step_callback: Optional[Callable] = None, where: str = ""):
        self.m, self.eps, self.tol = m, torch.finfo(dtype).eps, breakdown_tol
        self.step_callback, self.where = step_callback, where
        self.alpha, self.beta, self.anorm, self.breakdown = [], [], 0.0, False

    def step(self, j: int, a: float, b: float) -> bool:
        if not (np.isfinite(a) and np.isfinite(b)):
            raise NonFiniteError(f"a curvature-vector product returned NaN or Inf at Lanczos step {j}{self.where}. "
                                 "Check the loss at these weights (and the data for NaN), or use dtype=torch.float64.")
        self.alpha.append(a)
        self.anorm = max(self.anorm, abs(a) + b + (self.beta[-1] if self.beta else 0.0))
        if self.step_callback is not None:
            self.step_callback()
        if j == self.m - 1:
            return False
        tol = self.tol if self.tol is not None else 100 * self.eps * max(self.anorm, 1e-300)
        if b <= tol:
            self.breakdown = True
            return False
        self.beta.append(b)
        return True

    def result(self, basis: Optional[torch.Tensor] = None) -> LanczosResult:
        k = len(self.alpha)
        return LanczosResult(np.array(self.alpha), np.array(self.beta[: k - 1]),
                             None if basis is None else basis[:k], self.breakdown)


def check_basis_memory(m: int, P: int, dtype: torch.dtype, device: torch.device, block_size: int = 1) -> int:
    """Bytes of the (m + 1) x P basis (block Lanczos: (ceil(m/b) + 1) blocks of b rows); raise
    :class:`BasisMemoryError` if it cannot fit."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    rows = m + 1 if block_size == 1 else (-(-m // block_size) + 1) * block_size
    need = rows * P * itemsize
    free = available_memory(device)
    if need > 0.9 * free:
        gib = 2.0 ** 30
        raise BasisMemoryError(
            f"the Lanczos basis needs {need / gib:.2f} GiB ((m+1) x P = {m + 1} x {P:,} {dtype}) but only "
            f"{free / gib:.2f} GiB is free on {device}. Reduce m, use dtype=torch.float32 (and "
            f"basis_dtype=torch.bfloat16 to halve it again), or pass reorth='none' "
            f"(keeps 3 vectors; ghost eigenvalues appear); or keep the basis in host memory (basis_device='cpu') "
            f"or shard it over processes (torchrun; shard_basis=True), see hessfast.distributed.plan_basis."
        )
    return need


def check_basis_dtype(basis_dtype: Optional[torch.dtype], dtype: torch.dtype, reorth: str = "full") -> torch.dtype:
    """The dtype of the stored Lanczos basis: ``dtype`` itself, or bfloat16 with float32 compute."""
    if basis_dtype is None or basis_dtype == dtype:
        return dtype
    if basis_dtype != torch.bfloat16:
        raise ValueError(f"basis_dtype={basis_dtype} is not supported: use None (the compute dtype {dtype}) or "
                         "torch.bfloat16 (with float32 compute).")
    if dtype != torch.float32:
        raise ValueError(f"basis_dtype=torch.bfloat16 needs float32 compute, but the operator computes in {dtype}; "
                         "pass dtype=torch.float32 or drop basis_dtype.")
    if reorth != "full":
        raise ValueError("basis_dtype applies to the stored basis of reorth='full'; reorth='none' keeps only "
                         "two vectors, so drop basis_dtype.")
    return basis_dtype


def lanczos_decomposition(matvec: Callable[[torch.Tensor], torch.Tensor], q0: torch.Tensor, m: int, *,
                          reorth: str = "full", backend: str = "auto", keep_basis: bool = False,
                          breakdown_tol: Optional[float] = None, step_callback: Optional[Callable] = None,
                          where: str = "", basis_dtype: Optional[torch.dtype] = None) -> LanczosResult:
    """Run m Lanczos steps of the symmetric operator ``matvec`` from ``q0`` (P,), normalised here.

    Stops early, with ``breakdown=True``, when beta_j <= breakdown_tol (default 100 eps ||T||): the
    Krylov space is invariant and the Ritz values found are exact eigenvalues.

    ``basis_dtype=torch.bfloat16`` (float32 ``q0`` only) stores the (m+1) x P basis in bfloat16:
    each new Lanczos vector is rounded once when stored, and that stored vector is the one the
    operator multiplies next, so the recurrence and the reorthogonalisation see the same basis.
    """
    if reorth not in REORTH:
        raise ValueError(f"unknown reorth {reorth!r}; choose 'full' (default) or 'none' (3 vectors of memory, "
                         "ghost eigenvalues appear).")
    P = q0.shape[0]
    full = reorth == "full"
    qdtype = check_basis_dtype(basis_dtype, q0.dtype, reorth)
    Q = torch.empty((m + 1 if full else 2, P), dtype=qdtype, device=q0.device)
    Q[0] = q0 / torch.linalg.vector_norm(q0)
    rec = TridiagonalRecorder(m, q0.dtype, breakdown_tol, step_callback, where)
    for j in range(m):
        q = Q[j] if full else Q[j % 2]
        w = matvec(q if qdtype == q0.dtype else q.to(q0.dtype))
        if full:
            w, coeffs, norms = reorthogonalize(Q, j + 1, w.reshape(1, P), backend=backend)
            a, b = float(coeffs[0, j]), float(norms[0])
            w = w.reshape(P)
        else:
            if j > 0:
                w = w.sub_(Q[(j - 1) % 2], alpha=rec.beta[-1])
            a = float(torch.dot(q, w))
            w = w.sub_(q, alpha=a)
            b = float(torch.linalg.vector_norm(w))
        if not rec.step(j, a, b):
            break
        Q[j + 1 if full else (j + 1) % 2] = w.div_(b)
    return rec.result(Q if (full and keep_basis) else None)


def probe_vectors(num_probes: int, P: int, seed: Optional[int], dtype: torch.dtype, device: torch.device):
    """Gaussian probes (num_probes, P), drawn on the CPU in float64 so a seed gives the same probes everywhere."""
    gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
    return torch.randn(num_probes, P, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
