"""``hvp_mode="fd"``: central differences of gradients (Hessian) and of outputs (GGN), and the automatic fallback."""
import copy
import warnings

import pytest
import torch
from torch import nn

import hessfast
from hessfast.operators import fd_step
from hessfast.utils.model_state import snapshot

import cases


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", ["mlp", "cnn", "bn", "mlp-mse"])
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_fd_against_dense_truth_in_float64(name, curvature):
    case = cases.ALL[name]()
    truth = cases.dense_hessian(case) if curvature == "hessian" else cases.dense_ggn(case)
    before = snapshot(case.model)
    op = hessfast.CurvatureOperator(case.model, case.loader([len(case.y) // 3, len(case.y) - len(case.y) // 3]),
                                    curvature=curvature, loss_fn=case.loss_fn, hvp_mode="fd")
    assert op.hvp_mode == "fd" and not op.cached and op.meta()["hvp_mode"] == "fd"
    V = torch.randn(4, op.P, dtype=torch.float64)
    err = rel(op.matmat(V), V @ truth)
    assert err < 1e-6, err                                     # measured 2e-11 .. 1e-10
    assert rel(op @ V[0], truth @ V[0]) < 1e-6
    cases_untouched = snapshot(case.model)
    for key in ("params", "buffers"):
        assert all(torch.equal(before[key][k], cases_untouched[key][k]) for k in before[key])


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_fd_in_float32_is_within_its_documented_accuracy(curvature):
    case = cases.mlp_case(n=40)
    truth = cases.dense_hessian(case) if curvature == "hessian" else cases.dense_ggn(case)
    model32 = copy.deepcopy(case.model).float()
    V = torch.randn(4, truth.shape[0], dtype=torch.float64)
    fd = hessfast.CurvatureOperator(model32, case.batch, curvature=curvature, hvp_mode="fd")
    err = rel(fd.matmat(V.float()).double(), V @ truth)
    assert 1e-7 < err < 1e-3, err                              # measured 3e-5: eps^(2/3) of float32


def test_the_step_rule():
    w = torch.tensor([0.5, -3.0, 40.0, 0.0], dtype=torch.float64)
    v = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    eps = torch.finfo(torch.float64).eps
    # weights smaller than 1 along v: an absolute step eps^(1/3) / ||v||
    assert fd_step(w, v, torch.float64) == pytest.approx(eps ** (1 / 3))
    assert fd_step(w, 10 * v, torch.float64) == pytest.approx(eps ** (1 / 3) / 10)
    # large weights along v: relative to their size
    u = torch.tensor([0.0, 0.0, 2.0, 0.0], dtype=torch.float64)
    assert fd_step(w, u, torch.float64) == pytest.approx(eps ** (1 / 3) * 40 / 2)
    assert fd_step(w.float(), u.float(), torch.float32) == pytest.approx(torch.finfo(torch.float32).eps ** (1 / 3) * 20)
    # the step scales with 1/||v||, so the product is homogeneous in v up to rounding
    case = cases.mlp_case()
    op = hessfast.HessianOperator(case.model, case.batch, hvp_mode="fd")
    x = torch.randn(op.P, dtype=torch.float64)
    assert rel(op @ (1e-3 * x), 1e-3 * (op @ x)) < 1e-12
    assert torch.equal(op @ torch.zeros(op.P, dtype=torch.float64), torch.zeros(op.P, dtype=torch.float64))


class OnceDifferentiableTanh(torch.autograd.Function):
    """tanh whose backward cannot itself be differentiated (like a fused kernel without a double-backward rule)."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class FusedTanh(nn.Module):
    def forward(self, x):
        return OnceDifferentiableTanh.apply(x)


def test_auto_falls_back_to_fd_when_a_second_derivative_is_missing():
    case = cases.mlp_case(n=30)
    truth = cases.dense_hessian(case)
    model = nn.Sequential(case.model[0], FusedTanh(), case.model[2])
    with pytest.warns(UserWarning, match="finite differences") as record:
        op = hessfast.HessianOperator(model, case.loader([10, 20]))
    assert len(record) == 1 and "\n" not in str(record[0].message)
    assert op.hvp_mode == "fd" and op.meta()["hvp_mode"] == "fd" and "double backward" in op.meta()["hvp_fallback"]
    V = torch.randn(3, op.P, dtype=torch.float64)
    assert rel(op.matmat(V), V @ truth) < 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = hessfast.lanczos(model, case.batch, m=20, seed=0, progress=False)
    assert spec.meta["hvp_mode"] == "fd" and "hvp = fd" in repr(spec)
    # asked for explicitly, the exact modes say what to use instead
    for mode in ("reverse", "forward"):
        with pytest.raises(RuntimeError, match="hvp_mode='fd'"):
            hessfast.HessianOperator(model, case.batch, hvp_mode=mode) @ V[0]
    # a model with every second derivative keeps the exact product
    exact = hessfast.HessianOperator(case.model, case.batch)
    assert exact.hvp_mode == "reverse" and "hvp_fallback" not in exact.meta()


def test_the_fd_ggn_needs_only_first_derivatives_of_the_model():
    case = cases.mlp_case(n=30)
    truth = cases.dense_ggn(case)
    model = nn.Sequential(case.model[0], FusedTanh(), case.model[2])
    V = torch.randn(2, truth.shape[0], dtype=torch.float64)
    with pytest.warns(UserWarning, match="finite differences"):
        auto = hessfast.GGNOperator(model, case.batch)
    for op in (auto, hessfast.GGNOperator(model, case.batch, hvp_mode="fd")):
        assert op.hvp_mode == "fd" and rel(op.matmat(V), V @ truth) < 1e-6
