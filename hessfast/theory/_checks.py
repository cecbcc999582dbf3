"""Input checks, output shapes and result types shared by the formulas of :mod:`hessfast.theory`."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

_CURVATURES = ("hessian", "ggn")
_OPTIMIZERS = ("sgd", "adam")


class BatchExtremes(NamedTuple):
    """Predicted extreme eigenvalues of the batch Hessian (Theorem 4); unpacks as ``(lam_max, lam_min)``."""

    lam_max: object
    lam_min: object


class LrMomentum(NamedTuple):
    """A learning rate and a momentum (Section 10.2); unpacks as ``(lr, momentum)``."""

    lr: object
    momentum: object


# --------------------------------------------------------------------------------------------------
# input checks and output shape


def _arr(name: str, x) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if np.isnan(a).any():
        raise ValueError(f"{name} contains NaN: {x!r}.")
    return a


def _out(x):
    """0-d results come back as Python floats, everything else as arrays."""
    x = np.asarray(x, dtype=np.float64)
    return float(x) if x.ndim == 0 else x


def _check_nonneg(name: str, a: np.ndarray) -> None:
    if (a < 0).any() or np.isinf(a).any():
        raise ValueError(f"{name} must be finite and >= 0, got {a if a.ndim else float(a)}.")


def _check_P(P) -> np.ndarray:
    p = _arr("P", P)
    if (p < 1).any() or np.isinf(p).any():
        raise ValueError(f"P (the number of parameters) must be a finite number >= 1, got {P!r}.")
    return p


def _check_choice(name: str, value: str, choices) -> str:
    if not isinstance(value, str) or value.lower() not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(repr(c) for c in choices)}.")
    return value.lower()
