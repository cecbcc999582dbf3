"""hessfast.diagonal: Hutchinson and XDiag against the dense float64 diagonal, per coordinate and per parameter."""
import numpy as np
import pytest
import torch

import cases
import hessfast
from hessfast.utils.model_state import snapshot


def rotated(evals, seed=0):
    evals = torch.as_tensor(evals, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(evals), len(evals), generator=g, dtype=torch.float64))
    return Q @ torch.diag(evals) @ Q.T


@pytest.fixture(scope="module")
def mlp_ggn():
    case = cases.mlp_case()
    op = hessfast.CurvatureOperator(case.model, case.batch, curvature="ggn", loss_fn=case.loss_fn,
                                    dtype=torch.float64)
    return case, op, torch.diag(cases.dense_ggn(case))


@pytest.mark.parametrize("method", ["hutchinson", "xdiag"])
def test_unbiased_per_coordinate_on_a_model_ggn(mlp_ggn, method):
    # 30 seeds of 30 products on the P = 75 MLP GGN. Per coordinate, z = (mean of the estimates -
    # truth) / (their spread / sqrt(30)) is about Student-t with 29 degrees of freedom if unbiased: the
    # sum of z^2 over the 75 coordinates is then about chi-square(75) (mean 77, sd 13); bound mean + 5 sd.
    # A bias of half a standard error per coordinate would add 75 * 0.25 * 30 to it.
    _, op, exact = mlp_ggn
    est = torch.stack([hessfast.diagonal(op, num_matvecs=30, method=method, seed=s).estimate for s in range(30)])
    z = (est.mean(0) - exact) / (est.std(0) / np.sqrt(len(est)))
    assert float((z ** 2).sum()) <= 77 + 5 * 13, float((z ** 2).sum())
    assert float(z.abs().max()) <= 5.0


def test_xdiag_beats_hutchinson_on_a_low_rank_operator():
    g = torch.Generator().manual_seed(3)
    evals = torch.cat([torch.linspace(10, 1, 8, dtype=torch.float64), 1e-2 * torch.rand(192, generator=g,
                                                                                       dtype=torch.float64)])
    op = cases.DenseOperator(rotated(evals, seed=1))
    exact = torch.diag(op.A)
    err = {m: np.mean([float((hessfast.diagonal(op, num_matvecs=40, method=m, seed=s).estimate - exact).abs().mean())
                       for s in range(30)]) for m in ("hutchinson", "xdiag")}
    assert err["xdiag"] < 0.05 * err["hutchinson"], err


@pytest.mark.parametrize("method,band", [("hutchinson", (0.55, 0.8)), ("xdiag", (0.55, 1.0))])
def test_stderr_per_coordinate_is_calibrated(method, band):
    # Over 40 seeds and 200 coordinates, median |z| of (estimate - truth) / stderr is 0.67 for a
    # calibrated error bar (0.69 for Student t with 19 degrees of freedom). Hutchinson's per-coordinate
    # error bar is exact in expectation; XDiag's leave-one-out estimate is a heuristic that runs up to
    # 1.4x low (median |z| up to 0.9 measured), hence its wider band.
    A = rotated(1.0 / torch.arange(1, 201, dtype=torch.float64), seed=9)
    op, exact = cases.DenseOperator(A), torch.diag(A)
    z = torch.cat([(lambda r: (r.estimate - exact) / r.stderr)(hessfast.diagonal(op, num_matvecs=40, method=method,
                                                                                   seed=s)) for s in range(40)])
    med = float(z.abs().median())
    assert band[0] <= med <= band[1], med


