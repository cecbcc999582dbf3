"""hessfast: fast curvature spectra of neural networks.

Stochastic Lanczos quadrature of the Hessian and Generalised Gauss-Newton matrix of any PyTorch
model, the Hessian variance and the random-matrix predictions of how mini-batching broadens the
spectrum (Granziol, Zohren, Roberts: "Learning Rates as a Function of Batch Size").
"""
from ._version import __version__
from .engine import BasisMemoryError, LanczosResult, NonFiniteError, lanczos_decomposition
from .slq import lanczos
from .operators import CurvatureOperator, EmpiricalFisherOperator, FisherOperator, GGNOperator, HessianOperator, \
    MonteCarloFisherOperator
from .spectrum import Degeneracy, SpectralEstimate, Spectrum
from . import theory
from .theory import scale_lr
from .variance import HessianVariance, hessian_variance
from .prediction import Prediction, predict
from .advice import LRAdvice, lr_advice
from .tuner import CurvatureTuner
from .estimators import DiagonalEstimate, LossLandscape, TraceEstimate, diagonal, loss_landscape, trace
from .estimators import BlockSpectra, Eigenpairs, block_spectra, eigenpairs, plot_block_spectra


def backends() -> dict:
    """What kernel backends are compiled and usable here, and why not where they are not."""
    from .kernels import backends as _backends

    return _backends()


__all__ = [
    "__version__", "lanczos", "lanczos_decomposition", "LanczosResult", "Spectrum", "Degeneracy",
    "CurvatureOperator", "HessianOperator", "GGNOperator", "FisherOperator", "EmpiricalFisherOperator",
    "MonteCarloFisherOperator", "NonFiniteError", "BasisMemoryError", "backends",
    "theory", "scale_lr", "hessian_variance", "HessianVariance", "predict", "Prediction", "CurvatureTuner",
    "lr_advice", "LRAdvice",
    "trace", "TraceEstimate", "diagonal", "DiagonalEstimate", "loss_landscape", "LossLandscape", "SpectralEstimate",
    "eigenpairs", "Eigenpairs", "block_spectra", "BlockSpectra", "plot_block_spectra",
]
