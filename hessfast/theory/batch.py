"""The batch spectrum (Sections 4-6): how mini-batching moves the extreme eigenvalues (Theorems 4 and 7)."""
from __future__ import annotations

import numpy as np

from ._checks import BatchExtremes, _arr, _check_choice, _check_nonneg, _check_P, _out


# --------------------------------------------------------------------------------------------------
# Section 4-6: the batch spectrum


def effective_batch(B, N=None):
    """Effective batch size ``b = B / (1 - B/N)`` of sampling ``B`` of ``N`` samples without replacement.

    The fluctuation ``H_batch - H_emp`` (Eq. 5) has element variance ``(1/B - 1/N) Var = Var / b``,
    where ``Var`` is the per-sample element variance with the unbiased ``1/(N-1)`` normalisation
    (this makes it exact for sampling without replacement; with ``1/N`` it is off by ``N/(N-1)``).

    Args:
        B: batch size(s), ``1 <= B``; float or array.
        N: data-set size(s), ``B <= N``; ``None`` compares the batch with the true (population)
            Hessian instead of the empirical one, where ``b = B`` (Remark 6).

    Returns:
        ``b``, broadcast over ``B`` and ``N``; ``inf`` where ``B == N`` (the batch is the whole data
        set, so there is no fluctuation and every prediction below returns the empirical value).

    Raises:
        ValueError: ``B < 1``, ``N < 1``, or ``B > N``.
    """
    Ba = _arr("B", B)
    if (Ba < 1).any() or np.isinf(Ba).any():
        raise ValueError(f"batch size B must be a finite number >= 1, got {B!r}.")
    if N is None:
        return _out(Ba)
    Na = _arr("N", N)
    if (Na < 1).any():
        raise ValueError(f"data-set size N must be >= 1 (or None for the true risk), got {N!r}.")
    if (Ba > Na).any():
        raise ValueError(f"batch size B={B!r} exceeds the data-set size N={N!r}; batches are drawn "
                         "without replacement, so B <= N (pass N=None to compare with the true Hessian).")
    with np.errstate(divide="ignore", invalid="ignore"):
        b = np.where(Ba == Na, np.inf, Ba * Na / (Na - Ba))
    return _out(b)


