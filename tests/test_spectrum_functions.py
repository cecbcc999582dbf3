"""Spectrum.trace / frobenius2 / logdet / effective_rank (stochastic Lanczos quadrature) against dense truth."""
import math

import numpy as np
import pytest
import torch

import cases
import hessfast


def rotated(evals, seed=0):
    evals = np.asarray(evals, dtype=np.float64)
    Q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((len(evals), len(evals))))
    return Q @ np.diag(evals) @ Q.T


def gauss_quadrature(A, v, m):
    """Ritz values and weights of m Lanczos steps (full reorthogonalisation) on A from v, in numpy."""
    Q = np.zeros((m, len(v)))
    alpha, beta = np.zeros(m), np.zeros(m)
    q = v / np.linalg.norm(v)
    for j in range(m):
        Q[j] = q
        w = A @ q
        alpha[j] = q @ w
        w -= Q[: j + 1].T @ (Q[: j + 1] @ w)
        w -= Q[: j + 1].T @ (Q[: j + 1] @ w)
        beta[j] = np.linalg.norm(w)
        q = w / beta[j]
    T = np.diag(alpha) + np.diag(beta[:-1], 1) + np.diag(beta[:-1], -1)
    theta, S = np.linalg.eigh(T)
    return theta, S[0] ** 2


def spectrum_of(A, m, num_probes, seed):
    rng = np.random.default_rng(seed)
    pairs = [gauss_quadrature(A, rng.standard_normal(len(A)), m) for _ in range(num_probes)]
    return hessfast.Spectrum([p[0] for p in pairs], [p[1] for p in pairs], {"P": len(A), "curvature": "ggn"})


def log_bias_bound(P, m, lo, hi, shift):
    """P x a bound on the m-point Gauss quadrature error of log(x + shift) for a probability measure
    on [lo, hi]: |error| <= 2 min_p ||f - p||, p of degree 2m - 1, and for f analytic inside the
    Bernstein ellipse E_rho of [lo, hi] with |f| <= M there, ||f - p|| <= 2 M rho^(1-2m) / (rho - 1)
    (Trefethen, Approximation Theory and Approximation Practice, Theorem 8.2)."""
    c, h = (lo + hi) / 2, (hi - lo) / 2
    t0 = (c + shift) / h                       # the singularity at x = -shift, in units of the interval
    rho0 = t0 + math.sqrt(t0 * t0 - 1)
    best = math.inf
    for rho in np.linspace(1 + 1e-6, rho0 - 1e-9, 2000)[1:]:
        semi = (rho + 1 / rho) / 2
        M = max(abs(math.log(h * (t0 - semi))), abs(math.log(h * (t0 + semi)))) + math.pi
        best = min(best, 4 * M * rho ** (1 - 2 * m) / (rho - 1))
    return P * best


@pytest.fixture(scope="module")
def ggn_model():
    case = cases.mlp_case()
    G = cases.dense_ggn(case).numpy()
    op = hessfast.CurvatureOperator(case.model, case.batch, curvature="ggn", loss_fn=case.loss_fn,
                                    dtype=torch.float64)
    return G, hessfast.lanczos(op, m=40, num_probes=12, seed=0, progress=False)


def test_trace_and_frobenius_of_a_model_ggn_within_their_error_bars(ggn_model):
    G, spec = ggn_model
    ev = np.linalg.eigvalsh(G)
    for got, exact in ((spec.trace(), ev.sum()), (spec.frobenius2(), (ev ** 2).sum())):
        assert abs(got.estimate - exact) <= 4 * got.stderr, (got, exact)
        assert 0 < got.stderr < 0.5 * abs(exact)


def test_logdet_and_effective_rank_of_a_model_ggn_within_error_bars_plus_bias(ggn_model):
    G, spec = ggn_model
    ev = np.clip(np.linalg.eigvalsh(G), 0, None)
    for shift in (1e-2, 1e-1):
        got = spec.logdet(shift=shift)
        bias = log_bias_bound(len(ev), spec.m, 0.0, ev.max(), shift)
        assert bias < 0.1 * got.stderr  # m = 40 is enough for these shifts: the bias is negligible
        assert abs(got.estimate - np.log(ev + shift).sum()) <= 4 * got.stderr + bias
    got = spec.effective_rank(shift=0.05)
    exact = (ev / (ev + 0.05)).sum()
    assert abs(got.estimate - exact) <= 4 * got.stderr
    default = spec.effective_rank()
    assert default == spec.effective_rank(shift=0.01 * spec.lambda_max)


