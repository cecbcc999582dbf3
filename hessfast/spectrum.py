"""The result of stochastic Lanczos quadrature: Ritz values and Gauss-quadrature weights.

For a unit probe v and m Lanczos steps, the tridiagonal T_m = S diag(theta) S^T gives the m-point
Gauss quadrature of the spectral measure of v (Theorem 13, Appendix D):

    v^T f(H) v  ~=  sum_i w_i f(theta_i),    w_i = S[0, i]^2,

exact for polynomials f of degree <= 2m - 1. Averaging over independent probes estimates the
spectral density (1/P) sum_j delta(lambda - lambda_j).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import numpy as np

from .utils.serialization import JSONFile

FORMAT = "hessfast.Spectrum/1"


@dataclass(frozen=True)
class Degeneracy:
    """Spectral mass at the origin (Section 7.2): ``mass`` in [0, 1] and the Ritz ``value`` assigned to 0."""

    mass: float
    value: float


class SpectralEstimate(NamedTuple):
    """tr f(H) by stochastic Lanczos quadrature: the ``estimate`` and its ``stderr`` across probes.

    ``stderr`` is the sample standard deviation of the per-probe estimates over sqrt(num_probes):
    NaN with one probe. It measures the probe (Hutchinson) error only, not the quadrature error of
    m steps, which :meth:`Spectrum.logdet` and :meth:`Spectrum.effective_rank` discuss.
    """

    estimate: float
    stderr: float

    def __str__(self) -> str:
        return f"{self.estimate:.6g} +- {self.stderr:.2g}"


class Spectrum(JSONFile):
    """Ritz values and quadrature weights of ``num_probes`` Lanczos runs.

    Attributes:
        ritz_values: (num_probes, m) float64; a probe that stopped early (an invariant subspace was
            found) is padded with NaN.
        weights: (num_probes, m) float64, each row sums to 1; padding has weight 0.
        meta: dict with P, N, m, curvature, seed, bn_mode, dtype, elapsed seconds, versions, ...
    """

    def __init__(self, ritz_values, weights, meta: Optional[dict] = None):
        ritz = np.atleast_2d(np.asarray(ritz_values, dtype=np.float64))
        w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
        if ritz.shape != w.shape:
            raise ValueError(f"ritz_values {ritz.shape} and weights {w.shape} must have the same shape.")
        self.ritz_values = ritz
        self.weights = np.where(np.isnan(ritz), 0.0, w)
        self.meta = dict(meta or {})

    # ------------------------------------------------------------------ basic quantities
    @property
    def num_probes(self) -> int:
        return self.ritz_values.shape[0]

    @property
    def m(self) -> int:
        return self.ritz_values.shape[1]

    @property
    def P(self) -> Optional[int]:
        return self.meta.get("P")

    def _pairs(self):
        """Per probe: (values, weights) without padding."""
        for theta, w in zip(self.ritz_values, self.weights):
            keep = ~np.isnan(theta)
            yield theta[keep], w[keep]

    @property
    def lambda_max(self) -> float:
        """Largest Ritz value over all probes (each is a lower bound on the true lambda_max)."""
        return float(np.nanmax(self.ritz_values))

    @property
    def lambda_min(self) -> float:
        """Smallest Ritz value over all probes (an upper bound on the true lambda_min)."""
        return float(np.nanmin(self.ritz_values))

    def top(self, k: int) -> np.ndarray:
        """The k largest Ritz values of the probe that found the largest one, descending."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}.")
        best = int(np.nanargmax(np.nanmax(self.ritz_values, axis=1)))
        theta = self.ritz_values[best]
        theta = np.sort(theta[~np.isnan(theta)])[::-1]
        return theta[:k]

    def density(self, grid, sigma: Optional[float] = None) -> np.ndarray:
        """Gaussian-smoothed spectral density on ``grid`` (integrates to 1).

        ``sigma`` defaults to 1% of the spectral width.
        """
        grid = np.asarray(grid, dtype=np.float64)
        if sigma is None:
            sigma = max(0.01 * (self.lambda_max - self.lambda_min), 1e-12)
        if sigma <= 0:
            raise ValueError(f"sigma must be positive, got {sigma}.")
        out = np.zeros_like(grid)
        for theta, w in self._pairs():
            z = (grid[..., None] - theta) / sigma
            out += (w * np.exp(-0.5 * z * z)).sum(-1)
        return out / (self.num_probes * sigma * math.sqrt(2 * math.pi))

    def moments(self, k: int) -> np.ndarray:
        """Spectral moments mu_j = E_v[v^T H^j v] / v^T v for j = 0..k, shape (k + 1,).

        Exact for each probe up to j = 2m - 1 (Gauss quadrature); averaged over probes.
        """
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}.")
        mu = np.zeros(k + 1)
        for theta, w in self._pairs():
            mu += (w[:, None] * theta[:, None] ** np.arange(k + 1)).sum(0)
        return mu / self.num_probes

    def degeneracy(self, curvature: Optional[str] = None) -> Degeneracy:
        """Mass of the Ritz value(s) assigned to the origin (Section 7.2), averaged over probes.

        For the GGN (positive semi-definite): the Ritz value nearest 0 and its weight. For the
        Hessian the mass near 0 splits, so the two Ritz values nearest 0 are combined: their summed
        weight and their weight-averaged value.
        """
        curvature = curvature or self.meta.get("curvature", "hessian")
        take = 2 if curvature == "hessian" else 1
        masses, values = [], []
        for theta, w in self._pairs():
            idx = np.argsort(np.abs(theta))[:take]
            mass = w[idx].sum()
            masses.append(mass)
            values.append(float((w[idx] * theta[idx]).sum() / mass) if mass > 0 else float(theta[idx[0]]))
        return Degeneracy(float(np.mean(masses)), float(np.mean(values)))

    def bulk_edge(self, threshold: float = 1.0) -> tuple:
        """(lower, upper) edges of the continuous part of the spectrum (Section 8.1).

        Ritz values inside the bulk each stand for many eigenvalues and carry weight >> 1/P; an
        isolated outlier eigenvalue carries ~1/P. Per probe, starting from the heaviest Ritz value
        we walk outwards on each side while the weight stays >= threshold / P; the last value
        reached is the edge. The median over probes is returned.

        With one probe an outlier's weight is chi-square(1)/P, which exceeds 1/P about a third of
        the time: the paper's threshold (1.0) is noisy; ``threshold=10`` (or more probes) is robust.
        """
        if not self.P:
            raise ValueError("bulk_edge needs the parameter count P in spectrum.meta['P'].")
        lo, hi = [], []
        for theta, w in self._pairs():
            order = np.argsort(theta)
            theta, w = theta[order], w[order]
            heavy = w >= threshold / self.P
            start = int(np.argmax(w))
            i = start
            while i > 0 and heavy[i - 1]:
                i -= 1
            j = start
            while j < len(theta) - 1 and heavy[j + 1]:
                j += 1
            lo.append(theta[i])
            hi.append(theta[j])
        return float(np.median(lo)), float(np.median(hi))

    # ------------------------------------------------------------------ spectral functions (SLQ)
    def spectral_sum(self, f: Callable[[np.ndarray], np.ndarray]) -> SpectralEstimate:
        """tr f(H) = sum_j f(lambda_j) by stochastic Lanczos quadrature
        (Ubaru, Chen & Saad 2017, "Fast estimation of tr(f(A)) via stochastic Lanczos quadrature").

        Each probe v gives P * sum_l w_l f(theta_l) ~= P v^T f(H) v / v^T v, whose expectation over
        the Gaussian probes is tr f(H); the estimate is the mean over probes. The quadrature is exact
        for polynomials f of degree <= 2m - 1 and converges geometrically in m for f analytic on an
        interval around the spectrum, slowly when f has a singularity close to it (log near 0).
        The rows of a block Lanczos block share one Krylov space; they are counted as independent.

        Args:
            f: vectorised function of a float64 array of Ritz values.
        """
        if not self.P:
            raise ValueError("spectral functions need the parameter count P in spectrum.meta['P'].")
        per_probe = np.array([self.P * float(np.sum(w * f(theta))) for theta, w in self._pairs()])
        n = len(per_probe)
        err = float(per_probe.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
        return SpectralEstimate(float(per_probe.mean()), err)

    def trace(self) -> SpectralEstimate:
        """tr(H) (P times the first moment): exact quadrature for every m; with Gaussian probes the
        error is the Hutchinson error, about sqrt(2) ||H||_F / sqrt(num_probes)."""
        return self.spectral_sum(lambda t: t)

    def frobenius2(self) -> SpectralEstimate:
        """||H||_F^2 = tr(H^2) = sum_j lambda_j^2: exact quadrature for m >= 2, probe error only."""
        return self.spectral_sum(lambda t: t * t)

    def _check_pole(self, shift: float, what: str) -> None:
        low = self.lambda_min
        if not low + shift > 0:
            raise ValueError(
                f"{what}: a Ritz value {low:.4g} <= -shift = {-shift:.4g}, where log / 1/(lambda + shift) is "
                f"undefined. It needs positive semi-definite curvature (curvature='ggn') or shift > {-low:.4g}.")

    def logdet(self, shift: float) -> SpectralEstimate:
        """log det(H + shift I) = sum_j log(lambda_j + shift), by SLQ (Ubaru, Chen & Saad 2017).

        Meant for positive semi-definite curvature (the GGN); for the Hessian it needs a shift above
        -lambda_min. Raises ValueError when a Ritz value is <= -shift.

        Unreliable when:
            * few probes: the error bar (stderr) is itself noisy below about 5 probes, NaN for one;
            * m is small against sqrt(kappa), kappa = (lambda_max + shift) / (lambda_min + shift):
              log has its singularity at -shift, so the m-point quadrature error decays only like
              rho^(-2m) with rho ~ 1 + 2 / sqrt(kappa) (the Bernstein-ellipse bound Ubaru et al. use). A small shift
              against a large lambda_max needs m of a few times sqrt(kappa); the bias is not in stderr.
        """
        shift = float(shift)
        self._check_pole(shift, "logdet")
        return self.spectral_sum(lambda t: np.log(t + shift))

    def effective_rank(self, shift: Optional[float] = None) -> SpectralEstimate:
        """The effective dimensionality N_eff = sum_j lambda_j / (lambda_j + shift).

        MacKay's number of well-determined parameters (MacKay 1992, "Bayesian interpolation")
        and the effective dimensionality of Maddox, Benton & Wilson (2020, "Rethinking parameter
        counting in deep models"): eigenvalues far above ``shift`` count 1, far below count 0.
        Estimated by SLQ like :meth:`spectral_sum`. Meant for positive semi-definite curvature;
        for the Hessian negative eigenvalues count negatively, and a Ritz value <= -shift raises.

        Args:
            shift: the scale separating "large" from "small" eigenvalues (a prior precision or
                damping); default 1% of lambda_max.

        Unreliable with few probes and when shift is tiny against lambda_max (the pole of
        1/(lambda + shift) at -shift: m must grow like sqrt(lambda_max / shift), as for logdet).
        """
        shift = 0.01 * self.lambda_max if shift is None else float(shift)
        if not shift > 0:
            raise ValueError(f"effective_rank: shift must be > 0, got {shift} (default: 1% of lambda_max, which "
                             "needs lambda_max > 0).")
        self._check_pole(shift, "effective_rank")
        return self.spectral_sum(lambda t: t / (t + shift))

    # ------------------------------------------------------------------ display and I/O
    def __repr__(self) -> str:
        meta = self.meta
        deg = self.degeneracy()
        lines = [
            f"hessfast.Spectrum of the {meta.get('curvature', '?')} "
            f"({'batch' if meta.get('single_batch') else 'full data'}, bn_mode={meta.get('bn_mode', '?')}"
            f"{', dropout ' + meta['dropout'] if 'dropout' in meta else ''})",
            f"  P = {meta.get('P', '?'):,}   N = {meta.get('N', '?'):,}   m = {self.m}   probes = {self.num_probes}"
            if isinstance(meta.get("P"), int) and isinstance(meta.get("N"), int)
            else f"  P = {meta.get('P', '?')}   N = {meta.get('N', '?')}   m = {self.m}   probes = {self.num_probes}",
            f"  lambda_max = {self.lambda_max:.6g}   lambda_min = {self.lambda_min:.6g}",
            f"  degeneracy = {deg.mass:.4f} (Ritz value {deg.value:.3g} assigned to 0)",
        ]
        if meta.get("breakdown"):
            lines.append(f"  invariant subspace found: steps per probe {meta.get('steps')}")
        if "elapsed" in meta:
            lines.append(f"  time = {meta['elapsed']:.2f} s   dtype = {meta.get('dtype')}   "
                         f"hvp = {meta.get('hvp_mode')}   backend = {meta.get('backend')}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        def clean(a):
            return [[None if math.isnan(x) else x for x in row] for row in a.tolist()]

        return {"format": FORMAT, "ritz_values": clean(self.ritz_values), "weights": self.weights.tolist(),
                "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict) -> "Spectrum":
        if d.get("format") != FORMAT:
            raise ValueError(f"not a hessfast spectrum file (format {d.get('format')!r}, expected {FORMAT!r}).")
        ritz = np.array([[np.nan if x is None else x for x in row] for row in d["ritz_values"]], dtype=np.float64)
        return cls(ritz, d["weights"], d.get("meta"))


    def plot(self, path=None, ax=None, sigma: Optional[float] = None, title: Optional[str] = None):
        """Spectral density with a log-scale y axis, like the paper's figures; saved to ``path`` (PNG)."""
        from .utils.plotting import figure_axes

        with figure_axes(ax, path) as ax:
            span = self.lambda_max - self.lambda_min
            grid = np.linspace(self.lambda_min - 0.05 * span, self.lambda_max + 0.05 * span, 2000)
            dens = self.density(grid, sigma)
            ax.semilogy(grid, np.maximum(dens, 1e-12), lw=1.2, label="smoothed density")
            theta = self.ritz_values[~np.isnan(self.ritz_values)]
            w = self.weights[~np.isnan(self.ritz_values)] / self.num_probes
            ax.vlines(theta, 1e-12, np.maximum(w, 1e-12), colors="C3", lw=0.6, alpha=0.6, label="Ritz weights")
            ax.set_ylim(bottom=max(1e-8, 0.1 / (self.P or 1e8)))
            ax.set_xlabel(r"$\lambda$")
            ax.set_ylabel(r"$p(\lambda)$")
            ax.set_title(title or f"{self.meta.get('curvature', '')} spectrum, P={self.P}, m={self.m}")
            ax.legend(loc="upper right", fontsize=8)
        return ax
