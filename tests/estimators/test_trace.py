"""hessfast.trace: Hutchinson, Hutch++ and XTrace against dense float64 truth, with calibrated error bars."""
import json

import numpy as np
import pytest
import torch

import cases
import hessfast
from hessfast.estimators.trace_estimators import xtrace_terms
from hessfast.utils.model_state import snapshot


def rotated(evals, seed=0):
    """Q diag(evals) Q^T for a seeded random orthogonal Q (float64)."""
    evals = torch.as_tensor(evals, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(evals), len(evals), generator=g, dtype=torch.float64))
    return Q @ torch.diag(evals) @ Q.T


def low_rank_plus_noise(P=200, rank=10, noise=1e-2, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    top = torch.linspace(10.0, 1.0, rank, dtype=torch.float64)
    return rotated(torch.cat([top, noise * torch.rand(P - rank, generator=g, dtype=torch.float64)]), seed)


METHODS = ["hutchinson", "hutch++", "xtrace"]


@pytest.fixture(scope="module")
def mlp_hessian():
    case = cases.mlp_case()
    op = hessfast.CurvatureOperator(case.model, case.batch, loss_fn=case.loss_fn, dtype=torch.float64)
    return case, op, float(torch.trace(cases.dense_hessian(case)))


@pytest.mark.parametrize("method", METHODS)
def test_unbiased_on_a_model_hessian(mlp_hessian, method):
    # 30 seeds of 30 products each on the P = 75 MLP Hessian; the mean of the estimates must lie within
    # 4 standard errors of the dense trace, the standard error of the mean taken from the reported ones.
    _, op, exact = mlp_hessian
    res = [hessfast.trace(op, num_matvecs=30, method=method, seed=s) for s in range(30)]
    est = np.array([r.estimate for r in res])
    se_mean = np.sqrt(np.sum([r.stderr ** 2 for r in res])) / len(res)
    assert abs(est.mean() - exact) <= 4 * se_mean, (est.mean(), exact, se_mean)
    assert all(r.num_matvecs == 30 and r.method == method for r in res)


def test_model_and_data_build_the_operator_and_the_model_is_untouched():
    case = cases.bn_case()
    data = case.loader([10, 13, 9])
    case.model[4].weight.grad = torch.full_like(case.model[4].weight, 0.5)
    before = snapshot(case.model)
    exact = float(torch.trace(cases.dense_ggn(case)))
    res = hessfast.trace(case.model, data, num_matvecs=40, method="xtrace", seed=3, curvature="ggn",
                         loss_fn=case.loss_fn, dtype=torch.float64)
    assert abs(res.estimate - exact) <= 4 * res.stderr
    P = sum(p.numel() for p in case.model.parameters() if p.requires_grad)
    assert res.meta["curvature"] == "ggn" and res.meta["N"] == 32 and res.meta["P"] == P
    after = snapshot(case.model)
    for key in ("params", "buffers", "grads"):
        assert all(torch.equal(before[key][n], after[key][n]) for n in before[key] if before[key][n] is not None)
    assert before["requires_grad"] == after["requires_grad"] and before["training"] == after["training"]


def test_hutchpp_and_xtrace_beat_hutchinson_on_a_low_rank_operator():
    # rank 10 with eigenvalues 10..1 plus noise of size 1e-2 on P = 200: a sketch of 13 (Hutch++) or
    # 20 (XTrace) vectors captures the top, leaving only the noise; Hutchinson sees all of ||A||_F.
    op = cases.DenseOperator(low_rank_plus_noise())
    exact = float(torch.trace(op.A))
    mae = {m: np.mean([abs(hessfast.trace(op, num_matvecs=40, method=m, seed=s).estimate - exact)
                       for s in range(30)]) for m in METHODS}
    assert mae["hutch++"] < 0.05 * mae["hutchinson"], mae
    assert mae["xtrace"] < 0.05 * mae["hutchinson"], mae


@pytest.mark.parametrize("spectrum", ["low_rank", "flat", "decaying"])
@pytest.mark.parametrize("method", METHODS)
def test_stderr_is_calibrated(method, spectrum):
    # z = (estimate - truth) / stderr over 200 seeds at 40 products. For a calibrated standard error
    # the median |z| is about 0.67 (normal) to 0.72 (Student t with 13-19 degrees of freedom);
    # stated band 0.5-1.0. XTrace's error estimate is a heuristic (its terms are correlated): it runs
    # up to 1.4x low, which the band admits; 2x low or high would fail.
    P = 200
    g = torch.Generator().manual_seed(7)
    evals = {"low_rank": None, "flat": torch.randn(P, generator=g, dtype=torch.float64),
             "decaying": 1.0 / torch.arange(1, P + 1, dtype=torch.float64) ** 1.5}[spectrum]
    A = low_rank_plus_noise(P) if evals is None else rotated(evals, seed=2)
    op, exact = cases.DenseOperator(A), float(torch.trace(A))
    z = []
    for s in range(200):
        r = hessfast.trace(op, num_matvecs=40, method=method, seed=s)
        z.append((r.estimate - exact) / r.stderr)
    med = float(np.median(np.abs(z)))
    assert 0.5 <= med <= 1.0, med
    assert abs(np.mean(z)) <= 4 * np.std(z) / np.sqrt(len(z))  # unbiased, at 4 standard errors


def test_interval_covers_at_its_level():
    op = cases.DenseOperator(rotated(torch.linspace(-1, 3, 120), seed=4))
    exact = float(torch.trace(op.A))
    cover = np.mean([lo <= exact <= hi for lo, hi in
                     (hessfast.trace(op, num_matvecs=20, method="hutchinson", seed=s).interval(0.9)
                      for s in range(300))])
    # binomial(300, 0.9): standard deviation 0.017; 4 of them either side
    assert 0.83 <= cover <= 0.97, cover


def test_xtrace_terms_match_their_definition():
    # t_i = tr(Q_(i)^T A Q_(i)) + w_i^T (I - Q_(i)Q_(i)^T) A (I - Q_(i)Q_(i)^T) w_i, with Q_(i) an
    # orthonormal basis of A Omega without column i, built here directly for each i.
    P, s = 60, 7
    A = rotated(torch.linspace(-2, 5, P), seed=1)
    g = torch.Generator().manual_seed(0)
    Om = torch.randint(0, 2, (s, P), generator=g).double() * 2 - 1
    Y = Om @ A
    Q, R = torch.linalg.qr(Y.T)
    Qr, Z = Q.T, Q.T @ A
    t = xtrace_terms(R, Qr @ Z.T, Qr @ Om.T, Z @ Om.T, (Om * Y).sum(1))
    for i in range(s):
        Qi, _ = torch.linalg.qr(torch.cat([Y[:i], Y[i + 1:]]).T)
        Pi = torch.eye(P, dtype=torch.float64) - Qi @ Qi.T
        direct = torch.trace(Qi.T @ A @ Qi) + Om[i] @ Pi @ A @ Pi @ Om[i]
        assert float(t[i]) == pytest.approx(float(direct), rel=1e-10, abs=1e-10)


def test_xtrace_handles_an_exactly_rank_deficient_sketch():
    # rank 3 < 10 test vectors: Y = A Omega is singular, R has zero pivots; the trace is then found exactly.
    A = rotated(torch.cat([torch.tensor([5.0, 2.0, 1.0]), torch.zeros(47)]), seed=3)
    res = hessfast.trace(cases.DenseOperator(A), num_matvecs=20, method="xtrace", seed=0)
    assert res.estimate == pytest.approx(8.0, abs=1e-8)


@pytest.mark.parametrize("method", METHODS)
def test_budget_of_P_or_more_gives_the_exact_trace(method):
    A = rotated(torch.linspace(-1, 2, 31), seed=5)
    op = cases.DenseOperator(A)
    res = hessfast.trace(op, num_matvecs=40, method=method)
    assert res.method == "exact" and res.num_matvecs == 31 == op.products and res.stderr == 0
    assert res.estimate == pytest.approx(float(torch.trace(A)), abs=1e-12)
    assert json.loads(json.dumps(res.to_dict()))["estimate"] == res.estimate


@pytest.mark.parametrize("method,used", [("hutchinson", 41), ("hutch++", 41), ("xtrace", 40)])
def test_products_counted_and_independent_of_the_block_size(method, used):
    A = rotated(torch.linspace(0, 3, 97), seed=6)
    one, many = cases.DenseOperator(A), cases.DenseOperator(A)
    a = hessfast.trace(one, num_matvecs=41, method=method, seed=11, max_block=1)
    b = hessfast.trace(many, num_matvecs=41, method=method, seed=11, max_block=7)
    assert a.num_matvecs == b.num_matvecs == used == one.products == many.products
    assert a.estimate == pytest.approx(b.estimate, rel=1e-12)


def test_bad_input_is_refused_with_what_to_do(mlp_hessian):
    case, op, _ = mlp_hessian
    with pytest.raises(ValueError, match="unknown method"):
        hessfast.trace(op, method="hutch+")
    with pytest.raises(ValueError, match="num_matvecs >= 4"):
        hessfast.trace(op, num_matvecs=3, method="xtrace")
    with pytest.raises(ValueError, match="not an operator and data"):
        hessfast.trace(op, case.batch)
    with pytest.raises(TypeError, match="needs data"):
        hessfast.trace(case.model)
    with pytest.raises(TypeError, match="lacks"):
        hessfast.trace(torch.eye(3))
    with pytest.raises(ValueError, match="only apply when the operator is built"):
        hessfast.trace(op, bn_mode="train")
    with pytest.raises(ValueError, match="curvature='ggn' but the operator passed is the 'hessian'"):
        hessfast.trace(op, curvature="ggn")

    class Broken(cases.DenseOperator):
        def matmat(self, V):
            out = super().matmat(V)
            out[0, 0] = float("nan")
            return out

    with pytest.raises(hessfast.NonFiniteError, match="NaN or Inf"):
        hessfast.trace(Broken(torch.eye(5, dtype=torch.float64)), num_matvecs=4)


def test_probes_are_the_same_on_every_device_and_dtype():
    # Rademacher entries are drawn on the CPU: a float32 operator sees exactly the float64 probes' signs.
    A = rotated(torch.linspace(0, 1, 50), seed=8)
    a = hessfast.trace(cases.DenseOperator(A), num_matvecs=10, method="hutchinson", seed=2)
    b = hessfast.trace(cases.DenseOperator(A.float()), num_matvecs=10, method="hutchinson", seed=2)
    np.testing.assert_allclose(a.samples, b.samples, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", METHODS)
def test_cuda_operator_gives_the_cpu_estimate(method):
    # the probes come from the CPU generator, so only the arithmetic differs between the devices
    A = rotated(torch.linspace(-1, 4, 300), seed=10)
    cpu = hessfast.trace(cases.DenseOperator(A), num_matvecs=40, method=method, seed=4)
    gpu = hessfast.trace(cases.DenseOperator(A.cuda()), num_matvecs=40, method=method, seed=4)
    assert gpu.estimate == pytest.approx(cpu.estimate, rel=1e-9) and gpu.stderr == pytest.approx(cpu.stderr, rel=1e-7)