def test_unbiased_and_calibrated_over_seeds():
    # 60 independent spectra of 4 probes on a graded PSD spectrum: the mean estimate lies within 4
    # standard errors of the truth and z = (estimate - truth) / stderr has median |z| in 0.5-1.0
    # (Student t with 3 degrees of freedom: 0.77; normal 0.67).
    ev = np.concatenate([[8.0, 5.0, 3.0], np.random.default_rng(1).uniform(0, 1, 117)])
    A = rotated(ev, seed=2)
    exact = {"trace": ev.sum(), "frobenius2": (ev ** 2).sum(), "logdet": np.log(ev + 0.1).sum(),
             "effective_rank": (ev / (ev + 0.5)).sum()}
    calls = {"trace": lambda s: s.trace(), "frobenius2": lambda s: s.frobenius2(),
             "logdet": lambda s: s.logdet(shift=0.1), "effective_rank": lambda s: s.effective_rank(shift=0.5)}
    results = {k: [] for k in exact}
    for seed in range(60):
        spec = spectrum_of(A, 25, 4, seed)
        for k, f in calls.items():
            results[k].append(f(spec))
    for k, res in results.items():
        est = np.array([r.estimate for r in res])
        se = np.array([r.stderr for r in res])
        assert abs(est.mean() - exact[k]) <= 4 * np.sqrt((se ** 2).sum()) / len(res), k
        assert 0.5 <= np.median(np.abs((est - exact[k]) / se)) <= 1.0, k


def test_quadrature_is_exact_per_probe_for_trace_and_frobenius():
    # One probe v: P sum_l w_l theta_l = P v^T A v / v^T v and P sum_l w_l theta_l^2 = P |A v|^2 / v^T v.
    A = rotated(np.linspace(-2.0, 3.0, 50), seed=3)
    v = np.random.default_rng(4).standard_normal(50)
    theta, w = gauss_quadrature(A, v, 3)
    spec = hessfast.Spectrum([theta], [w], {"P": 50})
    assert spec.trace().estimate == pytest.approx(50 * v @ A @ v / (v @ v), rel=1e-12)
    assert spec.frobenius2().estimate == pytest.approx(50 * (A @ v) @ (A @ v) / (v @ v), rel=1e-12)
    assert math.isnan(spec.trace().stderr)  # one probe: no spread to measure
    est, err = spec.trace()  # a (estimate, stderr) pair
    assert est == spec.trace().estimate


def test_logdet_refuses_ritz_values_below_minus_shift():
    spec = hessfast.Spectrum([[-0.3, 0.1, 2.0]], [[0.2, 0.5, 0.3]], {"P": 10, "curvature": "hessian"})
    with pytest.raises(ValueError, match="-0.3 <= -shift"):
        spec.logdet(shift=0.0)
    with pytest.raises(ValueError, match="shift > 0.3"):
        spec.logdet(shift=0.3)
    assert spec.logdet(shift=1.0).estimate == pytest.approx(10 * (0.2 * math.log(0.7) + 0.5 * math.log(1.1)
                                                                  + 0.3 * math.log(3.0)), rel=1e-12)
    with pytest.raises(ValueError, match="-shift"):
        spec.effective_rank(shift=0.2)
    with pytest.raises(ValueError, match="shift must be > 0"):
        spec.effective_rank(shift=-1.0)


def test_needs_P_and_survives_json_and_padding(tmp_path):
    with pytest.raises(ValueError, match="meta\\['P'\\]"):
        hessfast.Spectrum([[1.0, 2.0]], [[0.5, 0.5]]).trace()
    # a probe that stopped early is padded with NaN (weight 0); the functions use its real steps only
    spec = hessfast.Spectrum([[1.0, 2.0, np.nan], [1.0, 3.0, 4.0]], [[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]], {"P": 4})
    # per probe 4 * (0.5 + 1.0) = 6 and 4 * (0.2 + 0.9 + 2.0) = 12.4: mean 9.2, stderr 6.4 / sqrt(2) / sqrt(2)
    assert spec.trace() == pytest.approx((9.2, 3.2), rel=1e-12)
    spec.save(tmp_path / "s.json")
    assert hessfast.Spectrum.load(tmp_path / "s.json").frobenius2() == spec.frobenius2()
