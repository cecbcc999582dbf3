"""Lanczos against dense float64 eigenvalues; Gauss-quadrature and orthogonality invariants."""
import numpy as np
import pytest
import torch

import hessfast
from hessfast.utils.model_state import snapshot
from hessfast.engine import lanczos_decomposition, probe_vectors

import cases


def _truth(case, curvature, bn_mode="eval"):
    M = cases.dense_hessian(case, bn_mode) if curvature == "hessian" else cases.dense_ggn(case, bn_mode)
    return M, torch.linalg.eigvalsh(M).numpy()


def _rel(a, b):
    return abs(a - b) / abs(b)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_extremes_match_dense_eigenvalues(name, curvature):
    case = cases.ALL[name]()
    _, evals = _truth(case, curvature)
    spec = hessfast.lanczos(case.model, case.batch, m=min(80, len(evals)), curvature=curvature, seed=1,
                            progress=False)
    assert _rel(spec.lambda_max, evals[-1]) <= 1e-8
    full = hessfast.lanczos(case.model, case.batch, m=len(evals), curvature=curvature, seed=2, progress=False)
    assert _rel(full.lambda_max, evals[-1]) <= 1e-8
    if curvature == "hessian":
        assert _rel(full.lambda_min, evals[0]) <= 1e-8
    else:  # PSD: the smallest eigenvalue is ~0, compare on the scale of the spectrum
        assert abs(full.lambda_min - evals[0]) <= 1e-8 * evals[-1]
    assert full.meta["P"] == len(evals) and full.meta["N"] == len(case.y)


def test_bfloat16_basis_keeps_extremes_and_halves_basis():
    """basis_dtype=bfloat16 (float32 compute): extremes within 1e-3 of dense truth (1.7e-4 measured)."""
    case = cases.mlp_case()
    _, evals = _truth(case, "hessian")
    m = min(80, len(evals))
    spec = hessfast.lanczos(case.model, case.batch, m=m, dtype=torch.float32, basis_dtype=torch.bfloat16, seed=1,
                            progress=False)
    assert spec.meta["basis_dtype"] == "bfloat16" and spec.meta["dtype"] == "float32"
    assert _rel(spec.lambda_max, evals[-1]) <= 1e-3
    assert abs(spec.lambda_min - evals[0]) <= 1e-3 * evals[-1]
    np.testing.assert_allclose(spec.weights.sum(1), 1.0, atol=1e-6)
    op = hessfast.HessianOperator(case.model, case.batch, dtype=torch.float32)
    q0 = probe_vectors(1, op.P, 3, torch.float32, op.device)[0]
    res = lanczos_decomposition(op.matvec, q0, 30, keep_basis=True, basis_dtype=torch.bfloat16)
    assert res.basis.dtype == torch.bfloat16 and res.basis.element_size() == 2
    Q = res.basis.double()
    assert float((Q @ Q.T - torch.eye(Q.shape[0], dtype=torch.float64)).abs().max()) <= 1e-2


def test_bfloat16_basis_bad_combinations_say_what_to_do():
    case = cases.mlp_case()
    with pytest.raises(ValueError, match="needs float32 compute"):
        hessfast.lanczos(case.model, case.batch, m=3, dtype=torch.float64, basis_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="not supported"):
        hessfast.lanczos(case.model, case.batch, m=3, basis_dtype=torch.float16)
    with pytest.raises(ValueError, match="reorth='full'"):
        hessfast.lanczos(case.model, case.batch, m=3, dtype=torch.float32, reorth="none", basis_dtype=torch.bfloat16)


