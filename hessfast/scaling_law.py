"""The batch-size law of the top batch curvature, fitted to measurements (Sections 4-6, 10.1 and 11).

Random-matrix theory gives two shapes for how the mean top eigenvalue of a batch curvature falls
towards the full-data one, ``lam_full``, as the effective batch ``b = B / (1 - B/N)`` grows:

* a **separated outlier** (Theorem 4, Eq. 9; Theorem 7, Eq. 16) moves up by ``P sigma2 / (b lam_1)``:
  ``lam_1(B) = lam_full + a / b`` (form ``"outlier"``);
* a **bulk edge** (Section 11; the semicircle radius ``2 sqrt(P sigma2 / b)``) moves like ``1/sqrt(b)``:
  ``lam_1(B) = lam_full + c / sqrt(b)`` (form ``"bulk"``);

and their sum (``"both"``). A fourth form, ``"flat"`` (``lam_1(B) = lam_full``), stands for "no
measurable dependence on B". All are linear in their parameters, so :func:`fit_scaling_law` fits each
by weighted least squares with the measured standard errors as weights, and returns the estimates,
their covariance, chi-square, p-value, normalised residuals and AIC per form. It chooses among the
forms whose coefficients are non-negative (a curvature that grows with B is no broadening) by the
Akaike information criterion ``AIC = chi2 + 2k`` (``k`` parameters): with Gaussian errors of known
standard deviation, chi2 is ``-2 log L`` up to a constant.

Uncertainty: the parameter covariance is ``(X^T W X)^-1`` scaled by ``max(1, chi2 / dof)``, so that
a fit whose scatter exceeds the stated standard errors (underestimated errors or a form that is only
approximately right) gets wider intervals, never narrower ones. Intervals are Gaussian: ``z`` from the
normal distribution at the requested level. They are intervals for the *mean* batch ``lam_1`` at B,
not for a single batch.

The law implies a scaling regime for the largest stable SGD rate ``~ 1 / lam_1(B)``: **linear** where
the ``a / b`` term dominates the excess, **square root** where ``c / sqrt(b)`` does, and **flat**
beyond the critical batch size ``B*`` at which the excess ``lam_1(B) - lam_full`` has fallen to
``flat_fraction * lam_full`` (default 0.1: less than 10% of the rate is left to gain by a larger batch).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
from scipy import stats

from . import theory

__all__ = ["FORMS", "FormFit", "ScalingFit", "fit_scaling_law", "verdict"]

FORMS = ("flat", "outlier", "bulk", "both")
_TERMS = {"flat": (), "outlier": ("a",), "bulk": ("c",), "both": ("a", "c")}
_SE_FLOOR = 1e-6       # relative floor on a standard error (an exact point, e.g. B = N, keeps a finite weight)
_DRAWS = 4000          # parametric draws for the critical-batch interval (fixed seed: reproducible)


def _design(b: np.ndarray, form: str) -> np.ndarray:
    """Columns ``1, 1/b, 1/sqrt(b)`` of the form, shape (len(b), k); ``b = inf`` gives 0 terms (B = N)."""
    inv = np.where(np.isinf(b), 0.0, 1.0 / np.where(np.isinf(b), 1.0, b))
    cols = [np.ones_like(b)]
    cols += [inv if t == "a" else np.sqrt(inv) for t in _TERMS[form]]
    return np.stack(cols, axis=1)


@dataclass
class FormFit:
    """Weighted least-squares fit of one form.

    Attributes:
        form: ``"flat"``, ``"outlier"``, ``"bulk"`` or ``"both"``.
        names: parameter names, ``("lam_full",)`` then ``"a"`` (1/b term) and/or ``"c"`` (1/sqrt(b) term).
        params: estimates, shape (k,); ``cov``: their covariance (scaled, see the module docstring), (k, k).
        chi2, dof, p_value: weighted residual sum of squares, ``n - k``, and ``P(chi2_dof >= chi2)``.
        aic: ``chi2 + 2k``; ``admissible``: all coefficients of the B terms are >= 0.
        residuals: ``(y - fit) / se`` at the data points (the anchor last, when there is one), shape (n,).
    """

    form: str
    names: Tuple[str, ...]
    params: np.ndarray
    cov: np.ndarray
    chi2: float
    dof: int
    p_value: float
    aic: float
    admissible: bool
    residuals: np.ndarray

    def param(self, name: str) -> float:
        """The estimate of ``name`` (0 for a term the form does not have)."""
        return float(self.params[self.names.index(name)]) if name in self.names else 0.0

    def stderr(self, name: str) -> float:
        i = self.names.index(name) if name in self.names else None
        return 0.0 if i is None else float(math.sqrt(max(self.cov[i, i], 0.0)))

    def mean_and_se(self, b: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Fitted mean ``lam_1`` at effective batches ``b`` and its standard error (delta method, exact here)."""
        X = _design(np.asarray(b, dtype=np.float64), self.form)
        return X @ self.params, np.sqrt(np.einsum("ij,jk,ik->i", X, self.cov, X))


