"""Estimators beyond the spectral density: traces, diagonals and the loss along directions.

* :func:`trace` — Hutchinson, Hutch++ and XTrace estimates of tr(A) with standard errors;
* :func:`diagonal` — Hutchinson and XDiag estimates of diag(A), per coordinate and per parameter;
* :func:`loss_landscape` — the mean loss on a 1-D or 2-D grid along given directions.

They take a curvature operator, ``(model, data)``, or any object of the linear operator protocol
(``matmat``, ``P``, ``dtype``, ``device``); see :mod:`._linear` and docs/estimators.md.
"""
from .diagonal import DiagonalEstimate, diagonal
from .landscape import LossLandscape, loss_landscape
from .trace import TraceEstimate, trace

__all__ = ["trace", "TraceEstimate", "diagonal", "DiagonalEstimate", "loss_landscape", "LossLandscape"]
