"""Matrix-free curvature operators over the model's trainable parameters.

* :mod:`.functional`: :class:`ModelFunction`, the model and loss as functions of the parameters.
* :mod:`.linear`: what every P x P operator derives from its products (``@``, ``to_dense``, ``to_scipy``).
* :mod:`.base`: :class:`CurvatureOperator`, the data loop, graph cache, normalisation, distributed
  reduction and checks, and the registry of curvatures (``operator_class("ggn")``).
* :mod:`.hessian`, :mod:`.ggn`: the Hessian and the GGN, one per-batch product each.
* :mod:`.fisher`: the empirical and the Monte-Carlo Fisher, by per-sample gradients.
* :mod:`.finite_difference`: ``hvp_mode="fd"``, its step rule and the missing-derivative test of ``"auto"``.
* :mod:`.per_sample`, :mod:`.ghost`: per-sample products and ghost norms for the Hessian variance.
"""
from .base import CurvatureOperator, check_curvature, curvatures, operator_class
from .finite_difference import fd_step, missing_derivative
from .functional import ModelFunction, sum_scale
from .modes import HVP_MODES
from .hessian import HessianOperator  # registered first: the default curvature, listed first in errors
from .ggn import GGNOperator  # noqa: I001
from .fisher import EmpiricalFisherOperator, FisherOperator, MonteCarloFisherOperator  # noqa: I001

CURVATURES = curvatures()  # the built-in curvatures: ("hessian", "ggn", "empirical_fisher", "fisher")

__all__ = ["CURVATURES", "HVP_MODES", "CurvatureOperator", "EmpiricalFisherOperator", "FisherOperator", "GGNOperator",
           "HessianOperator", "ModelFunction", "MonteCarloFisherOperator",
           "check_curvature", "curvatures", "fd_step", "missing_derivative", "operator_class", "sum_scale"]
