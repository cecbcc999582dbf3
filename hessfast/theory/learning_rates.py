"""Learning rates and momenta from the (batch) curvature (Sections 10-11, Eq. 22)."""
from __future__ import annotations

import numpy as np

from ._checks import _CURVATURES, _OPTIMIZERS, LrMomentum, _arr, _check_choice, _check_nonneg, _check_P, _out
from .batch import batch_extremes, ggn_batch_max


# --------------------------------------------------------------------------------------------------
# Sections 10-11: learning rates


def critical_batch_size(lam_max, sigma2, P, N=None, curvature: str = "hessian"):
    """Batch size beyond which a larger batch stops buying a proportionally larger SGD learning rate (Section 10.1).

    It is where the batch-dependent part of ``lam'_1`` equals ``lam_1``:

    * ``curvature="hessian"`` (Theorem 4): ``P sigma2 / (b lam_1) = lam_1``, so ``b* = P sigma2 / lam_1^2``.
      This is exactly the BBP threshold ``lam_1 = sqrt(P sigma2 / b)``: below ``b*`` the top batch
      eigenvalue is the bulk edge ``2 sqrt(P sigma2 / b)`` (max learning rate grows like ``sqrt(b)``),
      above it ``lam_1 <= lam'_1 <= 2 lam_1`` (at most a factor 2 left to gain).
    * ``curvature="ggn"`` (Theorem 7, derived form of :func:`ggn_batch_max`): ``(P sigma2 / b)(1 + t / lam_1)
      = lam_1`` with ``t = sigma2 (1 - B/N)``; for ``N=None`` ``b* = P sigma2 (lam_1 + sigma2) / lam_1^2``.
      Below it ``lam'_1`` grows like ``1/b`` (linear scaling), above it tends to ``lam_1 + t``.

    With ``N`` given, ``b*`` is turned into a batch size by inverting ``b = B/(1 - B/N)``:
    ``B* = b* N / (N + b*)`` for the Hessian (always < N); for the GGN the balance is solved for ``B``
    directly. The result may be below 1, meaning no batch size is in the linear regime.

    Args:
        lam_max: top eigenvalue ``lam_1 > 0`` of the empirical (or true) curvature.
        sigma2: per-element Hessian variance (``"hessian"``) or Jacobian-entry variance (``"ggn"``).
        P: number of parameters.
        N: data-set size, or ``None`` (``B* = b*``).
        curvature: ``"hessian"`` or ``"ggn"``.

    Returns:
        ``B*`` as a float (or array); not rounded.
    """
    curvature = _check_choice("curvature", curvature, _CURVATURES)
    l1 = _arr("lam_max", lam_max)
    if (l1 <= 0).any():
        raise ValueError(f"lam_max must be > 0 for a critical batch size to exist, got {lam_max!r}.")
    s2 = _arr("sigma2", sigma2)
    _check_nonneg("sigma2", s2)
    p = _check_P(P)
    Na = None
    if N is not None:
        Na = _arr("N", N)
        if (Na < 1).any():
            raise ValueError(f"data-set size N must be >= 1 (or None), got {N!r}.")
    if curvature == "hessian":
        b = p * s2 / l1 ** 2
        return _out(b if Na is None else b * Na / (Na + b))
    if Na is None:
        return _out(p * s2 * (l1 + s2) / l1 ** 2)
    # With N the Marchenko-Pastur scale sigma2 (1 - B/N) depends on B too: in x = 1 - B/N the balance
    # (P sigma2 / b)(1 + sigma2 x / lam_1) = lam_1 is P sigma2^2 x^2 + (P sigma2 lam_1 + lam_1^2 N) x - lam_1^2 N = 0;
    # its positive root, written without cancellation.
    q = p * s2 * l1 + l1 ** 2 * Na
    x = 2.0 * l1 ** 2 * Na / (q + np.sqrt(q * q + 4.0 * p * s2 ** 2 * l1 ** 2 * Na))
    return _out(Na * (1.0 - x))