def test_loader_spectrum_equals_one_batch_spectrum():
    case = cases.mlp_case()
    a = hessfast.lanczos(case.model, case.loader([9, 31]), m=30, seed=3, progress=False)
    b = hessfast.lanczos(case.model, case.batch, m=30, seed=3, progress=False)
    np.testing.assert_allclose(a.ritz_values, b.ritz_values, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(a.weights, b.weights, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("m", [1, 5, 20])
def test_gauss_quadrature_is_exact_to_degree_2m_minus_1(m):
    case = cases.mlp_case()
    H, _ = _truth(case, "hessian")
    op = hessfast.HessianOperator(case.model, case.batch)
    v = probe_vectors(1, op.P, 11, torch.float64, torch.device("cpu"))[0]
    res = lanczos_decomposition(op.matvec, v, m)
    theta, w = res.ritz()
    u = v / v.norm()
    Hk_u = u.clone()
    for k in range(2 * m):
        exact = float(u @ Hk_u)
        quad = float((w * theta ** k).sum())
        assert abs(quad - exact) <= 1e-8 * max(abs(exact), float(np.max(np.abs(theta))) ** k * 1e-3), (k, quad, exact)
        Hk_u = H @ Hk_u


def test_basis_orthonormal_and_no_ghosts_at_m_equals_P():
    case = cases.mlp_case(loss="mse")  # MSE: no softmax invariances, so all eigenvalues are simple
    H, evals = _truth(case, "hessian")
    op = hessfast.HessianOperator(case.model, case.batch, loss_fn=case.loss_fn)
    q0 = probe_vectors(1, op.P, 5, torch.float64, torch.device("cpu"))[0]
    res = lanczos_decomposition(op.matvec, q0, op.P, keep_basis=True)
    Q = res.basis
    assert torch.linalg.matrix_norm(Q @ Q.T - torch.eye(res.steps, dtype=Q.dtype), ord=2) <= 1e-10
    theta, _ = res.ritz()
    assert res.steps == op.P
    np.testing.assert_allclose(np.sort(theta), evals, atol=1e-9 * np.abs(evals).max())
    # T = Q H Q^T
    T = Q @ H @ Q.T
    np.testing.assert_allclose(np.diag(T.numpy()), res.alpha, atol=1e-10)


def test_breakdown_on_degenerate_spectrum_stops_early_and_finds_distinct_eigenvalues():
    # Cross-entropy Hessian of an MLP: shifting all logits equally changes nothing, so 0 is a
    # multiple eigenvalue and the Krylov space is smaller than P: Lanczos must stop, not divide by 0.
    A = torch.diag(torch.tensor([3.0, 3.0, 3.0, 2.0, 1.0, 1.0, -1.0, 0.5], dtype=torch.float64))
    Qr, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    A = Qr @ A @ Qr.T
    res = lanczos_decomposition(lambda v: A @ v, torch.randn(8, dtype=torch.float64), 8)
    assert res.breakdown and res.steps == 5
    theta, w = res.ritz()
    np.testing.assert_allclose(theta, [-1.0, 0.5, 1.0, 2.0, 3.0], atol=1e-12)
    assert abs(w.sum() - 1) < 1e-12
    spec = hessfast.Spectrum(np.pad(theta, (0, 3), constant_values=np.nan)[None], np.pad(w, (0, 3))[None])
    assert spec.lambda_max == pytest.approx(3.0) and spec.density(np.linspace(-2, 4, 5), 0.5).sum() > 0


def test_reorth_none_shows_ghosts_full_does_not():
    # graded spectrum with well-separated top eigenvalues: plain Lanczos loses orthogonality and
    # produces copies of converged eigenvalues; full reorthogonalisation does not.
    evals = torch.cat([torch.tensor([100.0, 50.0, 20.0]), torch.linspace(0, 1, 297)]).double()
    Qr, _ = torch.linalg.qr(torch.randn(300, 300, dtype=torch.float64))
    A = Qr @ torch.diag(evals) @ Qr.T
    q0 = torch.randn(300, dtype=torch.float64)
    ghosts = lanczos_decomposition(lambda v: A @ v, q0, 120, reorth="none").ritz()[0]
    clean = lanczos_decomposition(lambda v: A @ v, q0, 120, reorth="full").ritz()[0]
    assert np.sum(np.abs(ghosts - 100.0) < 1e-6) >= 2
    assert np.sum(np.abs(clean - 100.0) < 1e-6) == 1


def test_probes_seed_reproducible_and_model_untouched(assert_model_unchanged):
    case = cases.bn_case()
    before = snapshot(case.model)
    for bn_mode in ("eval", "train"):
        for curvature in ("hessian", "ggn"):
            a = hessfast.lanczos(case.model, case.batch, m=10, num_probes=3, seed=7, bn_mode=bn_mode,
                                 curvature=curvature, progress=False)
            b = hessfast.lanczos(case.model, case.batch, m=10, num_probes=3, seed=7, bn_mode=bn_mode,
                                 curvature=curvature, progress=False)
            assert a.ritz_values.shape == (3, 10)
            np.testing.assert_array_equal(a.ritz_values, b.ritz_values)
            assert not np.array_equal(a.ritz_values[0], a.ritz_values[1])
            assert_model_unchanged(case.model, before)
    assert a.meta["bn_mode"] == "train" and a.meta["seed"] == 7


def test_lanczos_bad_inputs():
    case = cases.mlp_case()
    P = sum(p.numel() for p in case.model.parameters())
    with pytest.raises(ValueError, match="at least 1"):
        hessfast.lanczos(case.model, case.batch, m=0)
    with pytest.raises(ValueError, match="exceeds the number of parameters"):
        hessfast.lanczos(case.model, case.batch, m=P + 1)
    with pytest.raises(TypeError, match="integer"):
        hessfast.lanczos(case.model, case.batch, m=2.5)
    with pytest.raises(ValueError, match="num_probes"):
        hessfast.lanczos(case.model, case.batch, m=3, num_probes=0)
    with pytest.raises(ValueError, match="unknown reorth"):
        hessfast.lanczos(case.model, case.batch, m=3, reorth="partial")
    with pytest.raises(TypeError, match="needs data"):
        hessfast.lanczos(case.model, m=3)


def test_nan_in_product_names_the_step():
    case = cases.mlp_case()
    x = case.x.clone()
    x[3, 1] = float("nan")
    with pytest.raises(hessfast.NonFiniteError, match="step 0"):
        hessfast.lanczos(case.model, (x, case.y), m=5, progress=False)
    calls = []

    d = torch.arange(1.0, 11.0, dtype=torch.float64)

    def matvec(v):
        calls.append(1)
        return d * v * (float("inf") if len(calls) == 4 else 1.0)

    with pytest.raises(ValueError, match="step 3"):
        lanczos_decomposition(matvec, torch.randn(10, dtype=torch.float64), 6)


def test_basis_memory_is_checked_before_allocating(monkeypatch):
    from hessfast.utils import memory as lz

    case = cases.mlp_case()
    monkeypatch.setattr(lz, "available_memory", lambda device: 1000)
    with pytest.raises(hessfast.BasisMemoryError, match="Reduce m"):
        hessfast.lanczos(case.model, case.batch, m=10, progress=False)
    # reorth='none' keeps three vectors and needs no basis
    spec = hessfast.lanczos(case.model, case.batch, m=10, reorth="none", progress=False)
    assert np.isfinite(spec.lambda_max)