@dataclass
class ScalingFit:
    """The fitted batch-size law: every form's fit, the chosen one and what it implies.

    Attributes:
        B, mean, se: the measured batch sizes, mean batch ``lam_1`` and its standard error, shape (n,).
        N: data-set size (``None``: ``b = B``). ``anchor``: ``(lam_full, se)`` used as a data point at
            ``b = inf``, or None.
        fits: form name -> :class:`FormFit`. ``chosen``: the form with the lowest AIC among the admissible.
        akaike_weights: form name -> ``exp(-AIC/2)`` normalised over the admissible forms.
        level: coverage of the intervals; ``flat_fraction``: defines the critical batch (module docstring).
    """

    B: np.ndarray
    mean: np.ndarray
    se: np.ndarray
    N: Optional[int]
    anchor: Optional[Tuple[float, float]]
    fits: Dict[str, FormFit]
    chosen: str
    akaike_weights: Dict[str, float]
    level: float = 0.95
    flat_fraction: float = 0.1
    _crit: Optional[tuple] = field(default=None, repr=False)

    # ---------------------------------------------------------------- the chosen law
    @property
    def best(self) -> FormFit:
        return self.fits[self.chosen]

    @property
    def lam_full(self) -> float:
        return self.best.param("lam_full")

    def _b(self, B) -> np.ndarray:
        return np.atleast_1d(np.asarray(theory.effective_batch(np.asarray(B, dtype=np.float64), self.N)))

    def predict(self, B, level: Optional[float] = None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Mean batch ``lam_1`` at batch sizes ``B`` (measured or not) with a ``level`` interval.

        Returns:
            ``(mean, lo, hi)``, arrays of shape ``(len(B),)``.
        """
        z = stats.norm.ppf(0.5 + (self.level if level is None else level) / 2)
        mu, se = self.best.mean_and_se(self._b(B))
        return mu, mu - z * se, mu + z * se

    def ratio(self, B_from: float, B_to) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``lam_1(B_from) / lam_1(B_to)`` of the fit with a ``level`` interval (delta method), shape ``(len(B_to),)``.

        The ratio carries a learning rate from ``B_from`` to ``B_to`` at a fixed ``lr * lam_1``; its
        interval has zero width at ``B_to = B_from``, unlike the ratio of two separate intervals.
        """
        f = self.best
        x0 = _design(self._b([B_from]), f.form)[0]
        X = _design(self._b(B_to), f.form)
        num, den = x0 @ f.params, X @ f.params
        grad = (x0[None, :] * den[:, None] - X * num) / (den ** 2)[:, None]
        se = np.sqrt(np.einsum("ij,jk,ik->i", grad, f.cov, grad))
        z = stats.norm.ppf(0.5 + self.level / 2)
        r = num / den
        return r, r - z * se, r + z * se

    def excess_terms(self, B) -> Tuple[np.ndarray, np.ndarray]:
        """The fitted ``a / b`` and ``c / sqrt(b)`` terms at ``B``, each of shape ``(len(B),)``."""
        X = _design(self._b(B), "both")
        return self.best.param("a") * X[:, 1], self.best.param("c") * X[:, 2]

    def exponent(self, B) -> np.ndarray:
        """Local exponent ``-d log lam_1 / d log B`` of the fit: how the stable rate ``~ 1/lam_1`` scales with B.

        1 where the ``a / b`` term dominates and ``lam_full`` is negligible (linear scaling), 1/2 where the
        ``c / sqrt(b)`` term does (square root), towards 0 beyond the critical batch. With finite N,
        ``d log b / d log B = N / (N - B)``.
        """
        B = np.atleast_1d(np.asarray(B, dtype=np.float64))
        out_a, out_c = self.excess_terms(B)
        lam = self.lam_full + out_a + out_c
        dlogb = 1.0 if self.N is None else self.N / np.maximum(self.N - B, 1e-300)
        with np.errstate(invalid="ignore", divide="ignore"):
            e = np.where(B >= (self.N or np.inf), 0.0, (out_a + 0.5 * out_c) / lam * dlogb)
        return e

    def regime(self, B) -> list:
        """``"linear"``, ``"sqrt"`` or ``"flat"`` at each B (module docstring)."""
        out_a, out_c = self.excess_terms(B)
        lim = self.flat_fraction * self.lam_full
        return ["flat" if ea + ec <= lim else ("linear" if ea >= ec else "sqrt") for ea, ec in zip(out_a, out_c)]

    # ---------------------------------------------------------------- critical batch
    def _crit_of(self, lam, a, c):
        """``B*`` where ``a / b + c / sqrt(b) = f lam`` (arrays); NaN where no such ``B >= 1`` exists."""
        target = self.flat_fraction * lam
        a, c = np.maximum(a, 0.0), np.maximum(c, 0.0)
        disc = np.sqrt(c * c + 4.0 * a * target)
        with np.errstate(divide="ignore", invalid="ignore"):
            u = np.where(a > 0, 2.0 * target / (c + disc), target / c)   # u = 1/sqrt(b*), root of a u^2 + c u = f lam
            bstar = 1.0 / (u * u)
        bstar = np.where((target > 0) & ((a > 0) | (c > 0)), bstar, np.nan)
        Bstar = bstar if self.N is None else bstar * self.N / (self.N + bstar)
        return np.where(Bstar >= 1.0, Bstar, np.nan)

    def critical_batch(self) -> Tuple[Optional[float], Optional[float], Optional[float]]:
        """``(B*, lo, hi)`` of the chosen form: where the excess falls to ``flat_fraction * lam_full``.

        ``B*`` is None when there is none at ``B >= 1`` (a flat law, or an excess already below the
        fraction at B = 1: every batch size is in the flat regime); then ``lo`` and ``hi`` are None too.
        The interval comes from 4,000 draws of the parameters from their Gaussian (seeded: reproducible);
        a draw without a critical batch at ``B >= 1`` counts as ``B* = 1`` (flat from the first sample), so
        the interval never goes below 1.
        """
        if self._crit is None:
            f = self.best
            est = self._crit_of(np.array([f.param("lam_full")]), np.array([f.param("a")]), np.array([f.param("c")]))[0]
            if f.form == "flat" or not np.isfinite(est):
                self._crit = (None, None, None)
            else:
                draws = np.random.default_rng(0).multivariate_normal(f.params, f.cov, size=_DRAWS, method="svd")
                col = {n: draws[:, i] for i, n in enumerate(f.names)}
                zero = np.zeros(_DRAWS)
                vals = self._crit_of(col["lam_full"], col.get("a", zero), col.get("c", zero))
                vals = np.where(np.isnan(vals), 1.0, vals)
                tail = (1 - self.level) / 2
                lo, hi = np.quantile(vals, [tail, 1 - tail])
                self._crit = (float(est), float(lo), float(hi))
        return self._crit

    # ---------------------------------------------------------------- display and I/O
    def summary(self) -> str:
        """One line per form: parameters +- s.e., chi2/dof, p-value, AIC, Akaike weight."""
        lines = []
        for name, f in self.fits.items():
            ps = "  ".join(f"{n} = {f.param(n):.4g} +- {f.stderr(n):.2g}" for n in f.names)
            tag = "  <- chosen" if name == self.chosen else ("" if f.admissible else "  (negative term: excluded)")
            w = self.akaike_weights.get(name, 0.0)
            lines.append(f"  {name:<8} {ps:<62} chi2/dof = {f.chi2:.3g}/{f.dof}  p = {f.p_value:.3g}  "
                         f"AIC = {f.aic:.4g}  weight = {w:.2f}{tag}")
        return "\n".join(lines)

    def critical_batch_text(self) -> str:
        """The critical batch in words, with its interval; never a number below 1."""
        crit, lo, hi = self.critical_batch()
        f = self.flat_fraction
        if crit is None:
            return f"critical batch: none (the excess is below {f:g} lam_full at every B >= 1: flat)"
        return f"critical batch = {crit:.4g} [{lo:.3g}, {hi:.3g}] (excess = {f:g} lam_full)"

    def __repr__(self) -> str:
        return f"hessfast.ScalingFit (chosen by AIC: {self.chosen}; {self.critical_batch_text()})\n{self.summary()}"

    def to_dict(self) -> dict:
        crit, lo, hi = self.critical_batch()
        return {
            "B": self.B.tolist(), "mean": self.mean.tolist(), "se": self.se.tolist(), "N": self.N,
            "anchor": None if self.anchor is None else list(self.anchor), "chosen": self.chosen,
            "criterion": "AIC = chi2 + 2k among forms with non-negative terms", "level": self.level,
            "flat_fraction": self.flat_fraction, "critical_batch": crit, "critical_batch_interval": [lo, hi],
            "akaike_weights": self.akaike_weights,
            "forms": {n: {"params": dict(zip(f.names, f.params.tolist())), "cov": f.cov.tolist(), "chi2": f.chi2,
                          "dof": f.dof, "p_value": f.p_value, "aic": f.aic, "admissible": f.admissible,
                          "residuals": f.residuals.tolist()} for n, f in self.fits.items()},
        }


def _fit_form(b, y, se, form) -> FormFit:
    X = _design(b, form)
    A, z = X / se[:, None], y / se
    k, n = X.shape[1], len(y)
    params, *_ = np.linalg.lstsq(A, z, rcond=None)
    resid = z - A @ params
    chi2 = float(resid @ resid)
    dof = n - k
    cov = np.linalg.pinv(A.T @ A)
    if dof > 0:
        cov = cov * max(1.0, chi2 / dof)
    p = float(stats.chi2.sf(chi2, dof)) if dof > 0 else float("nan")
    admissible = bool(np.all(params[1:] >= 0))
    return FormFit(form, ("lam_full",) + _TERMS[form], params, cov, chi2, dof, p, chi2 + 2 * k, admissible, resid)


def fit_scaling_law(B: Sequence[float], mean: Sequence[float], se: Sequence[float], N: Optional[int] = None, *,
                    lam_full: Optional[float] = None, lam_full_se: Optional[float] = None,
                    forms: Sequence[str] = FORMS, level: float = 0.95, flat_fraction: float = 0.1) -> ScalingFit:
    """Fit the measured mean batch ``lam_1(B)`` to the forms of the module docstring and choose one by AIC.

    Args:
        B: batch sizes, shape (n,), each in ``[1, N]``.
        mean: mean batch ``lam_1`` at each B, shape (n,).
        se: its standard error (> 0; a zero is floored at 1e-6 of ``max |mean|``), shape (n,).
        N: data-set size (``b = B / (1 - B/N)``), or None for ``b = B``.
        lam_full: the full-data ``lam_1`` (e.g. Lanczos on all N samples), added as a data point at
            ``b = inf`` with standard error ``lam_full_se`` (default ``1e-3 |lam_full|``); ``lam_full`` is
            still a fitted parameter. Without it ``lam_full`` is fitted from the batches alone.
        forms: the forms to fit, a subset of ``FORMS``.
        level: coverage of the intervals, in (0, 1).
        flat_fraction: the critical batch is where the excess is ``flat_fraction * lam_full``, in (0, 1].

    Returns:
        :class:`ScalingFit`.

    Raises:
        ValueError: mismatched lengths, non-finite values, a non-positive standard error without a
            floor, too few points for any requested form, or an unknown form.
    """
    Bv, y, s = (np.asarray(v, dtype=np.float64).ravel() for v in (B, mean, se))
    if not (len(Bv) == len(y) == len(s)) or len(Bv) == 0:
        raise ValueError(f"B, mean and se must be non-empty and of one length, got {len(Bv)}, {len(y)}, {len(s)}.")
    if not (np.isfinite(Bv).all() and np.isfinite(y).all() and np.isfinite(s).all()) or (s < 0).any():
        raise ValueError("B, mean and se must be finite and se >= 0 (a batch size measured once has no s.e.: "
                         "measure at least 2 batches per B).")
    bad = [f for f in forms if f not in FORMS]
    if bad or not forms:
        raise ValueError(f"unknown forms {bad}; choose from {FORMS}.")
    if not 0 < level < 1 or not 0 < flat_fraction <= 1:
        raise ValueError(f"level must be in (0, 1) and flat_fraction in (0, 1], got {level}, {flat_fraction}.")
    b = np.asarray(theory.effective_batch(Bv, N), dtype=np.float64).ravel()
    yy, ss, bb = y, s, b
    anchor = None
    if lam_full is not None:
        anchor = (float(lam_full), float(lam_full_se if lam_full_se is not None else 1e-3 * abs(lam_full)))
        yy, ss, bb = np.append(y, anchor[0]), np.append(s, anchor[1]), np.append(b, np.inf)
    ss = np.maximum(ss, _SE_FLOOR * max(float(np.max(np.abs(yy))), 1e-300))
    fits = {f: _fit_form(bb, yy, ss, f) for f in forms if len(yy) >= 1 + len(_TERMS[f])}
    if not fits:
        raise ValueError(f"{len(yy)} data point(s) are too few to fit any of {list(forms)}: measure more batch sizes.")
    ok = {n: f for n, f in fits.items() if f.admissible}
    if not ok:  # every form has a negative term (the curvature rises with B): fall back on the simplest fitted form
        ok = {min(fits, key=lambda n: len(_TERMS[n])): fits[min(fits, key=lambda n: len(_TERMS[n]))]}
    best_aic = min(f.aic for f in ok.values())
    raw = {n: math.exp(-(f.aic - best_aic) / 2) for n, f in ok.items()}
    total = sum(raw.values())
    chosen = min(ok, key=lambda n: ok[n].aic)
    return ScalingFit(Bv, y, s, N, anchor, fits, chosen, {n: w / total for n, w in raw.items()}, level, flat_fraction)


def verdict(predicted, measured: float, se: float) -> str:
    """A plain verdict on a prediction against a measurement ``measured +- se``.

    ``"within 1 s.e."`` when ``|predicted - measured| <= se``, else ``"factor 2.9 low"`` /
    ``"factor 1.2 high"`` (the ratio of measured to predicted, or its inverse), with the distance in
    standard errors, e.g. ``"factor 2.9 low (1.4 s.e.)"``; ``"-"`` when there is no prediction.
    """
    if predicted is None or not np.isfinite(predicted) or not np.isfinite(measured):
        return "-"
    d = abs(predicted - measured)
    if d <= se:
        return "within 1 s.e."
    k = f" ({d / se:.1f} s.e.)" if se > 0 else ""
    if predicted <= 0 or measured <= 0:
        return f"{'low' if predicted < measured else 'high'}{k}"
    r = measured / predicted
    return f"factor {r:.3g} low{k}" if r > 1 else f"factor {1 / r:.3g} high{k}"
