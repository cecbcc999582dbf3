"""Monte-Carlo samplers for the random-matrix models behind :mod:`hessfast.theory`.

Each sampler draws one realisation of exactly the model a theorem assumes, so that the tests
(``tests/test_theory.py``) and the reproduction script (``bench/bench_theory_mc.py``) check the
closed forms against the same thing. Everything is float64 numpy on a caller-supplied seeded
``numpy.random.Generator``; nothing here is used by the library at run time.
"""
from __future__ import annotations

import numpy as np
import scipy.linalg


def wigner(P: int, s2: float, rng: np.random.Generator) -> np.ndarray:
    """A (P, P) Gaussian Orthogonal Ensemble matrix with off-diagonal element variance ``s2``.

    The diagonal has variance ``2 * s2`` (the orthogonally invariant choice); the semicircle edge
    is ``2 * sqrt(P * s2)``.
    """
    g = rng.standard_normal((P, P))
    g += g.T
    g *= np.sqrt(s2 / 2.0)
    return g


def spiked_wigner(P: int, spikes, s2: float, rng: np.random.Generator):
    """Extreme eigenpairs of ``A + W``: the model of Theorem 4 / Lemma 5 / Theorem 10.

    ``A = diag(spikes, 0, ..., 0)`` is the low-rank empirical Hessian (the GOE is orthogonally
    invariant, so putting the spikes on coordinate axes loses no generality) and ``W`` is
    :func:`wigner` with element variance ``s2`` (= sigma2 / b in the theorems).

    Args:
        P: matrix dimension.
        spikes: the nonzero eigenvalues of ``A``, length r << P.
        s2: element variance of the fluctuation matrix.
        rng: seeded generator.

    Returns:
        (lam_top, lam_bottom, overlaps): the largest and smallest eigenvalues of ``A + W`` and,
        shape (2, r), the squared overlaps of the top and bottom eigenvectors with ``e_1..e_r``.
    """
    spikes = np.atleast_1d(np.asarray(spikes, dtype=np.float64))
    m = wigner(P, s2, rng)
    m[np.arange(spikes.size), np.arange(spikes.size)] += spikes
    w, v = np.linalg.eigh(m)
    overlaps = v[: spikes.size, [-1, 0]].T ** 2
    return float(w[-1]), float(w[0]), overlaps


def spiked_information_plus_noise(P: int, b: int, lam: float, s2: float, rng: np.random.Generator) -> float:
    """Largest eigenvalue of ``(J + E)(J + E)^T``: the model of Theorem 7.

    ``J = sqrt(lam) e_1 f_1^T`` is (P, b) with ``J J^T`` of rank one and top eigenvalue ``lam``;
    ``E`` is (P, b) with independent N(0, s2 / b) entries, so ``E E^T`` follows Marchenko-Pastur
    with ratio ``c = P / b`` and edges ``s2 (1 +- sqrt(c))^2``. The nonzero spectrum is taken from
    the smaller of the two Gram matrices.
    """
    x = rng.standard_normal((P, b)) * np.sqrt(s2 / b)
    x[0, 0] += np.sqrt(lam)
    gram = x.T @ x if b <= P else x @ x.T
    n = gram.shape[0]
    return float(scipy.linalg.eigh(gram, eigvals_only=True, subset_by_index=[n - 1, n - 1])[0])


def batch_mean_fluctuation(values: np.ndarray, B: int, num_batches: int, rng: np.random.Generator) -> np.ndarray:
    """Batch-minus-full means of a finite data set under sampling without replacement (Eq. 5).

    Args:
        values: (N, K) per-sample values of K matrix elements.
        B: batch size, 1 <= B <= N.
        num_batches: how many independent batches to draw.
        rng: seeded generator.

    Returns:
        (num_batches, K): for each batch, its mean over B distinct samples minus the mean over all N.
    """
    N = values.shape[0]
    full = values.mean(axis=0)
    out = np.empty((num_batches, values.shape[1]))
    for t in range(num_batches):
        idx = rng.choice(N, size=B, replace=False)
        out[t] = values[idx].mean(axis=0) - full
    return out
