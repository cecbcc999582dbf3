"""Stochastic trace estimators of a curvature operator: Hutchinson, Hutch++ and XTrace.

All three use Rademacher test vectors omega (E[omega omega^T] = I) and only products with A:

* Hutchinson (1989): tr(A) ~ (1/n) sum_i omega_i^T A omega_i; error O(||A||_F / sqrt(n)).
* Hutch++ (Meyer, Musco, Musco & Persson 2021, Algorithm 1): a sketch Q = orth(A S) of k = n/3 vectors
  takes the top of the spectrum exactly, tr(Q^T A Q), and Hutchinson with l = n - 2k vectors estimates
  the trace of the deflated rest (I - QQ^T) A (I - QQ^T); error O(1/n) for PSD A.
* XTrace (Epperly, Tropp & Webber 2024, "XTrace: making the most of every sample in stochastic trace
  estimation", SIMAX 45(1)): s = n/2 vectors; for each i the sketch Q_(i) of the other
  s - 1 vectors deflates A and omega_i, which is independent of Q_(i), estimates the rest:

      t_i = tr(Q_(i)^T A Q_(i)) + omega_i^T (I - Q_(i)Q_(i)^T) A (I - Q_(i)Q_(i)^T) omega_i,

  all from one QR of Y = A Omega (the leave-one-out bases differ from Q by one direction).
  Each t_i is unbiased, the estimate is their mean and the error estimate is std(t_i) / sqrt(s)
  (as in the paper).

Costs in products with A: Hutchinson n, Hutch++ 2k + l = n, XTrace 2s = n (n rounded down to even).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch

from ..utils.serialization import JSONFile, jsonable
from ._linear import as_operator, block_rows, check_count, estimate_meta, exact_diagonal, generator, matmat, rademacher

METHODS = ("hutchinson", "hutch++", "xtrace")
MINIMUM = {"hutchinson": 2, "hutch++": 4, "xtrace": 4}


FORMAT = "hessfast.TraceEstimate/1"

@dataclass
class TraceEstimate(JSONFile):
    """An estimate of tr(A) with its standard error.

    Attributes:
        estimate: the trace estimate (float).
        stderr: its standard error: the sample standard deviation of the averaged terms over
            sqrt(their number) (Hutchinson; Hutch++'s deflated part, conditional on the sketch;
            XTrace's leave-one-out estimates). 0 for ``method="exact"``.
        num_matvecs: products with A actually used.
        method: ``"hutchinson"``, ``"hutch++"``, ``"xtrace"``, or ``"exact"`` when num_matvecs >= P
            (then P products with the unit vectors give the trace exactly, for no more products).
        seed: the seed of the Rademacher test vectors.
        samples: (n,) float64, the averaged terms: omega_i^T A omega_i (Hutchinson), the deflated
            omega_i^T (I - QQ^T) A (I - QQ^T) omega_i (Hutch++; the estimate adds tr(Q^T A Q)), or the
            leave-one-out estimates t_i (XTrace).
        meta: P, N, curvature, dtype, sketch sizes, elapsed seconds.
    """

    estimate: float
    stderr: float
    num_matvecs: int
    method: str
    seed: int
    samples: np.ndarray = field(repr=False)
    meta: dict = field(default_factory=dict, repr=False)

    def interval(self, level: float = 0.95) -> tuple:
        """Confidence interval ``estimate -+ t * stderr`` at ``level``, with t the Student-t quantile for
        len(samples) - 1 degrees of freedom (the averaged terms are few; for XTrace it is approximate)."""
        if not 0 < level < 1:
            raise ValueError(f"level must be in (0, 1), got {level}.")
        if self.method == "exact":
            return (self.estimate, self.estimate)
        from scipy.stats import t as student_t

        q = float(student_t.ppf(0.5 + level / 2, df=len(self.samples) - 1))
        return (self.estimate - q * self.stderr, self.estimate + q * self.stderr)

    def __str__(self) -> str:
        return (f"trace = {self.estimate:.6g} +- {self.stderr:.2g} (1 s.e.; {self.method}, "
                f"{self.num_matvecs} products, seed {self.seed})")

    def to_dict(self) -> dict:
        return jsonable({"format": FORMAT, "estimate": self.estimate, "stderr": self.stderr,
                         "num_matvecs": self.num_matvecs, "method": self.method, "seed": self.seed,
                         "samples": self.samples, "meta": self.meta})

    @classmethod
    def from_dict(cls, d: dict) -> "TraceEstimate":
        if d.get("format") != FORMAT:
            raise ValueError(f"not a saved hessfast.TraceEstimate (format {d.get('format')!r}, expected {FORMAT!r}).")
        return cls(float(d["estimate"]), float(d["stderr"]), int(d["num_matvecs"]), d["method"], int(d["seed"]),
                   np.asarray(d["samples"], dtype=np.float64), d.get("meta", {}))

    def plot(self, path=None, ax=None):
        """Histogram of the averaged terms with the estimate and +-2 standard errors; saved to ``path`` (PNG)."""
        from ..utils.plotting import figure_axes

        with figure_axes(ax, path) as ax:
            if len(self.samples):
                ax.hist(self.samples, bins=max(5, len(self.samples) // 3), alpha=0.7, label="averaged terms")
            ax.axvline(self.estimate, color="C3", label=f"estimate {self.estimate:.4g} (+-2 s.e. dashed)")
            ax.vlines([self.estimate - 2 * self.stderr, self.estimate + 2 * self.stderr], 0, 1,
                      transform=ax.get_xaxis_transform(), colors="C3", linestyles="--", lw=0.8)
            ax.set(xlabel="trace", title=f"{self.method}: {self.num_matvecs} products")
            ax.legend(fontsize=8)
        return ax


def trace(model_or_operator: Any, data: Any = None, num_matvecs: int = 99, method: str = "hutch++", seed: int = 0,
          curvature: Optional[str] = None, loss_fn: Optional[Callable] = None, max_block: Optional[int] = None,
          **operator_kwargs) -> TraceEstimate:
    """Estimate the trace of the Hessian or GGN (or of any symmetric linear operator).

    Args:
        model_or_operator: an ``nn.Module`` (with ``data``), a :class:`hessfast.CurvatureOperator`, or
            any object of the linear operator protocol (``matmat``, ``P``, ``dtype``, ``device``;
            see docs/estimators.md).
        data: one ``(inputs, targets)`` batch or an iterable of batches (mean loss over all N samples).
        num_matvecs: budget of products with the operator. With num_matvecs >= P the trace is
            computed exactly from P products with the unit vectors.
        method: ``"hutch++"`` (default), ``"xtrace"`` or ``"hutchinson"``; see the module docstring.
        seed: seeds the Rademacher test vectors, drawn on the CPU (the same on every device).
        curvature: ``"hessian"`` (default) or ``"ggn"`` when building the operator.
        loss_fn: ``loss_fn(outputs, targets)`` when building the operator; default cross-entropy.
        max_block: vectors per ``matmat`` call at most (default 32; fewer when memory is short).
        **operator_kwargs: passed to :class:`hessfast.CurvatureOperator` (``bn_mode``, ``dtype``, ...).

    Returns:
        :class:`TraceEstimate`. For the curvature of the mean loss, tr(H) = sum of its eigenvalues.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}.")
    num_matvecs = check_count(num_matvecs, MINIMUM[method], method, "trace")
    gen = generator(seed)
    start = time.perf_counter()
    op = as_operator(model_or_operator, data, curvature=curvature, loss_fn=loss_fn,
                     operator_kwargs=operator_kwargs, caller="trace")
    block = block_rows(op, max_block)
    if num_matvecs >= op.P:
        diag = exact_diagonal(op, block, "trace")
        est, err, samples, used, sizes, method = float(diag.sum()), 0.0, np.zeros(0), op.P, {}, "exact"
    else:
        est, err, samples, used, sizes = ESTIMATORS[method](op, num_matvecs, gen, block)
    meta = {**estimate_meta(op, block, start), **sizes}
    return TraceEstimate(est, err, used, method, int(seed), samples, meta)


