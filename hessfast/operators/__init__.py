"""Matrix-free curvature operators over the model's trainable parameters (see :mod:`.base`)."""
from .base import CURVATURES, HVP_MODES, CurvatureOperator, GGNOperator, HessianOperator, check_curvature, sum_scale

__all__ = ["CURVATURES", "HVP_MODES", "CurvatureOperator", "GGNOperator", "HessianOperator", "check_curvature",
           "sum_scale"]
