"""Estimators beyond the spectral density: traces, diagonals and the loss along directions.

* :func:`trace` — Hutchinson, Hutch++ and XTrace estimates of tr(A) with standard errors;
* :func:`diagonal` — Hutchinson and XDiag estimates of diag(A), per coordinate and per parameter;
* :func:`loss_landscape` — the mean loss on a 1-D or 2-D grid along given directions;
* :func:`eigenpairs` — the k extreme eigenpairs by thick-restart block Lanczos;
* :func:`block_spectra` — the spectrum of every diagonal block H_bb (per module, parameter or group) in one call.

They take a curvature operator, ``(model, data)``, or any object of the linear operator protocol
(``matmat``, ``P``, ``dtype``, ``device``); see :mod:`._linear` and docs/estimators.md.
"""
from .blocks import BlockSpectra, block_spectra, plot_block_spectra
from .diagonal_estimators import DiagonalEstimate, diagonal
from .eigensolver import Eigenpairs, eigenpairs
from .landscape import LossLandscape, loss_landscape
from .trace_estimators import TraceEstimate, trace

__all__ = ["trace", "TraceEstimate", "diagonal", "DiagonalEstimate", "loss_landscape", "LossLandscape",
           "eigenpairs", "Eigenpairs", "block_spectra", "BlockSpectra", "plot_block_spectra"]