def hutchinson(op, n: int, gen: torch.Generator, block: int) -> tuple:
    """(estimate, stderr, samples (n,), products, sizes) of Hutchinson's estimator with n Rademacher vectors."""
    samples = []
    for start in range(0, n, block):
        b = min(block, n - start)
        Om = rademacher(gen, b, op.P, op.dtype, op.device)
        AOm = matmat(op, Om, block, "trace (hutchinson)")
        samples.append((Om.double() * AOm.double()).sum(1).cpu())
    s = torch.cat(samples).numpy()
    return float(s.mean()), float(s.std(ddof=1) / math.sqrt(n)), s, n, {}


def orthonormal_rows(Y: torch.Tensor) -> tuple:
    """Q (s, P) with orthonormal rows spanning those of Y (s, P), and R (s, s) with Y^T = Q^T R."""
    Q, R = torch.linalg.qr(Y.T)
    return Q.T.contiguous(), R


def hutchpp(op, n: int, gen: torch.Generator, block: int) -> tuple:
    """Hutch++ (Meyer et al. 2021, Algorithm 1) with k = n // 3 sketch vectors and l = n - 2k residual vectors."""
    k = n // 3
    l = n - 2 * k
    S = rademacher(gen, k, op.P, op.dtype, op.device)
    G = rademacher(gen, l, op.P, op.dtype, op.device)
    Q, _ = orthonormal_rows(matmat(op, S, block, "trace (hutch++ sketch)"))
    del S
    low_rank = float((Q.double() * matmat(op, Q, block, "trace (hutch++)").double()).sum())
    U = G - (G @ Q.T) @ Q                                       # (I - QQ^T) g_j, one per row
    s = (U.double() * matmat(op, U, block, "trace (hutch++ residual)").double()).sum(1).cpu().numpy()
    est = low_rank + float(s.mean())
    return est, float(s.std(ddof=1) / math.sqrt(l)), s, 2 * k + l, {"sketch": k, "residual_vectors": l,
                                                                    "low_rank_part": low_rank}


