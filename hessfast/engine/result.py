"""The one result type of the Lanczos engine and its one error for a non-finite product.

A run of s block steps with blocks of b vectors (b = 1: single-vector Lanczos) builds an
orthonormal basis Q = [Q_0; ...; Q_{s-1}] (s b rows) and the block tridiagonal

    T = Q A Q^T = tridiag(B_{j-1}, A_j, B_j^T)        (s b x s b; tridiagonal with alpha, beta for b = 1)

whose eigenvalues are the Ritz values. Quadrature weights (Theorem 13 of the paper, and its block
form): with T = S diag(theta) S^T, S_1 the first b rows of S and the probes V0^T = Q_0^T R_0,

    v_i^T f(A) v_i / |v_i|^2  ~=  sum_l w_{i,l} f(theta_l),    w_{i,l} = ((R_0^T S_1)[i, l])^2 / |v_i|^2,

exact for polynomials of degree <= 2s - 1; for b = 1 this is w_l = S[0, l]^2.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import scipy.linalg
import torch


class NonFiniteError(FloatingPointError, ValueError):
    """A curvature-vector product returned NaN or Inf; the message names the Lanczos step."""


@dataclass
class LanczosResult:
    """One Lanczos run: the block tridiagonal, the probes' coordinates and what happened.

    Attributes:
        diag: (s, b, b) float64, the diagonal blocks A_j = Q_j A Q_j^T (b = 1: alpha).
        off: (s - 1, b, b) float64, the sub-diagonal blocks B_j = Q_{j+1} A Q_j^T (b = 1: beta).
        basis: the stored rows (s b, c) when kept (c = P, or this rank's slice of a sharded basis),
            else None.
        breakdown: the run stopped early because the Krylov space of the probes is invariant (its
            Ritz values are then exact eigenvalues) or the space was exhausted.
        deflated: block rows replaced by random vectors because they depended on the basis.
        start: (b, b) float64 R_0 with V0^T = Q_0^T R_0.
        norms2: (b,) float64 squared norms of the probes.
        residual: (b, b) float64 B_s, the coupling of the next block (written after the last one),
            when the run was asked for it; else None.
        coupling: (b, k) float64 coefficients of the first product on k locked rows (a restarted
            run, see :meth:`hessfast.engine.Lanczos.run`); else None.
    """

    diag: np.ndarray
    off: np.ndarray
    basis: Optional[torch.Tensor] = None
    breakdown: bool = False
    deflated: int = 0
    start: Optional[np.ndarray] = None
    norms2: Optional[np.ndarray] = None
    residual: Optional[np.ndarray] = None
    coupling: Optional[np.ndarray] = field(default=None, repr=False)

    @property
    def b(self) -> int:
        return int(self.diag.shape[1]) if self.diag.ndim == 3 else 1

    @property
    def steps(self) -> int:
        """Block steps taken (Lanczos steps for b = 1)."""
        return int(self.diag.shape[0])

    @property
    def size(self) -> int:
        """Ritz values: steps * b."""
        return self.steps * self.b

    def _single(self, what: str) -> None:
        if self.b != 1:
            raise ValueError(f"LanczosResult.{what} describes single-vector runs; this run has blocks of "
                             f"{self.b}: use .T (the block tridiagonal) or .diag / .off.")

    @property
    def alpha(self) -> np.ndarray:
        """(k,) diagonal of the tridiagonal T (single-vector runs)."""
        self._single("alpha")
        return self.diag[:, 0, 0].copy()

    @property
    def beta(self) -> np.ndarray:
        """(k - 1,) off-diagonal of the tridiagonal T (single-vector runs)."""
        self._single("beta")
        return self.off[:, 0, 0].copy()

    @property
    def T(self) -> np.ndarray:
        """The dense (s b, s b) block tridiagonal Q A Q^T, float64."""
        s, b = self.steps, self.b
        T = np.zeros((s * b, s * b))
        for j in range(s):
            T[j * b:(j + 1) * b, j * b:(j + 1) * b] = self.diag[j]
        for j in range(s - 1):
            T[(j + 1) * b:(j + 2) * b, j * b:(j + 1) * b] = self.off[j]
            T[j * b:(j + 1) * b, (j + 1) * b:(j + 2) * b] = self.off[j].T
        return T

    def ritz(self) -> tuple:
        """Ritz values (s b,) ascending and quadrature weights, one row per probe summing to 1.

        Weights are (k,) for a single-vector run (the squared first components of the
        eigenvectors of T, computed from the tridiagonal) and (b, s b) for a block.
        """
        if self.b == 1:
            alpha, beta = self.alpha, self.beta
            if self.steps == 1:
                return alpha, np.ones(1)
            theta, S = scipy.linalg.eigh_tridiagonal(alpha, beta)
            return theta, S[0] ** 2
        theta, S = np.linalg.eigh(self.T)
        Y = self.start.T @ S[: self.b]                     # (b, s b): row i = R_0^T S_1 for probe i
        return theta, Y ** 2 / self.norms2[:, None]


def empty_blocks(b: int) -> np.ndarray:
    """A (0, b, b) array: no blocks yet."""
    return np.zeros((0, b, b))
