"""Single-vector Lanczos on a ``matvec`` closure (Section 7.2, 8 and Appendix D of the paper).

m Lanczos steps from a unit probe q_0 build an orthonormal basis Q = [q_0 .. q_{m-1}] (m x P rows)
and a symmetric tridiagonal T_m = Q A Q^T with diagonal alpha (m,) and off-diagonal beta (m-1,).
With full reorthogonalisation every new vector is projected out of the stored basis by classical
Gram-Schmidt applied twice ("twice is enough"); alpha_j is the projection coefficient on q_j and
beta_j the norm of what is left. The eigenvalues of T_m (Ritz values) and the squared first
components of its eigenvectors (Gauss-quadrature weights, Theorem 13) form the :class:`Spectrum`.

:func:`lanczos_decomposition` is the b = 1 case of the engine's one recurrence
(:class:`~.recurrence.Lanczos`) on a device or three-vector basis.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..utils.memory import basis_rows, plan_basis
from .basis import DeviceBasis, ThreeVectorBasis, check_basis_dtype
from .recurrence import Lanczos
from .result import LanczosResult

REORTH = ("full", "none")


def check_reorth(reorth: str) -> str:
    """``reorth`` itself, or a ValueError naming the choices."""
    if reorth not in REORTH:
        raise ValueError(f"unknown reorth {reorth!r}; choose 'full' (default) or 'none' (3 vectors of memory, "
                         "ghost eigenvalues appear).")
    return reorth


def local_basis(reorth: str, m: int, b: int, P: int, dtype: torch.dtype, device: torch.device,
                basis_dtype: Optional[torch.dtype] = None, backend: str = "auto"):
    """The basis of a single-process run on the compute device: every row (``reorth="full"``, planned
    by :func:`hessfast.utils.memory.plan_basis` before it is allocated) or two blocks."""
    qdtype = check_basis_dtype(basis_dtype, dtype, check_reorth(reorth))
    if reorth == "none":
        return ThreeVectorBasis(b, P, dtype, device, backend=backend)
    plan_basis(m, P, qdtype, device, block_size=b).check()
    return DeviceBasis(basis_rows(m, b), b, P, dtype, device, storage_dtype=qdtype, backend=backend)


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
    ``step_callback()`` is called after every step. Returns a :class:`LanczosResult` with
    ``alpha`` (k,), ``beta`` (k-1,), ``basis`` (k, P) when ``keep_basis`` (k <= m steps).
    """
    P = q0.shape[0]
    basis = local_basis(reorth, m, 1, P, q0.dtype, q0.device, basis_dtype, backend)

    def matmat(X: torch.Tensor) -> torch.Tensor:
        w = matvec(X[0])
        if not isinstance(w, torch.Tensor) or tuple(w.shape) != (P,):
            shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
            raise ValueError(f"hessfast.lanczos_decomposition: matvec(v) must return a ({P},) tensor, got {shape}")
        return w.reshape(1, P)

    callback = None if step_callback is None else (lambda n: step_callback())
    run = Lanczos(matmat, basis, breakdown_tol=breakdown_tol, step_callback=callback, where=where, name="matvec(v)")
    run.start(q0.reshape(1, P))
    return run.run(m, keep_basis=keep_basis)


def probe_vectors(num_probes: int, P: int, seed: Optional[int], dtype: torch.dtype, device: torch.device):
    """Gaussian probes (num_probes, P), drawn on the CPU in float64 so a seed gives the same probes everywhere."""
    gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
    return torch.randn(num_probes, P, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
