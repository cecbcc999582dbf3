"""Probes in lockstep: k independent single-vector Lanczos recurrences advanced side by side.

Stochastic Lanczos quadrature (Theorem 13 of the paper) averages k independent runs, one per probe.
:class:`Lockstep` runs them together: at step j the k current vectors form one (k, P) block X,
multiplied by one batched product ``matmat(X)`` (a shared forward pass, or one compiled vmapped
product), and then each probe's product is reorthogonalised against *its own* basis (k CGS2 calls
of the fused kernel, :func:`hessfast.kernels.reorthogonalize`, each against one probe's rows).
This is not block Lanczos: every probe keeps its own tridiagonal T_i = Q_i A Q_i^T and its own
rows Q_i, so the estimator is exactly that of k sequential runs; only the order of the work
changes. Each probe follows the single-vector rule of :class:`~.recurrence.Lanczos` (alpha, beta,
||T|| estimate, breakdown when beta_j <= 100 eps ||T||), so a run equals the sequential one to the
rounding of the batched product (bit for bit when ``matmat`` computes each row as ``matvec`` would).

A probe that breaks down (its Krylov space is invariant) leaves the block; the others go on with a
smaller one. The k steps' coefficients and norms are read back together: one host synchronisation
per step for all probes, and its NaN / Inf check names the step and the probe.

Memory: k (m + 1) x P rows (the k bases), planned by :func:`lockstep_fits` before allocating.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..kernels import reorthogonalize, resolve_backend
from ..utils.memory import plan_basis
from .result import LanczosResult, NonFiniteError, empty_blocks


def lockstep_fits(k: int, m: int, P: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the k bases of (m + 1) x P rows fit on ``device`` (the planner's fill rule)."""
    return plan_basis(k * (m + 1) - 1, P, dtype, device).fits


class Lockstep:
    """k single-vector Lanczos runs with one batched product per step.

    Args:
        matmat: X (a, P) -> A X (a, P), for the a <= k probes still running (e.g. ``op.matmat``).
        k: number of probes. m: steps per probe (at most P). P: vector length.
        dtype, device: compute dtype and device; ``storage_dtype`` of the stored rows (bfloat16 with
            float32 compute halves the memory; default ``dtype``).
        backend: kernel backend of the reorthogonalisation (resolved once, :attr:`backend`).
        breakdown_tol: absolute breakdown threshold (default 100 eps ||T_i||, per probe).
        step_callback: called with the number of probes advanced after every step.
        labels: appended to error messages per probe (default " of probe i").
        fixed_block: keep multiplying all k rows after a probe has stopped (its row zero, its product
            unused), so that every product has the same shape: a compiled product is then never
            compiled again for a smaller block. Default False: stopped probes leave the block.
    """

    def __init__(self, matmat: Callable[[torch.Tensor], torch.Tensor], k: int, m: int, P: int, dtype: torch.dtype,
                 device: torch.device, *, storage_dtype: Optional[torch.dtype] = None, backend: str = "auto",
                 breakdown_tol: Optional[float] = None, step_callback: Optional[Callable[[int], None]] = None,
                 labels: Optional[Sequence[str]] = None, fixed_block: bool = False):
        self.matmat, self.k, self.m, self.P = matmat, int(k), int(m), int(P)
        self.dtype, self.device = dtype, torch.device(device)
        self.storage_dtype = storage_dtype or dtype
        self.backend = resolve_backend(backend, torch.empty(0, dtype=dtype, device=self.device))
        self.tol_abs, self.step_callback = breakdown_tol, step_callback
        self.labels = list(labels) if labels is not None else [f" of probe {i}" for i in range(self.k)]
        self.eps = torch.finfo(dtype).eps
        self.fixed_block = bool(fixed_block)
        # the k bases, probe-major: Q[i] is probe i's (m + 1, P) basis with unit column stride (the kernels' layout)
        self.Q = torch.empty((self.k, self.m + 1, self.P), dtype=self.storage_dtype, device=self.device)

    def _read(self, active: list, j: int, X: torch.Tensor) -> tuple:
        """The current rows of the running probes, gathered into the preallocated block ``X``, and the
        row of X that holds each running probe."""
        if len(active) == self.k:
            X.copy_(self.Q[:, j])
            return X, list(range(self.k))
        if self.fixed_block:
            X.zero_()
            X[active] = self.Q[active, j].to(self.dtype)
            return X, list(active)
        X = X[: len(active)]
        torch.index_select(self.Q[:, j], 0, torch.tensor(active, device=self.device), out=X)
        return X, list(range(len(active)))

    def _product(self, X: torch.Tensor) -> torch.Tensor:
        W = self.matmat(X)
        if not isinstance(W, torch.Tensor) or tuple(W.shape) != tuple(X.shape):
            shape = tuple(W.shape) if isinstance(W, torch.Tensor) else type(W).__name__
            raise ValueError(f"matmat(X) must be a {tuple(X.shape)} tensor, got {shape}")
        if W.dtype != self.dtype or W.device != self.device:
            raise ValueError(f"matmat(X) must be {self.dtype} on {self.device}, got {W.dtype} on {W.device}")
        W = W.detach()
        if W.untyped_storage().data_ptr() == X.untyped_storage().data_ptr():
            W = W.clone()  # a product that returned its input must not be overwritten with the next block
        return W if W.is_contiguous() else W.contiguous()

    def run(self, V0: torch.Tensor) -> list:
        """Run from the probes V0 (k, P); one :class:`LanczosResult` per probe (b = 1), in order."""
        k, m = self.k, self.m
        V0 = V0.detach().to(device=self.device, dtype=self.dtype)
        if tuple(V0.shape) != (k, self.P):
            raise ValueError(f"the probes must have shape ({k}, {self.P}), got {tuple(V0.shape)}")
        norms = torch.linalg.vector_norm(V0, dim=1)
        self.Q[:, 0].copy_(V0 / norms[:, None])
        starts = norms.double().cpu().numpy()
        norms2 = (torch.linalg.vector_norm(V0.double(), dim=1) ** 2).cpu().numpy()
        alpha, beta = [[] for _ in range(k)], [[] for _ in range(k)]
        anorm, prev, broke = [0.0] * k, [0.0] * k, [False] * k
        active = list(range(k))
        X = torch.empty((k, self.P), dtype=self.dtype, device=self.device)
        read = torch.empty(2 * k, dtype=self.dtype, device=self.device)
        for j in range(m):
            block, rows = self._read(active, j, X)
            W = self._product(block)
            for r, (i, w_row) in enumerate(zip(active, rows)):
                w, coeffs, nrm = reorthogonalize(self.Q[i], j + 1, W[w_row:w_row + 1], backend=self.backend)
                if w.data_ptr() != W[w_row:w_row + 1].data_ptr():
                    W[w_row:w_row + 1].copy_(w)
                read[2 * r] = coeffs[0, j]
                read[2 * r + 1] = nrm[0]
            vals = read[: 2 * len(active)].tolist()   # the step's one host synchronisation, for all probes
            self._check(vals, active, j)
            running = []
            for r, (i, w_row) in enumerate(zip(active, rows)):
                a, bn = vals[2 * r], vals[2 * r + 1]
                alpha[i].append(a)
                anorm[i] = max(anorm[i], abs(a) + prev[i] + bn)
                if j == m - 1:
                    continue
                tol = self.tol_abs if self.tol_abs is not None else 100 * self.eps * max(anorm[i], 1e-300)
                if not bn > tol:
                    broke[i] = True
                    continue
                if self.storage_dtype == self.dtype:   # q = w / beta written in one pass
                    torch.div(W[w_row], bn, out=self.Q[i, j + 1])
                else:
                    self.Q[i, j + 1].copy_(W[w_row].div_(bn))
                beta[i].append(bn)
                prev[i] = bn
                running.append(i)
            if self.step_callback is not None:
                self.step_callback(len(active))
            active = running
            if not active:
                break
        return [LanczosResult(np.array(alpha[i]).reshape(-1, 1, 1) if alpha[i] else empty_blocks(1),
                              np.array(beta[i]).reshape(-1, 1, 1) if beta[i] else empty_blocks(1),
                              None, broke[i], 0, np.array([[starts[i]]]), norms2[i:i + 1], None, None)
                for i in range(k)]

    def _check(self, vals: list, active: list, j: int) -> None:
        if all(map(math.isfinite, vals)):
            return
        bad = next(i for r, i in enumerate(active) if not all(map(math.isfinite, vals[2 * r:2 * r + 2])))
        raise NonFiniteError(
            f"a curvature-vector product returned NaN or Inf at Lanczos step {j}{self.labels[bad]}. "
            "Check the loss at these weights (and the data for NaN), or use dtype=torch.float64.")


