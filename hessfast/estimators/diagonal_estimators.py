"""Stochastic estimators of the diagonal of a curvature operator: Hutchinson and XDiag.

* Hutchinson (Bekas, Kokiopoulou & Saad 2007, with Rademacher vectors):
  diag(A) ~ (1/n) sum_i omega_i * (A omega_i) (elementwise); coordinate j has variance
  sum_{k != j} A_jk^2 per vector, so the standard error is exact per coordinate.
* XDiag (Epperly, Tropp & Webber 2024, "XTrace: making the most of every sample in stochastic trace
  estimation", SIMAX 45(1)): s = n/2 vectors; for each i the sketch Q_(i) of the other
  s - 1 vectors gives diag(Q_(i) Q_(i)^T A) exactly and omega_i estimates the diagonal of the rest:

      d_i = diag(Q_(i) Q_(i)^T A) + omega_i * ((I - Q_(i) Q_(i)^T) A omega_i),

  unbiased because omega_i is independent of Q_(i). The estimate is the mean of the d_i; the
  standard error per coordinate is std(d_i) / sqrt(s), the analogue of XTrace's error estimate.

Costs in products with A: Hutchinson n, XDiag 2s = n (n rounded down to even).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ._linear import (as_operator, block_rows, check_count, estimate_meta, exact_diagonal, generator, matmat,
                      parameter_layout, rademacher, split_parameters)
from .trace_estimators import leave_one_out_normals, orthonormal_rows

METHODS = ("hutchinson", "xdiag")
MINIMUM = {"hutchinson": 2, "xdiag": 4}
COLUMNS = 1 << 16  # coordinates per float64 work chunk of XDiag's (s, chunk) terms


@dataclass
class DiagonalEstimate:
    """An estimate of diag(A) with a standard error per coordinate.

    Attributes:
        estimate: (P,) float64 on the CPU, flattened like the operator's vectors.
        stderr: (P,) float64: Hutchinson's per-coordinate standard error, XDiag's leave-one-out
            error estimate; zeros for ``method="exact"``.
        num_matvecs: products with A actually used.
        method: ``"hutchinson"``, ``"xdiag"``, or ``"exact"`` when num_matvecs >= P (P products
            with the unit vectors give the diagonal exactly).
        seed: the seed of the Rademacher test vectors.
        meta: P, N, curvature, dtype, elapsed seconds.
    """

    estimate: torch.Tensor
    stderr: torch.Tensor
    num_matvecs: int
    method: str
    seed: int
    meta: dict = field(default_factory=dict, repr=False)
    layout: Optional[list] = field(default=None, repr=False)

    def as_parameters(self, which: str = "estimate") -> dict:
        """{parameter name: tensor of that parameter's shape} of ``estimate`` (or ``"stderr"``)."""
        if which not in ("estimate", "stderr"):
            raise ValueError(f"which must be 'estimate' or 'stderr', got {which!r}.")
        return split_parameters(getattr(self, which), self.layout, "DiagonalEstimate.as_parameters")

    def __str__(self) -> str:
        return (f"diagonal of P = {self.estimate.numel():,}: sum {float(self.estimate.sum()):.6g}, "
                f"median s.e. {float(self.stderr.median()):.2g} ({self.method}, {self.num_matvecs} products, "
                f"seed {self.seed})")


def diagonal(model_or_operator: Any, data: Any = None, num_matvecs: int = 100, method: str = "xdiag",
             seed: int = 0, curvature: Optional[str] = None, loss_fn: Optional[Callable] = None,
             max_block: Optional[int] = None, **operator_kwargs) -> DiagonalEstimate:
    """Estimate the diagonal of the Hessian or GGN (or of any symmetric linear operator).

    Args:
        model_or_operator: an ``nn.Module`` (with ``data``), a :class:`hessfast.CurvatureOperator`, or
            any object of the linear operator protocol (docs/estimators.md).
        data: one ``(inputs, targets)`` batch or an iterable of batches.
        num_matvecs: budget of products. With num_matvecs >= P the diagonal is exact (P products).
        method: ``"xdiag"`` (default; far better when the spectrum decays) or ``"hutchinson"``.
        seed: seeds the Rademacher test vectors, drawn on the CPU (the same on every device).
        curvature: ``"hessian"`` (default) or ``"ggn"`` when building the operator.
        loss_fn: ``loss_fn(outputs, targets)`` when building the operator; default cross-entropy.
        max_block: vectors per ``matmat`` call at most (default 32; fewer when memory is short).
        **operator_kwargs: passed to :class:`hessfast.CurvatureOperator`.

    Returns:
        :class:`DiagonalEstimate`; ``as_parameters()`` splits it per parameter tensor.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}.")
    num_matvecs = check_count(num_matvecs, MINIMUM[method], method, "diagonal")
    gen = generator(seed)
    start = time.perf_counter()
    op = as_operator(model_or_operator, data, curvature=curvature, loss_fn=loss_fn,
                     operator_kwargs=operator_kwargs, caller="diagonal")
    block = block_rows(op, max_block)
    if num_matvecs >= op.P:
        est = exact_diagonal(op, block, "diagonal")
        err, used, method = torch.zeros_like(est), op.P, "exact"
    else:
        est, err, used = (hutchinson_diagonal if method == "hutchinson" else xdiag)(op, num_matvecs, gen, block)
    model = model_or_operator if isinstance(model_or_operator, torch.nn.Module) else None
    meta = estimate_meta(op, block, start)
    return DiagonalEstimate(est, err, used, method, int(seed), meta, parameter_layout(op, model))


def hutchinson_diagonal(op, n: int, gen: torch.Generator, block: int) -> tuple:
    """(estimate (P,), stderr (P,), products) of the Hutchinson diagonal with n Rademacher vectors."""
    total = torch.zeros(op.P, dtype=torch.float64, device=op.device)
    squares = torch.zeros_like(total)
    for start in range(0, n, block):
        b = min(block, n - start)
        Om = rademacher(gen, b, op.P, op.dtype, op.device)
        terms = (Om * matmat(op, Om, block, "diagonal (hutchinson)")).double()
        total += terms.sum(0)
        squares += (terms * terms).sum(0)
    mean = total / n
    var = ((squares - n * mean * mean) / (n - 1)).clamp_(min=0)
    return mean.cpu(), (var / n).sqrt_().cpu(), n


def xdiag(op, n: int, gen: torch.Generator, block: int) -> tuple:
    """XDiag (Epperly, Tropp & Webber 2024) with s = n // 2 Rademacher vectors, 2s products.

    With Y = A Omega^T = Q^T R, Z = A Q^T, T = Z^T Omega^T and the leave-one-out normals s_i:
    d_i = diag(Q^T Z) - (Q^T s_i) * (Z s_i) + omega_i * (y_i - Q^T T_i) + (s_i . T_i) omega_i * (Q^T s_i),
    evaluated in float64 over chunks of coordinates.
    """
    s = n // 2
    Om = rademacher(gen, s, op.P, op.dtype, op.device)
    Y = matmat(op, Om, block, "diagonal (xdiag sketch)")
    Q, R = orthonormal_rows(Y)
    Z = matmat(op, Q, block, "diagonal (xdiag)")
    T = (Z.double() @ Om.double().T).cpu()                       # T[k, i] = (A q_k) . omega_i
    S = leave_one_out_normals(R)
    st = (S * T).sum(0)                                          # s_i . T_i
    S_, T_, st_ = (x.to(op.device) for x in (S, T, st))
    est = torch.empty(op.P, dtype=torch.float64)
    err = torch.empty(op.P, dtype=torch.float64)
    for c in range(0, op.P, COLUMNS):
        q, z, om, y = (x[:, c:c + COLUMNS].double() for x in (Q, Z, Om, Y))
        qs, zs = S_.T @ q, S_.T @ z                              # rows Q^T s_i and Z s_i
        terms = -qs * zs + om * (y - T_.T @ q) + st_[:, None] * om * qs
        est[c:c + COLUMNS] = ((q * z).sum(0) + terms.mean(0)).cpu()
        err[c:c + COLUMNS] = (terms.std(0) / math.sqrt(s)).cpu()
    return est, err, 2 * s
