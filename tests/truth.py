"""Truth in extended precision for the kernel tests, and the rule a backend's error is judged by.

The truth of an op is the op evaluated on the same inputs in numpy's longdouble (80-bit extended
precision on x86-64: exact float64 products, 11 more bits than float64 in the sums), so it is truth
for float64 inputs too. A backend may be at most twice as far from it as the pure-PyTorch reference
run in the inputs' precision, plus a floor of ``FLOOR_EPS`` eps (:func:`assert_near_truth`).
"""
import numpy as np
import torch

LD = np.longdouble  # where longdouble is float64 (e.g. macOS arm64) float64 cases fall to the FLOOR_EPS floor

# Loose bounds on the reference's own relative error: the yardstick must itself be accurate.
REF_SANE = {torch.float32: 1e-5, torch.float64: 1e-13}
FLOOR_EPS = 5  # the floor of assert_near_truth, in eps of the inputs' dtype (backends here stay below 3)


def ld(t):
    """A tensor's values as a numpy longdouble array (exact: float32, float64 and bfloat16 embed)."""
    return t.detach().to("cpu", torch.float64).numpy().astype(LD) if isinstance(t, torch.Tensor) else t


def rel(a, b, scale=None):
    """||a - b|| / scale (default ||b||), in longdouble; a and b tensors or longdouble arrays."""
    a, b = ld(a), ld(b)
    d = float(np.sqrt(((a - b) ** 2).sum()))
    s = float(np.sqrt((b ** 2).sum())) if scale is None else float(scale)
    return d / max(s, 1e-300)


def assert_near_truth(what, backend_err, ref_err, dtype):
    """The flash-attention rule: a backend's relative error against the truth is at most twice the
    same-precision reference's, plus FLOOR_EPS eps for outputs the reference gets (nearly) exactly."""
    eps = torch.finfo(dtype).eps
    assert ref_err <= REF_SANE[dtype], f"{what}: the reference itself is off by {ref_err:.3g}"
    bound = 2 * ref_err + FLOOR_EPS * eps
    assert backend_err <= bound, (f"{what}: error {backend_err:.3g} against the truth exceeds 2 x the "
                                  f"{dtype} reference's {ref_err:.3g} + {FLOOR_EPS} eps = {bound:.3g}")