def _bbp_top(lam, s):
    """Spiked-Wigner map for the top eigenvalue (Lemma 5): ``lam + s^2/lam`` if ``lam > s`` else ``2 s``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(lam > s, lam + s * s / np.where(lam != 0, lam, 1.0), 2.0 * s)


def batch_extremes(lam_max, lam_min, sigma2, P, B, N=None) -> BatchExtremes:
    """Extreme eigenvalues of the batch Hessian predicted by Theorem 4 (Eq. 9; Lemma 5, Eq. 10).

    Model: ``H_batch = H_emp + eps`` with ``H_emp`` of low rank and ``eps`` a Wigner matrix of element
    variance ``sigma2 / b``, whose semicircle has edges ``+-2 s``, ``s = sqrt(P sigma2 / b)``. Then
    (the Baik-Ben Arous-Peche transition; the printed Eq. 9 agrees with it and with simulation)::

        lam'_1 = lam_1 + s^2 / lam_1   if lam_1 >  s,   else  2 s
        lam'_P = lam_P + s^2 / lam_P   if lam_P < -s,   else -2 s

    Args:
        lam_max: largest eigenvalue ``lam_1`` of the empirical (or, with ``N=None``, true) Hessian.
        lam_min: its most negative eigenvalue ``lam_P``; pass 0 (or anything >= -s) when there is no
            negative outlier. Must be <= ``lam_max``.
        sigma2: per-element variance of a single-sample Hessian (``docs/theory.md``), >= 0.
        P: number of parameters.
        B: batch size.
        N: data-set size, or ``None`` for the true-risk variant ``b = B`` (Remark 6).

    Returns:
        ``BatchExtremes(lam_max, lam_min)``: predicted ``(lam'_1, lam'_P)``, broadcast over the inputs.

    Example:
        >>> batch_extremes(3.0, -0.5, sigma2=1e-2, P=10_000, B=100)  # s = 1
        BatchExtremes(lam_max=3.3333333333333335, lam_min=-2.0)
    """
    l1, lp = _arr("lam_max", lam_max), _arr("lam_min", lam_min)
    if (lp > l1).any():
        raise ValueError(f"lam_min={lam_min!r} is larger than lam_max={lam_max!r}.")
    s = np.sqrt(_noise_scale2(sigma2, P, B, N))
    return BatchExtremes(_out(_bbp_top(l1, s)), _out(-_bbp_top(-lp, s)))


def ggn_batch_max(lam_max, sigma2, P, B, N=None, variant: str = "bgn"):
    """Largest eigenvalue of the batch GGN predicted by Theorem 7 (Eq. 16).

    Model (Section 6, Eq. 14): ``G_batch = (J + E)(J + E)^T`` with ``J`` of shape (P, B), ``G_emp = J J^T``
    of low rank with top eigenvalue ``lam_1``, and ``E`` with independent N(0, sigma2 / b) entries. With
    ``N=None`` (``b = B``) ``E E^T`` is Marchenko-Pastur with ratio ``c = P / B`` and edges
    ``sigma2 (1 +- sqrt(c))^2``. With a finite ``N`` the ``B`` columns of variance ``sigma2 / b`` make it
    Marchenko-Pastur with the same ``c`` and scale ``t = sigma2 B / b = sigma2 (1 - B/N)``, so that the
    prediction is continuous and exact (``lam_1``) at ``B = N``; ``c t = P sigma2 / b`` either way.

    ``variant="bgn"`` (default) is the rectangular spiked ("information-plus-noise") result of
    Benaych-Georges & Nadakuditi (2012), which the simulation supports::

        lam'_1 = (lam_1 + t)(lam_1 + c t) / lam_1    if lam_1 > t sqrt(c)
               = t (1 + sqrt(c))^2                    otherwise

    ``variant="paper"`` is Eq. 16 as printed (with ``c = P / b``, scale ``sigma2``):
    ``(lam_1 + sigma2 (1 - c)) / (1 - c sigma2 / lam_1)`` above ``lam_1 > sigma2 (1 + c)`` and
    ``2 sigma2 (1 + c)`` below. It equals ``lam_1 + sigma2 + c sigma2^2 / (lam_1 - c sigma2)``, so it misses
    the ``c sigma2 = P sigma2 / b`` broadening that the derived form has at leading order; it is right
    only when ``P << b`` (``docs/theory.md`` has the measured gap).

    Here ``sigma2`` is the variance of an entry of the per-sample (transformed) Jacobian, which has the
    units of an eigenvalue -- not the per-element variance of a per-sample GGN (units eigenvalue^2).
    For one output column per sample the latter is about ``sigma2^2 + 2 sigma2 lam_1 / P``
    (``docs/theory.md``).

    Args:
        lam_max: top eigenvalue ``lam_1 >= 0`` of ``G_emp``.
        sigma2: Jacobian-entry variance, >= 0.
        P: number of parameters.
        B: batch size.
        N: data-set size, or ``None`` for ``b = B``.
        variant: ``"bgn"`` (derived, default) or ``"paper"`` (printed Eq. 16).

    Returns:
        Predicted ``lam'_1``, broadcast over the inputs.

    Example:
        >>> ggn_batch_max(10.0, sigma2=1.0, P=2000, B=500)  # c = 4
        15.4
    """
    variant = _check_choice("variant", variant, ("bgn", "paper"))
    l1 = _arr("lam_max", lam_max)
    _check_nonneg("lam_max", l1)
    s2 = _arr("sigma2", sigma2)
    _check_nonneg("sigma2", s2)
    p = _check_P(P)
    b = np.asarray(effective_batch(B, N), dtype=np.float64)
    safe = np.where(l1 > 0, l1, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        if variant == "bgn":
            c = p / _arr("B", B)
            t = np.where(np.isinf(b), 0.0, s2 * _arr("B", B) / b)
            above = l1 > t * np.sqrt(c)
            out = np.where(above, (l1 + t) * (l1 + c * t) / safe, t * (1.0 + np.sqrt(c)) ** 2)
        else:
            c = np.where(np.isinf(b), 0.0, p / b)
            above = l1 > s2 * (1.0 + c)
            out = np.where(above, (l1 + s2 * (1.0 - c)) / (1.0 - c * s2 / safe), 2.0 * s2 * (1.0 + c))
    return _out(out)


def eigvec_overlap(lam, sigma2, P, B, N=None):
    """Squared overlap ``|<phi'_i, phi_i>|^2`` of a batch and an empirical Hessian eigenvector (Theorem 10, Eq. 44).

    Same model as :func:`batch_extremes`; with ``s^2 = P sigma2 / b``::

        |<phi', phi>|^2 = 1 - s^2 / lam^2   if |lam| > s,   else 0

    for each outlier eigenvalue ``lam`` of ``H_emp`` (negative ones included) that is well separated
    from the others. The threshold is the one of Theorem 10 / Theorem 4; Lemma 11 as printed says
    ``lam > 2 s``, which the simulation contradicts (``docs/theory.md``).

    Args:
        lam: eigenvalue(s) of the empirical Hessian.
        sigma2, P, B, N: as in :func:`batch_extremes`.

    Returns:
        Squared overlap in ``[0, 1]``, broadcast over the inputs.
    """
    la = _arr("lam", lam)
    s2 = _noise_scale2(sigma2, P, B, N)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(la * la > s2, 1.0 - s2 / np.where(la != 0, la * la, 1.0), 0.0)
    return _out(out)


def _noise_scale2(sigma2, P, B, N) -> np.ndarray:
    """``P sigma2 / b``: the squared half-width of the fluctuation semicircle (Theorem 4's ``(P/b) sigma^2``)."""
    s = _arr("sigma2", sigma2)
    _check_nonneg("sigma2", s)
    b = np.asarray(effective_batch(B, N), dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.isinf(b), 0.0, _check_P(P) * s / b)