def max_lr_sgd(lam_max, sigma2, P, B, N=None, curvature: str = "hessian"):
    """Largest stable SGD learning rate ``2 / lam'_1`` at batch size ``B`` (Section 10.1, Eq. 22).

    ``lam'_1`` is the predicted top eigenvalue of the batch curvature: Theorem 4 (:func:`batch_extremes`)
    for ``curvature="hessian"``, Theorem 7 in its derived form (:func:`ggn_batch_max`) for ``"ggn"``.
    Negative curvature does not enter: no step size makes gradient descent contract along it.

    Args:
        lam_max: top eigenvalue of the empirical (or true) curvature.
        sigma2, P, B, N: as in :func:`batch_extremes` / :func:`ggn_batch_max`.
        curvature: ``"hessian"`` or ``"ggn"``.

    Returns:
        ``2 / lam'_1`` (``inf`` where ``lam'_1 = 0``).
    """
    curvature = _check_choice("curvature", curvature, _CURVATURES)
    if curvature == "hessian":
        top = batch_extremes(lam_max, np.minimum(_arr("lam_max", lam_max), 0.0), sigma2, P, B, N).lam_max
    else:
        top = ggn_batch_max(lam_max, sigma2, P, B, N)
    with np.errstate(divide="ignore"):
        return _out(2.0 / np.asarray(top, dtype=np.float64))


def scale_lr(lr, from_batch, to_batch, optimizer: str = "sgd", critical_batch=None):
    """Carry a tuned learning rate from one batch size to another (Sections 10.1 and 11).

    * ``"sgd"``: linear, ``lr * to_batch / from_batch``. With ``critical_batch`` the batch sizes are
      first clipped to it, ``lr * min(to, Bc) / min(from, Bc)``: above ``Bc`` a larger batch buys no
      larger rate (so nothing changes between two batch sizes both above it), and going down from above
      ``Bc`` scales from ``Bc``.
    * ``"adam"`` (Adam-type optimisers with a small damping ``epsilon``): square root,
      ``lr * sqrt(to_batch / from_batch)``, set by the bulk edge, which shrinks like ``1/sqrt(b)`` with
      no threshold; ``critical_batch`` is refused.

    The paper's examples: SGD 0.01 at B=128 gives 0.08 at B=1024; Adam 0.0004 at B=128 scales by
    ``sqrt(B/128)``.

    Args:
        lr: learning rate tuned at ``from_batch`` (> 0).
        from_batch: batch size it was tuned at (>= 1).
        to_batch: batch size to scale to (>= 1).
        optimizer: ``"sgd"`` or ``"adam"``.
        critical_batch: optional SGD threshold, e.g. from :func:`critical_batch_size`.

    Returns:
        The scaled learning rate, broadcast over the inputs.
    """
    optimizer = _check_choice("optimizer", optimizer, _OPTIMIZERS)
    a = _arr("lr", lr)
    if (a <= 0).any() or np.isinf(a).any():
        raise ValueError(f"lr must be finite and > 0, got {lr!r}.")
    f, t = _arr("from_batch", from_batch), _arr("to_batch", to_batch)
    for name, v, raw in (("from_batch", f, from_batch), ("to_batch", t, to_batch)):
        if (v < 1).any() or np.isinf(v).any():
            raise ValueError(f"{name} must be a finite batch size >= 1, got {raw!r}.")
    if optimizer == "adam":
        if critical_batch is not None:
            raise ValueError("critical_batch applies to SGD only: the square-root rule for Adam follows the "
                             "bulk edge, which has no threshold (Section 11). Pass critical_batch=None.")
        return _out(a * np.sqrt(t / f))
    if critical_batch is not None:
        c = _arr("critical_batch", critical_batch)
        if (c <= 0).any():
            raise ValueError(f"critical_batch must be > 0, got {critical_batch!r}.")
        f, t = np.minimum(f, c), np.minimum(t, c)
    return _out(a * t / f)


def _check_pd_pair(lam_max, lam_min):
    l1, lp = _arr("lam_max", lam_max), _arr("lam_min", lam_min)
    if (lp <= 0).any() or (lp > l1).any() or np.isinf(l1).any():
        raise ValueError(f"need 0 < lam_min <= lam_max < inf (a positive-definite curvature estimate), "
                         f"got lam_max={lam_max!r}, lam_min={lam_min!r}.")
    return np.sqrt(l1), np.sqrt(lp)


