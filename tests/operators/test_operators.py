"""Curvature operators against dense float64 truth built with torch.autograd.functional."""
import numpy as np
import pytest
import torch
from torch import nn

import hessfast
from hessfast.utils.model_state import snapshot

import cases

MODES = [("reverse", True), ("reverse", False), ("forward", False)]


@pytest.mark.parametrize("name", ["mlp", "cnn", "bn", "mlp-mse"])
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_dense_matches_truth_and_model_untouched(name, curvature, bn_mode, assert_model_unchanged):
    case = cases.ALL[name]()
    truth = cases.dense_hessian(case, bn_mode) if curvature == "hessian" else cases.dense_ggn(case, bn_mode)
    before = snapshot(case.model)
    for mode, cache in MODES:
        if name == "mlp-mse" and mode == "forward":
            continue  # mse_loss has no forward-over-reverse rule on torch 2.13: tested below
        op = hessfast.CurvatureOperator(case.model, case.batch, curvature=curvature, loss_fn=case.loss_fn,
                                        bn_mode=bn_mode, hvp_mode=mode, cache_graph=cache)
        dense = op.to_dense()
        err = (dense - truth).abs().max() / truth.abs().max()
        assert err < 1e-12, f"{mode}/{cache}: relative error {err:.2e}"
        v = torch.randn(op.P, dtype=torch.float64)
        torch.testing.assert_close(op @ v, truth @ v, rtol=1e-10, atol=1e-12)
    assert_model_unchanged(case.model, before)


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_uneven_loader_equals_one_batch(curvature):
    case = cases.mlp_case(n=40)
    full = hessfast.CurvatureOperator(case.model, case.batch, curvature=curvature).to_dense()
    for cache in (True, False):
        op = hessfast.CurvatureOperator(case.model, case.loader([7, 13, 19, 1]), curvature=curvature,
                                        cache_graph=cache)
        assert op.N == 40
        torch.testing.assert_close(op.to_dense(), full, rtol=1e-12, atol=1e-14)
    # a DataLoader with a short last batch, and a one-shot generator
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(case.x, case.y), batch_size=16)
    torch.testing.assert_close(hessfast.CurvatureOperator(case.model, loader, curvature=curvature).to_dense(),
                               full, rtol=1e-12, atol=1e-14)
    gen = (b for b in case.loader([20, 20]))
    torch.testing.assert_close(hessfast.CurvatureOperator(case.model, gen, curvature=curvature).to_dense(),
                               full, rtol=1e-12, atol=1e-14)


def test_sum_reduction_gives_the_same_mean_curvature():
    case = cases.mlp_case()
    mean = hessfast.HessianOperator(case.model, case.loader([10, 30])).to_dense()
    summed = hessfast.HessianOperator(case.model, case.loader([10, 30]),
                                      loss_fn=nn.CrossEntropyLoss(reduction="sum")).to_dense()
    torch.testing.assert_close(summed, mean, rtol=1e-12, atol=1e-14)


def test_ggn_is_psd_and_equals_hessian_for_linear_model():
    case = cases.linear_case()
    H = hessfast.HessianOperator(case.model, case.batch).to_dense()
    G = hessfast.GGNOperator(case.model, case.batch).to_dense()
    torch.testing.assert_close(G, H, rtol=1e-12, atol=1e-14)
    G_mlp = hessfast.GGNOperator(cases.mlp_case().model, cases.mlp_case().batch).to_dense()
    evals = torch.linalg.eigvalsh(G_mlp)
    assert evals.min() > -1e-12 * evals.max()
    H_mlp = hessfast.HessianOperator(cases.mlp_case().model, cases.mlp_case().batch).to_dense()
    assert torch.linalg.eigvalsh(H_mlp).min() < -1e-3  # the Hessian of a nonlinear net is indefinite


