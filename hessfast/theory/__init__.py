"""Random-matrix predictions of how mini-batching moves the extreme curvature, and the learning-rate
rules that follow (Granziol, Zohren, Roberts, "Learning Rates as a Function of Batch Size").

Pure functions of floats or numpy arrays (they broadcast); no torch. Notation follows the paper:

* ``P``: number of parameters; ``B``: batch size; ``N``: data-set size (``None`` = sampling from
  the data-generating distribution, Remark 6); ``b = B / (1 - B/N)`` the effective batch size.
* ``sigma2``: for the Hessian (Theorem 4), the per-element variance of a single-sample Hessian,
  ``mean_i ||H_i - H_emp||_F^2 / P^2`` (see ``docs/theory.md`` for how it follows from Hessian-vector
  products); the fluctuation matrix ``H_batch - H_emp`` then has element variance ``sigma2 / b`` and a
  semicircle of radius ``2 sqrt(P sigma2 / b)``. For the GGN (Theorem 7) ``sigma2`` is the variance
  of an entry of the per-sample (transformed) Jacobian; see :func:`ggn_batch_max`.

Every closed form here is checked against a Monte-Carlo simulation of the model it assumes in
``tests/test_theory.py``. Where the printed paper disagrees with the simulation the printed form is
kept as ``variant="paper"``; ``docs/theory.md`` lists the differences with the measured numbers.

Layout: ``batch.py`` (Sections 4-6, the batch spectrum), ``learning_rates.py`` (Sections 10-11 and the
limits used by :func:`hessfast.lr_advice`), ``_checks.py`` (input checks and the result types).
"""
from .batch import batch_extremes, effective_batch, eigvec_overlap, ggn_batch_max
from ._checks import BatchExtremes, LrMomentum
from .learning_rates import (adam_lr_capped, critical_batch_size, lr_momentum_from_spectrum, max_lr_heavy_ball,
                             max_lr_sgd, nesterov, polyak, scale_lr)

__all__ = [
    "BatchExtremes", "LrMomentum", "effective_batch", "batch_extremes", "ggn_batch_max", "eigvec_overlap",
    "critical_batch_size", "max_lr_sgd", "scale_lr", "polyak", "nesterov", "lr_momentum_from_spectrum",
    "max_lr_heavy_ball", "adam_lr_capped",
]