def test_as_parameters_splits_like_the_model_and_exact_budget_is_exact():
    case = cases.mlp_case()
    case.model[0].weight.grad = torch.ones_like(case.model[0].weight)
    before = snapshot(case.model)
    res = hessfast.diagonal(case.model, case.loader([15, 25]), num_matvecs=100, loss_fn=case.loss_fn)
    assert res.method == "exact" and res.num_matvecs == 75
    exact = torch.diag(cases.dense_hessian(case))
    torch.testing.assert_close(res.estimate, exact, rtol=1e-10, atol=1e-12)
    parts = res.as_parameters()
    start = 0
    for name, p in case.model.named_parameters():
        assert parts[name].shape == p.shape
        torch.testing.assert_close(parts[name].reshape(-1), exact[start:start + p.numel()], rtol=1e-10, atol=1e-12)
        start += p.numel()
    assert all(torch.equal(v, 0 * v) for v in res.as_parameters("stderr").values())
    after = snapshot(case.model)
    assert all(torch.equal(before["params"][n], after["params"][n]) for n in before["params"])
    assert torch.equal(before["grads"]["0.weight"], after["grads"]["0.weight"])


def test_as_parameters_skips_frozen_parameters():
    case = cases.bn_case()  # model[0].bias is frozen
    res = hessfast.diagonal(case.model, case.batch, num_matvecs=10, method="hutchinson", loss_fn=case.loss_fn)
    parts = res.as_parameters()
    assert "0.bias" not in parts and parts["0.weight"].shape == (6, 4)
    assert sum(t.numel() for t in parts.values()) == res.estimate.numel()


def test_protocol_operator_without_names_has_a_flat_result_only():
    res = hessfast.diagonal(cases.DenseOperator(torch.eye(30, dtype=torch.float64)), num_matvecs=10, seed=1)
    assert res.estimate.shape == (30,) and res.stderr.shape == (30,)
    with pytest.raises(ValueError, match="gives no parameter names"):
        res.as_parameters()


def test_xdiag_exact_on_a_matrix_of_rank_below_the_sketch():
    # rank 4 < 10 test vectors: the sketch spans the range, so diag(QQ^T A) is diag(A) and the rest is 0
    A = rotated(torch.cat([torch.tensor([4.0, 3.0, 2.0, 1.0]), torch.zeros(56)]), seed=2)
    res = hessfast.diagonal(cases.DenseOperator(A), num_matvecs=20, method="xdiag")
    torch.testing.assert_close(res.estimate, torch.diag(A), rtol=0, atol=1e-10)


def test_float32_operator_matches_float64_to_its_precision():
    A = rotated(torch.linspace(0.1, 2, 80), seed=4)
    a = hessfast.diagonal(cases.DenseOperator(A), num_matvecs=30, seed=5).estimate
    b = hessfast.diagonal(cases.DenseOperator(A.float()), num_matvecs=30, seed=5).estimate
    assert float((a - b).abs().max()) <= 1e-5 * float(a.abs().max())


def test_bad_input_is_refused():
    op = cases.DenseOperator(torch.eye(12, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown method"):
        hessfast.diagonal(op, method="xtrace")
    with pytest.raises(ValueError, match="num_matvecs >= 2"):
        hessfast.diagonal(op, num_matvecs=1, method="hutchinson")
    with pytest.raises(TypeError, match="num_matvecs must be an int"):
        hessfast.diagonal(op, num_matvecs=10.0)
    with pytest.raises(ValueError, match="max_block"):
        hessfast.diagonal(op, num_matvecs=4, max_block=0)
    res = hessfast.diagonal(op, num_matvecs=4)
    with pytest.raises(ValueError, match="'estimate' or 'stderr'"):
        res.as_parameters("variance")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["hutchinson", "xdiag"])
def test_cuda_operator_gives_the_cpu_estimate(method):
    A = rotated(torch.linspace(0, 4, 300), seed=10)
    cpu = hessfast.diagonal(cases.DenseOperator(A), num_matvecs=40, method=method, seed=4)
    gpu = hessfast.diagonal(cases.DenseOperator(A.cuda()), num_matvecs=40, method=method, seed=4)
    assert gpu.estimate.device.type == "cpu"
    torch.testing.assert_close(gpu.estimate, cpu.estimate, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gpu.stderr, cpu.stderr, rtol=1e-7, atol=1e-12)