def test_float32_model_float64_option_and_inputs_structures():
    case = cases.mlp_case()
    model32 = case.model.float()
    x32 = case.x.float()
    op64 = hessfast.HessianOperator(model32, (x32, case.y), dtype=torch.float64)
    assert op64.dtype == torch.float64
    truth = cases.dense_hessian(cases.mlp_case())  # same seed, float64 weights
    # the float32 weights are a rounding of the float64 ones: agreement to float32 precision
    assert (op64.to_dense() - truth).abs().max() < 1e-5
    op32 = hessfast.HessianOperator(model32, (x32, case.y))
    assert op32.dtype == torch.float32 and (op32 @ torch.randn(op32.P)).dtype == torch.float32

    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 2).double(), nn.Linear(2, 2).double()

        def forward(self, u, w):
            return self.a(u) + self.b(w)

    m = TwoInputs()
    u, w = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 2, dtype=torch.float64)
    y = torch.randint(0, 2, (10,))
    tup = hessfast.HessianOperator(m, ((u, w), y)).to_dense()
    dct = hessfast.HessianOperator(m, ({"u": u, "w": w}, y)).to_dense()
    torch.testing.assert_close(tup, dct)
    truth = torch.autograd.functional.hessian(
        lambda p: nn.functional.cross_entropy(
            torch.func.functional_call(m, {"a.weight": p[:6].view(2, 3), "a.bias": p[6:8],
                                            "b.weight": p[8:12].view(2, 2), "b.bias": p[12:14]}, (u, w)), y),
        torch.cat([t.detach().reshape(-1) for t in m.parameters()]))
    torch.testing.assert_close(tup, truth)


def test_to_scipy_eigsh_matches_dense():
    from scipy.sparse.linalg import eigsh

    case = cases.mlp_case()
    op = hessfast.HessianOperator(case.model, case.batch)
    top = eigsh(op.to_scipy(), k=3, which="LA", return_eigenvectors=False)
    evals = torch.linalg.eigvalsh(cases.dense_hessian(case)).numpy()
    np.testing.assert_allclose(np.sort(top), evals[-3:], rtol=1e-8)


def test_hvp_mode_auto_reports_a_mode_and_matches():
    case = cases.cnn_case()
    op = hessfast.HessianOperator(case.model, case.batch)
    assert op.hvp_mode in ("reverse", "forward")
    # the documented rule: reverse whenever the curvature has a graph product, cached or not
    assert op.hvp_mode == op.meta()["hvp_mode"] == "reverse" and op.cached
    uncached = hessfast.GGNOperator(case.model, case.batch, cache_graph=False)
    assert uncached.hvp_mode == "reverse" and not uncached.cached
    torch.testing.assert_close(op.to_dense(), cases.dense_hessian(case), rtol=1e-10, atol=1e-12)


def test_forward_mode_failure_names_the_fix():
    case = cases.mlp_case(loss="mse")
    op = hessfast.HessianOperator(case.model, case.batch, loss_fn=case.loss_fn, hvp_mode="forward")
    with pytest.raises(RuntimeError, match="hvp_mode='reverse'"):
        op @ torch.randn(op.P, dtype=torch.float64)


# ---------------------------------------------------------------------- bad input
def test_bad_inputs_raise_clear_errors():
    case = cases.mlp_case()
    frozen = nn.Linear(3, 2)
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        hessfast.HessianOperator(frozen, (torch.randn(4, 3), torch.tensor([0, 1, 0, 1])))
    with pytest.raises(ValueError, match="empty"):
        hessfast.HessianOperator(case.model, [])
    with pytest.raises(TypeError, match=r"\(inputs, targets\)"):
        hessfast.HessianOperator(case.model, [(case.x, case.y, case.y)])
    with pytest.raises(TypeError, match="inputs must be"):
        hessfast.HessianOperator(case.model, [("text", case.y)])
    with pytest.raises(TypeError, match="data must be"):
        hessfast.HessianOperator(case.model, case.x)
    with pytest.raises(TypeError, match="data must be"):
        hessfast.HessianOperator(case.model, 5)
    with pytest.raises(ValueError, match="unknown curvature"):
        hessfast.CurvatureOperator(case.model, case.batch, curvature="kfac")
    with pytest.raises(ValueError, match="unknown bn_mode"):
        hessfast.CurvatureOperator(case.model, case.batch, bn_mode="frozen")
    with pytest.raises(ValueError, match="unknown hvp_mode"):
        hessfast.CurvatureOperator(case.model, case.batch, hvp_mode="fast")
    with pytest.raises(ValueError, match="reduction='mean'"):
        hessfast.CurvatureOperator(case.model, case.batch, loss_fn=nn.CrossEntropyLoss(reduction="none"))
    with pytest.raises(TypeError, match="nn.Module"):
        hessfast.CurvatureOperator(lambda x: x, case.batch)
    op = hessfast.HessianOperator(case.model, case.batch)
    with pytest.raises(ValueError, match=r"shape \(P,\)"):
        op.matvec(torch.randn(op.P + 1, dtype=torch.float64))


def test_data_on_another_device_is_refused():
    case = cases.mlp_case()
    meta_x = case.x.to("meta")
    with pytest.raises(ValueError, match="same device"):
        hessfast.HessianOperator(case.model, (meta_x, case.y))