def polyak(lam_max, lam_min, variant: str = "standard") -> LrMomentum:
    """Heavy-ball (Polyak) learning rate and momentum for curvature in ``[lam_min, lam_max]`` (Eqs. 24, 25).

    ``variant="standard"`` (default) is Polyak's optimal tuning for a quadratic, which contracts every
    eigen-direction at the rate ``sqrt(momentum)`` per step::

        lr = 4 / (sqrt(lam_max) + sqrt(lam_min))^2,  momentum = ((sqrt(lam_max) - sqrt(lam_min)) / (sqrt(lam_max) + sqrt(lam_min)))^2

    ``variant="paper"`` keeps the printed Eq. 24 learning rate ``2 / (sqrt(lam_max) + sqrt(lam_min))``,
    which has the units of ``1/sqrt(curvature)``; it coincides with the standard one only when
    ``sqrt(lam_max) + sqrt(lam_min) = 2`` and otherwise diverges or under-steps (``docs/theory.md``).
    The momentum of Eq. 25 is as printed in both.

    Returns:
        ``LrMomentum(lr, momentum)`` in the convention of ``torch.optim.SGD(momentum=...)``.
    """
    variant = _check_choice("variant", variant, ("standard", "paper"))
    r1, rp = _check_pd_pair(lam_max, lam_min)
    lr = 4.0 / (r1 + rp) ** 2 if variant == "standard" else 2.0 / (r1 + rp)
    return LrMomentum(_out(lr), _out(((r1 - rp) / (r1 + rp)) ** 2))


def nesterov(lam_max, lam_min, variant: str = "standard") -> LrMomentum:
    """Nesterov learning rate and momentum for curvature in ``[lam_min, lam_max]`` (Eqs. 24, 25).

    ``variant="standard"`` (default) is Nesterov's constant-step scheme for ``L``-smooth,
    ``mu``-strongly convex functions::

        lr = 1 / lam_max,  momentum = (sqrt(lam_max) - sqrt(lam_min)) / (sqrt(lam_max) + sqrt(lam_min))

    ``variant="paper"`` keeps the printed Eq. 24 learning rate ``sqrt(lam_min / lam_max)``, which is
    dimensionless (it does not change when the loss is rescaled) and diverges once
    ``sqrt(lam_min lam_max)`` exceeds about 4/3 (``docs/theory.md``). The momentum is as printed in both.

    Returns:
        ``LrMomentum(lr, momentum)`` in the convention of ``torch.optim.SGD(momentum=..., nesterov=True)``.
    """
    variant = _check_choice("variant", variant, ("standard", "paper"))
    r1, rp = _check_pd_pair(lam_max, lam_min)
    lr = 1.0 / r1 ** 2 if variant == "standard" else rp / r1
    return LrMomentum(_out(lr), _out((r1 - rp) / (r1 + rp)))


def _spectrum_extremes(spectrum, mass_threshold: float):
    """(lam_max, lam_min) of a Lanczos spectrum after the Section 10.2 mass rule; see lr_momentum_from_spectrum."""
    try:
        theta = np.atleast_2d(np.asarray(spectrum.ritz_values, dtype=np.float64))
        w = np.atleast_2d(np.asarray(spectrum.weights, dtype=np.float64))
    except AttributeError as e:
        raise TypeError("spectrum must have .ritz_values and .weights arrays of shape (num_probes, m), "
                        f"got {type(spectrum).__name__}.") from e
    if theta.shape != w.shape or theta.ndim != 2:
        raise ValueError(f"spectrum.ritz_values {theta.shape} and spectrum.weights {w.shape} must both have "
                         "shape (num_probes, m).")
    valid = np.isfinite(theta)
    if not valid.any():
        raise ValueError("spectrum has no finite Ritz values.")
    w = np.where(valid, w, 0.0)
    keep = valid.copy()
    for k in range(theta.shape[0]):
        total = w[k].sum()
        if total <= 0:
            continue
        j = int(np.argmax(w[k]))
        if w[k, j] / total > mass_threshold:
            keep[k, j] = False
    lam_max = float(np.max(theta[valid]))
    positive = theta[keep & (theta > 0)]
    if positive.size == 0:
        raise ValueError("no positive Ritz value is left after the mass rule; the Polyak/Nesterov rules need a "
                         "positive-definite curvature estimate (use the GGN, or more Lanczos steps).")
    return lam_max, float(np.min(positive))