def leave_one_out_normals(R: torch.Tensor) -> torch.Tensor:
    """Unit columns s_i (s, s) float64 with s_i orthogonal to every column of R (s, s) but the i-th.

    With Y = Q R, the span of Y without column i is that of Q without the direction Q s_i, so the
    leave-one-out basis satisfies Q_(i) Q_(i)^T = Q Q^T - (Q s_i)(Q s_i)^T (Epperly et al. 2024).
    s_i is the normalised i-th column of R^{-T} (a backward-stable triangular solve keeps it orthogonal
    to the other columns to rounding, however ill-conditioned R is); where R is exactly singular
    the null vector of the other columns comes from an SVD instead.
    """
    R = R.double().cpu()
    s = R.shape[0]
    X = torch.linalg.solve_triangular(R.T, torch.eye(s, dtype=torch.float64), upper=False)
    norms = X.norm(dim=0)
    S = X / norms
    for i in torch.nonzero(~torch.isfinite(norms) | (norms == 0)).flatten().tolist():
        others = torch.cat([R[:, :i], R[:, i + 1:]], dim=1)
        S[:, i] = torch.linalg.svd(others, full_matrices=True)[0][:, -1]
    return S


def xtrace_terms(R, H, W, T, om_y) -> torch.Tensor:
    """XTrace's leave-one-out estimates t_i (s,) from s x s float64 quantities of one sketch.

    R: Y^T = Q^T R; H = Q A Q^T; W = Q Omega^T; T = (A Q^T)^T Omega^T; om_y_i = omega_i . A omega_i
    (rows of Q orthonormal, Omega (s, P) the test vectors). Written for a general A as in the paper;
    for symmetric A, T = R.
    """
    S = leave_one_out_normals(R)
    col = lambda a, b: (a * b).sum(0)  # noqa: E731 -- column-wise inner products
    HW = H @ W
    sw, shs = col(S, W), col(S, H @ S)
    return (torch.trace(H) - shs + om_y - col(W, R) - col(T, W) + col(W, HW)
            + sw * col(S, R - HW) + sw ** 2 * shs + col(T - H.T @ W, S) * sw)


def xtrace(op, n: int, gen: torch.Generator, block: int) -> tuple:
    """XTrace (Epperly, Tropp & Webber 2024) with s = n // 2 Rademacher test vectors, 2s products."""
    s = n // 2
    Om = rademacher(gen, s, op.P, op.dtype, op.device)
    Y = matmat(op, Om, block, "trace (xtrace sketch)")
    Q, R = orthonormal_rows(Y)
    Z = matmat(op, Q, block, "trace (xtrace)")
    d = lambda a: a.double().cpu()  # noqa: E731 -- the s x s algebra runs in float64 on the CPU
    H, W, T = d(Q @ Z.T), d(Q @ Om.T), d(Z @ Om.T)
    om_y = (Om.double() * Y.double()).sum(1).cpu()
    t = xtrace_terms(d(R), H, W, T, om_y).numpy()
    return float(t.mean()), float(t.std(ddof=1) / math.sqrt(s)), t, 2 * s, {"test_vectors": s}


ESTIMATORS = {"hutchinson": hutchinson, "hutch++": hutchpp, "xtrace": xtrace}
