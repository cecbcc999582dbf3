"""Stochastic Lanczos quadrature of curvature operators (Section 7.2, 8 and Appendix D of the paper).

m Lanczos steps from a unit probe q_0 build an orthonormal basis Q = [q_0 .. q_{m-1}] (m x P rows)
and a symmetric tridiagonal T_m = Q A Q^T with diagonal alpha (m,) and off-diagonal beta (m-1,).
With full reorthogonalisation every new vector is projected out of the stored basis by classical
Gram-Schmidt applied twice ("twice is enough"); alpha_j is the projection coefficient on q_j and
beta_j the norm of what is left. The eigenvalues of T_m (Ritz values) and the squared first
components of its eigenvectors (Gauss-quadrature weights, Theorem 13) form the :class:`Spectrum`.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import scipy.linalg
import torch
from tqdm.auto import tqdm

from . import distributed as _distributed
from ._version import __version__
from .operators import CurvatureOperator, _available_memory
from .spectrum import Spectrum

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
    free = _available_memory(device)
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
    from .kernels import reorthogonalize

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


def lanczos(model: Any, data: Any = None, m: int = 100, *, curvature: str = "hessian",
            loss_fn: Optional[Callable] = None, num_probes: int = 1, seed: Optional[int] = None,
            bn_mode: str = "eval", dtype: Optional[torch.dtype] = None, reorth: str = "full",
            block_size: int = 1, hvp_mode: str = "auto", backend: str = "auto", cache_graph: Any = "auto",
            progress: Optional[bool] = None, distributed: Any = None, shard_basis: Optional[bool] = None,
            basis_device: Any = None, basis_dtype: Optional[torch.dtype] = None) -> Spectrum:
    """Spectrum of the Hessian or GGN of ``model`` on ``data`` by stochastic Lanczos quadrature.

    Args:
        model: an ``nn.Module`` (with ``data``), or a :class:`CurvatureOperator` (then ``data`` is None).
        data: one ``(inputs, targets)`` batch (the batch Hessian, eq. 3) or an iterable of batches such
            as a ``DataLoader`` (the empirical Hessian of the mean loss over all N samples, eq. 2).
        m: Lanczos steps per probe, 1 <= m <= P (the paper uses 100).
        curvature: ``"hessian"`` or ``"ggn"``.
        loss_fn: ``loss_fn(outputs, targets)``, mean or sum reduction; default cross-entropy.
        num_probes: independent random probes; the spectrum averages them (stochastic Lanczos quadrature).
        seed: makes the probes, hence the whole result, reproducible.
        bn_mode: ``"eval"`` or ``"train"`` batch norm (Appendix E); the model is never modified.
        dtype: compute dtype, e.g. ``torch.float64``; default the model's.
        reorth: ``"full"`` (CGS2 against the stored (m+1) x P basis) or ``"none"`` (three vectors;
            loss of orthogonality makes ghost copies of converged eigenvalues appear).
        block_size: b > 1 runs block Lanczos with b starting vectors (resolves repeated eigenvalues).
        hvp_mode: ``"auto"``, ``"reverse"`` (double backward) or ``"forward"`` (forward-over-reverse).
        backend: reorthogonalisation kernels: ``"auto"``, ``"torch"``, ``"cpu"``, ``"cuda"``, ``"triton"``.
        cache_graph: keep autograd graphs between products when they fit (``"auto"``), always, never.
        progress: tqdm progress bar; default on in a terminal; only rank 0 of a process group shows it.
        distributed: ``None`` (use the torch.distributed process group when one is initialised), ``True``,
            ``False`` or a ``ProcessGroup``: ``data`` is then this rank's shard and every rank returns the
            same Spectrum of the mean over all ranks' samples (see :mod:`hessfast.distributed`).
        shard_basis: store only this rank's 1/world_size slice of every Lanczos vector (default: when
            distributed, block_size=1 and P >= 10^6 or the replicated basis would crowd the device).
        basis_device: where the (m+1) x P basis lives, e.g. ``"cpu"`` to keep it in host memory and
            stream it through the compute device in tiles (default: the operator's device).
        basis_dtype: dtype of the stored basis: None (the compute dtype) or ``torch.bfloat16`` with
            float32 compute, which halves the basis memory and the reorthogonalisation traffic.  The
            basis then stays orthonormal to 1e-3..3e-3 after 100 steps (float32: 1e-6..2e-5) and Ritz
            values move by up to 6e-4 of lambda_max (2e-4 for P >= 1e5; bench/RESULTS.md, "bfloat16
            basis"): enough for densities and outliers, not for eigenvalues closer than that.
            Works with every basis placement (shard_basis, basis_device) and with block_size > 1.

    Returns:
        :class:`Spectrum` with ``ritz_values`` and ``weights`` of shape (num_probes, m).
    """
    start = time.perf_counter()
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)):
        raise TypeError(f"m must be an integer number of Lanczos steps, got {type(m).__name__}.")
    if isinstance(num_probes, bool) or not isinstance(num_probes, (int, np.integer)) or num_probes < 1:
        raise ValueError(f"num_probes must be a positive integer, got {num_probes!r}.")
    if reorth not in REORTH:
        raise ValueError(f"unknown reorth {reorth!r}; choose 'full' or 'none'.")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}.")
    if m < 1:
        raise ValueError(f"m must be at least 1, got {m}.")
    if isinstance(model, CurvatureOperator):
        if data is not None:
            raise ValueError("pass either (model, data) or an operator alone, not an operator and data.")
        op = model
    else:
        if data is None:
            raise TypeError("lanczos(model, data, ...) needs data: an (inputs, targets) batch or a DataLoader.")
        op = CurvatureOperator(model, data, curvature=curvature, loss_fn=loss_fn, bn_mode=bn_mode, dtype=dtype,
                               hvp_mode=hvp_mode, cache_graph=cache_graph,
                               progress=bool(progress) and _distributed.is_main(distributed), distributed=distributed)
    P = op.P
    if m > P:
        raise ValueError(f"m = {m} exceeds the number of parameters P = {P}: a Krylov space has at most P "
                         f"dimensions. Use m <= {P}.")
    if op._dist is not None and not op._dist.is_main:
        progress = False
    qdtype = check_basis_dtype(basis_dtype, op.dtype, reorth)
    runner = _distributed.basis_runner(op, m, reorth=reorth, block_size=block_size, shard_basis=shard_basis,
                                       basis_device=basis_device, announce=tqdm.write if progress else None,
                                       basis_dtype=qdtype)
    if reorth == "full" and runner is None:
        check_basis_memory(m, P, qdtype, op.device, block_size)
    decompose = runner if runner is not None else functools.partial(lanczos_decomposition, op.matvec,
                                                                    basis_dtype=qdtype)

    bar = tqdm(total=num_probes * m, desc=f"hessfast: lanczos ({op.curvature})", unit="step",
               disable=None if progress is None else not progress, leave=False)
    probes = probe_vectors(num_probes, P, _distributed.common_seed(op, seed), op.dtype, op.device)
    ritz = np.full((num_probes, m), np.nan)
    weights = np.zeros((num_probes, m))
    steps, breakdown = [], []
    try:
        if block_size > 1:
            from .block_lanczos import block_lanczos_spectrum

            ritz, weights, steps, breakdown = block_lanczos_spectrum(
                op.matmat, probes, m, block_size, reorth=reorth, backend=backend, bar=bar,
                basis_dtype=None if qdtype == op.dtype else qdtype)
        else:
            for p in range(num_probes):
                res = decompose(probes[p], m, reorth=reorth, backend=backend, step_callback=bar.update,
                                where=f" of probe {p}")
                theta, w = res.ritz()
                ritz[p, : res.steps] = theta
                weights[p, : res.steps] = w
                steps.append(res.steps)
                breakdown.append(res.breakdown)
                bar.update(m - res.steps)
    finally:
        bar.close()
    meta = {
        "P": P, "N": op.N, "m": m, "num_probes": num_probes, "curvature": op.curvature, "seed": seed,
        "bn_mode": op.bn_mode, "dtype": str(op.dtype).replace("torch.", ""), "reorth": reorth,
        "basis_dtype": str(qdtype).replace("torch.", ""),
        "block_size": block_size, "hvp_mode": op.hvp_mode, "cached_graph": op.cached, "backend": backend,
        "device": str(op.device), "single_batch": op._single, "steps": list(map(int, steps)),
        "breakdown": bool(any(breakdown)), "elapsed": time.perf_counter() - start,
        "hessfast_version": __version__, "torch_version": torch.__version__,
        **_distributed.run_meta(op, runner),
    }
    return Spectrum(ritz, weights, meta)