def use_lockstep(lockstep: Optional[bool], *, num_probes: int, block_size: int, placement: str, distributed: bool,
                 fits: bool, shared_products: bool) -> bool:
    """Whether :func:`hessfast.lanczos` runs its probes in lockstep: ``lockstep`` itself, or for None the rule

    num_probes > 1, single-vector runs (block_size 1), one process, the basis on the compute device
    (``reorth="full"``, placement ``"device"``), the k bases fit there (:func:`lockstep_fits`), and
    the operator's ``matmat`` shares work between its vectors (``shared_products``, the operator's
    ``shares_products``: forward mode, compiled or not, whose vmapped products share the primal
    pass, and a cached graph with a batched backward, the default on CUDA; not a cached graph whose
    ``matmat`` runs the products one by one, as on the CPU, nor finite differences).

    Measured on the digits MLP on CPU (bench/bench_lanczos.py, bench/RESULTS.md): 8 forward-mode
    products at once cost 2.7x one, not 8x, so lockstep pays there; through a cached graph the
    products cost the same either way and the k bases (8 x 10 MB) no longer stay in cache, which
    made the reorthogonalisation slower than probe after probe, so the rule keeps those sequential.
    ``lockstep=True`` where a structural condition fails is a ValueError naming it.
    """
    reasons = [(num_probes > 1, "num_probes > 1"), (block_size == 1, "block_size=1 (block Lanczos couples its probes)"),
               (not distributed, "a single process"),
               (placement == "device", f"the basis on the compute device (this run's is {placement!r})"),
               (fits, "memory for num_probes bases of (m + 1) x P rows")]
    failed = [why for ok, why in reasons if not ok]
    if lockstep is None:
        return not failed and shared_products
    if lockstep and failed:
        raise ValueError(f"lockstep=True needs {failed[0]}; pass lockstep=None (automatic) or False.")
    return bool(lockstep)