def lr_momentum_from_spectrum(spectrum, rule: str = "polyak", mass_threshold: float = 0.5,
                              variant: str = "standard") -> LrMomentum:
    """Learning rate and momentum from a Lanczos spectrum of the batch curvature (Section 10.2).

    The paper's rule: in each probe's quadrature, if the Ritz value with the largest weight holds more
    than ``mass_threshold`` of that probe's mass (the near-zero degenerate bulk, which would give
    momentum 1), drop it. Then ``lam_max`` is the largest Ritz value over all probes and ``lam_min`` the
    smallest positive kept one (Ritz values always lie inside the true spectrum, so the union over probes
    gives the tightest inner estimates; non-positive Ritz values are left out because Eqs. 24-25 need a
    positive-definite approximation, as the paper says). These go into :func:`polyak` or :func:`nesterov`.

    Args:
        spectrum: any object with ``ritz_values`` and ``weights`` of shape (num_probes, m), NaN-padded
            Ritz values allowed (e.g. :class:`hessfast.Spectrum`).
        rule: ``"polyak"`` or ``"nesterov"``.
        mass_threshold: fraction of a probe's mass above which its heaviest Ritz value is dropped, in (0, 1].
        variant: passed on to :func:`polyak` / :func:`nesterov`.

    Returns:
        ``LrMomentum(lr, momentum)``.
    """
    rule = _check_choice("rule", rule, ("polyak", "nesterov"))
    if not 0.0 < float(mass_threshold) <= 1.0:
        raise ValueError(f"mass_threshold must be in (0, 1], got {mass_threshold!r}.")
    lam_max, lam_min = _spectrum_extremes(spectrum, float(mass_threshold))
    return (polyak if rule == "polyak" else nesterov)(lam_max, lam_min, variant=variant)



# --------------------------------------------------------------------------------------------------
# Learning rates from a measured batch curvature (hessfast.lr_advice)


def max_lr_heavy_ball(lam_max, momentum=0.0):
    """Largest stable heavy-ball SGD rate ``2 (1 + rho) / lam_max`` on a quadratic (Section 10.1, Eq. 22).

    With ``torch.optim.SGD(momentum=rho)`` the error along curvature ``lam`` follows
    ``x_{k+1} = (1 + rho - lr lam) x_k - rho x_{k-1}``, stable iff ``0 < lr lam < 2 (1 + rho)``, ``0 <= rho < 1``;
    ``rho = 0`` is Eq. 22's ``2 / lam_1``. ``lam_max`` (> 0) is the curvature the steps see (the batch one).

    Example:
        >>> max_lr_heavy_ball(4.0, momentum=0.9)
        0.95
    """
    lam, rho = _arr("lam_max", lam_max), _arr("momentum", momentum)
    if (lam <= 0).any() or np.isinf(lam).any():
        raise ValueError(f"lam_max must be finite and > 0 for a stable learning rate to exist, got {lam_max!r}.")
    if (rho < 0).any() or (rho >= 1).any():
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}.")
    return _out(2.0 * (1.0 + rho) / lam)


def adam_lr_capped(lr, from_batch, to_batch, lam_from, lam_to):
    """Adam's square-root rule (Section 11), capped: ``lr min(sqrt(to/from), lam_from/lam_to)``.

    ``lam_from``, ``lam_to`` (> 0) are the mean batch ``lam_1`` at the two batch sizes. The rate may not
    grow faster (going up) or shrink slower (going down) than the curvature falls or rises, or
    ``lr * lam_1`` would exceed its value at ``from_batch``, where ``lr`` was stable. Where ``lam_1 ~ 1/b``
    below the reference this makes the rule linear (Section 11's small-batch caveat); past the critical
    batch it stops the rate growing.
    """
    f, t = _arr("lam_from", lam_from), _arr("lam_to", lam_to)
    if (f <= 0).any() or (t <= 0).any() or np.isinf(f).any() or np.isinf(t).any():
        raise ValueError(f"lam_from and lam_to must be finite and > 0, got {lam_from!r} and {lam_to!r}.")
    return _out(np.minimum(scale_lr(lr, from_batch, to_batch, "adam"), _arr("lr", lr) * f / t))
