"""hessfast.theory against Monte-Carlo simulations of the random-matrix models it assumes.

Each closed form is compared with seeded draws of exactly its model (``hessfast.rmt_sim``), on both
sides of every threshold. Tolerances come from the known finite-size behaviour, written beside each:

* an outlier eigenvalue or eigenvector overlap fluctuates like a Gaussian with standard deviation
  O(P^-1/2) (Wigner) or O(sqrt(lam' t / B)) (Marchenko-Pastur), with an O(1/P) bias;
* the bulk edge fluctuates on the Tracy-Widom scale O(P^-2/3) (Wigner) or O(B^-2/3) (MP), mean
  shifted below the edge by about one such unit.

The tolerance is four standard deviations of the mean over the R draws plus the bias allowance, so a
seeded run passes with a wide margin while the discrepancies the paper's printed forms have (see
``docs/theory.md``) are many tolerances wide and are asserted to be.
"""
import numpy as np
import pytest

from hessfast import rmt_sim as sim
from hessfast import theory as T


def _rng(seed):
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------------------------------
# effective batch size (Eq. 5, Remark 6)


def test_effective_batch_values_and_vectorised():
    assert T.effective_batch(128) == 128.0
    assert T.effective_batch(10, 40) == pytest.approx(10 / (1 - 10 / 40))
    assert T.effective_batch(40, 40) == np.inf
    b = T.effective_batch(np.array([1, 20, 39]), 40)
    assert isinstance(b, np.ndarray) and b.shape == (3,)
    np.testing.assert_allclose(b, [40 / 39, 40.0, 39 * 40.0])


@pytest.mark.parametrize("B, N, match", [(0, None, "B must be"), (0.5, 10, "B must be"), (11, 10, "exceeds"),
                                         (5, 0, "N must be"), (float("nan"), None, "NaN"), ([4, 12], 10, "exceeds")])
def test_effective_batch_rejects(B, N, match):
    with pytest.raises(ValueError, match=match):
        T.effective_batch(B, N)


@pytest.mark.parametrize("B", [10, 30])
def test_effective_batch_matches_sampling_without_replacement(B):
    # A finite data set of N samples of K independent "Hessian elements" with unequal variances; batches
    # drawn without replacement. The batch-minus-full fluctuation has element variance Var_{N-1} / b
    # exactly in expectation (finite-population correction). 300 batches x 2000 elements give a relative
    # standard error of about 0.2%, so 1% separates b from the true-risk B (factor 1.33 at B=10, 4 at B=30)
    # and the unbiased variance from the 1/N one (factor N/(N-1) = 1.026).
    N, K = 40, 2000
    rng = _rng(3)
    values = rng.standard_normal((N, K)) * rng.uniform(0.5, 1.5, K)
    var_unbiased = values.var(axis=0, ddof=1).mean()
    measured = (sim.batch_mean_fluctuation(values, B, 300, rng) ** 2).mean()
    predicted = var_unbiased / T.effective_batch(B, N)
    assert measured == pytest.approx(predicted, rel=0.01)
    assert abs(measured / (var_unbiased / B) - 1) > 0.2  # b = B would be wrong
    assert abs(measured / (values.var(axis=0).mean() / T.effective_batch(B, N)) - 1) > 0.015  # 1/N normalisation


# --------------------------------------------------------------------------------------------------
# Theorem 4 / Lemma 5 and Theorem 10 / Lemma 11: spiked Wigner

P_W = 1200
R_W = 3
SD_OUT = np.sqrt(2.0 / P_W)       # outlier / overlap std, in units of s, is below sqrt(2/P) at leading order
TOL_OUT = 4 * SD_OUT / np.sqrt(R_W) + 2.0 / P_W
TOL_EDGE = 5 * P_W ** (-2 / 3)    # Tracy-Widom: mean shift ~1.2 and std ~1.3 units of s P^-2/3


def _wigner_draws(spikes, s2, seed):
    rng = _rng(seed)
    draws = [sim.spiked_wigner(P_W, spikes, s2, rng) for _ in range(R_W)]
    top = np.mean([d[0] for d in draws])
    bottom = np.mean([d[1] for d in draws])
    overlaps = np.mean([d[2] for d in draws], axis=0)  # (2, r): top/bottom eigenvector vs each spike
    return top, bottom, overlaps


# sigma2, B, N chosen so that s^2 = P sigma2 (1/B - 1/N) = 1; the simulation uses that element variance
# directly, not effective_batch, so the wiring of b is checked too.
WIGNER_CASES = {
    "true_risk": dict(sigma2=1.0 / P_W * 64, B=64, N=None),
    "finite_N": dict(sigma2=1.0 / P_W / (1 / 48 - 1 / 192), B=48, N=192),
}


@pytest.mark.parametrize("case", list(WIGNER_CASES))
@pytest.mark.parametrize("lam_max, lam_min", [(2.5, -1.6), (0.6, -0.4)], ids=["outliers", "no_outliers"])
def test_batch_extremes_matches_spiked_wigner(case, lam_max, lam_min):
    kw = WIGNER_CASES[case]
    s2 = kw["sigma2"] * (1.0 / kw["B"] - (0.0 if kw["N"] is None else 1.0 / kw["N"]))
    assert P_W * s2 == pytest.approx(1.0)
    top, bottom, _ = _wigner_draws([lam_max, lam_min], s2, seed=11)
    pred = T.batch_extremes(lam_max, lam_min, P=P_W, **kw)
    for measured, predicted, lam in ((top, pred.lam_max, lam_max), (bottom, pred.lam_min, lam_min)):
        if abs(lam) > 1.0:   # outlier branch: lam + 1/lam
            assert predicted == pytest.approx(lam + 1.0 / lam)
            assert abs(measured - predicted) < TOL_OUT
        else:                # bulk-edge branch: +-2
            assert abs(predicted) == 2.0
            assert abs(measured - predicted) < TOL_EDGE


def test_batch_extremes_threshold_is_bbp_not_edge():
    # Between the BBP threshold s and the edge 2s an outlier already separates: at lam = 1.5 s the top
    # eigenvalue is 2.167 s (above the edge by 14 tolerances) and the top eigenvector keeps a squared
    # overlap 1 - 1/2.25 = 0.556 with the spike, where Lemma 11's printed threshold (2 s) says 0.
    top, _, overlaps = _wigner_draws([1.5], 1.0 / P_W, seed=12)
    assert T.batch_extremes(1.5, 0.0, 1.0, P_W, P_W) == (pytest.approx(1.5 + 1 / 1.5), -2.0)
    assert abs(top - (1.5 + 1 / 1.5)) < TOL_OUT + TOL_EDGE  # near the threshold the P^-1/3 regime widens it
    assert top - 2.0 > 0.1
    # eigenvector: std near the threshold is larger than sqrt(2/P); allow twice the outlier tolerance
    assert abs(overlaps[0, 0] - T.eigvec_overlap(1.5, 1.0, P_W, P_W)) < 2 * TOL_OUT
    assert overlaps[0, 0] > 0.4


@pytest.mark.parametrize("lam, seed", [(3.0, 13), (-2.0, 14), (0.5, 15)], ids=["above", "negative", "below"])
def test_eigvec_overlap_matches_spiked_wigner(lam, seed):
    # s = 1; the spike's eigenvector is e_1. Above threshold 1 - 1/lam^2 (+- O(P^-1/2)); below it the
    # overlap is O(1/P) (delocalised eigenvector), measured below 0.01 at P = 1200.
    _, _, overlaps = _wigner_draws([lam], 1.0 / P_W, seed=seed)
    measured = overlaps[0 if lam > 0 else 1, 0]
    predicted = T.eigvec_overlap(lam, sigma2=1.0, P=P_W, B=P_W)
    if abs(lam) > 1:
        assert predicted == pytest.approx(1 - 1 / lam ** 2)
        assert abs(measured - predicted) < TOL_OUT
    else:
        assert predicted == 0.0
        assert measured < 0.05


def test_hessian_top_scales_as_sqrt_below_critical_batch():
    # Section 10.1 reads lam'_1 ~ P sigma2 / (b lam_1) ("linear regime") at small b. Under Theorem 4 that
    # is the no-outlier side of the threshold: the top eigenvalue is the bulk edge 2 sqrt(P sigma2 / b),
    # so 4x the batch halves it (max SGD learning rate ~ sqrt(b)), rather than dividing it by 3.4 as
    # lam_1 + P sigma2 / (b lam_1) would. Critical batch here: P sigma2 / lam_1^2 = 400.
    lam, sigma2 = 1.0, 1.0 / 3.0
    assert T.critical_batch_size(lam, sigma2, P_W) == pytest.approx(400.0)
    rng = _rng(16)
    tops = {B: np.mean([sim.spiked_wigner(P_W, [lam], sigma2 / B, rng)[0] for _ in range(2)]) for B in (25, 100)}
    for B, top in tops.items():
        edge = 2 * np.sqrt(P_W * sigma2 / B)
        assert T.batch_extremes(lam, 0.0, sigma2, P_W, B).lam_max == pytest.approx(edge)
        assert abs(top / edge - 1) < TOL_EDGE
    assert tops[25] / tops[100] == pytest.approx(2.0, rel=0.03)
    printed_ratio = (lam + P_W * sigma2 / 25 / lam) / (lam + P_W * sigma2 / 100 / lam)
    assert abs(tops[25] / tops[100] - printed_ratio) > 1.0


def test_batch_extremes_edge_cases_and_errors():
    # B == N: no fluctuation, the empirical extremes come back unchanged
    assert T.batch_extremes(3.0, -1.0, 5.0, 100, 50, N=50) == (3.0, -1.0)
    # sigma2 = 0 and a zero spike: 0 (not NaN)
    assert T.batch_extremes(0.0, 0.0, 0.0, 100, 10) == (0.0, 0.0)
    out = T.batch_extremes(np.array([0.5, 2.0, 5.0]), -0.1, 1e-2, 10_000, 100)
    np.testing.assert_allclose(out.lam_max, [2.0, 2.5, 5.2])
    np.testing.assert_allclose(out.lam_min, -2.0)
    with pytest.raises(ValueError, match="lam_min"):
        T.batch_extremes(1.0, 2.0, 1.0, 10, 2)
    with pytest.raises(ValueError, match="sigma2"):
        T.batch_extremes(1.0, 0.0, -1.0, 10, 2)
    with pytest.raises(ValueError, match="P"):
        T.batch_extremes(1.0, 0.0, 1.0, 0, 2)


# --------------------------------------------------------------------------------------------------
# Theorem 7: spiked information-plus-noise (GGN)

R_G = 4


def _ggn_draws(P, B, lam, col_var, seed):
    rng = _rng(seed)
    return np.mean([sim.spiked_information_plus_noise(P, B, lam, col_var, rng) for _ in range(R_G)])


def _ggn_tol(pred, t, B, outlier):
    # outlier: lam' = sigma_1(J + E)^2 and sigma_1 fluctuates by ~ sqrt(t / B), so std(lam') <~ 3 sqrt(lam' t / B)
    # (measured 0.6-0.9 of that); edge: Tracy-Widom, O(B^-2/3) relative, mean ~1% low at B = 500.
    if outlier:
        return 4 * 3 * np.sqrt(pred * t / B) / np.sqrt(R_G)
    return 3 * B ** (-2 / 3) * pred


@pytest.mark.parametrize("P, B, N, lam", [
    (2000, 500, None, 1.0),     # c = 4, threshold t sqrt(c) = 2: below
    (2000, 500, None, 6.0),     # above, 3x threshold
    (2000, 500, None, 40.0),    # far above
    (1600, 400, 1600, 1.0),     # finite N: b = 533.3, t = 0.75, threshold 1.5: below
    (1600, 400, 1600, 8.0),     # above
])
def test_ggn_batch_max_matches_information_plus_noise(P, B, N, lam):
    sigma2 = 1.0
    b = T.effective_batch(B, N)
    t = sigma2 * B / b
    measured = _ggn_draws(P, B, lam, sigma2 * B / b, seed=int(lam * 10) + B)
    pred = T.ggn_batch_max(lam, sigma2, P, B, N)
    outlier = lam > t * np.sqrt(P / B)
    if outlier:
        assert pred == pytest.approx((lam + t) * (lam + P * sigma2 / b) / lam)
    else:
        assert pred == pytest.approx(t * (1 + np.sqrt(P / B)) ** 2)
    assert abs(measured - pred) < _ggn_tol(pred, t, B, outlier)


def test_ggn_paper_variant_misses_the_broadening():
    # c = 8, lam = 20: Eq. 16 as printed is lam + sigma2 + c sigma2^2 / (lam - c sigma2) = 21.67 while the
    # derived form (and the simulation) give 29.4; the gap c sigma2 (1 - c sigma2^2 / (lam (lam - c sigma2)))
    # = 7.73 is nearly the whole broadening c sigma2 = P sigma2 / b, and about 3.8 tolerances wide.
    P, B, lam, sigma2 = 2000, 250, 20.0, 1.0
    c = P / B
    measured = _ggn_draws(P, B, lam, sigma2, seed=21)
    printed = T.ggn_batch_max(lam, sigma2, P, B, variant="paper")
    assert printed == pytest.approx(lam + sigma2 + c * sigma2 ** 2 / (lam - c * sigma2))
    gap = c * sigma2 * (1 - c * sigma2 ** 2 / (lam * (lam - c * sigma2)))
    assert T.ggn_batch_max(lam, sigma2, P, B) - printed == pytest.approx(gap)
    tol = _ggn_tol(printed + gap, sigma2, B, True)
    assert abs((measured - printed) - gap) < tol
    assert measured - printed > 3 * tol


def test_ggn_paper_variant_below_threshold_is_not_the_mp_edge():
    # c = 4, lam = 1: printed 2 sigma2 (1 + c) = 10, the Marchenko-Pastur edge is sigma2 (1 + sqrt c)^2 = 9
    P, B = 2000, 500
    measured = _ggn_draws(P, B, 1.0, 1.0, seed=22)
    assert T.ggn_batch_max(1.0, 1.0, P, B, variant="paper") == pytest.approx(10.0)
    assert abs(measured - 9.0) < _ggn_tol(9.0, 1.0, B, False) < abs(measured - 10.0)


def test_ggn_paper_variant_valid_when_P_much_smaller_than_b():
    # c = 0.01: printed and derived agree to O(c sigma2) = 0.01, and both match the simulation
    P, B, lam, sigma2 = 200, 20_000, 10.0, 1.0
    measured = _ggn_draws(P, B, lam, sigma2, seed=23)
    printed = T.ggn_batch_max(lam, sigma2, P, B, variant="paper")
    derived = T.ggn_batch_max(lam, sigma2, P, B)
    assert abs(printed - derived) < 0.011
    assert abs(measured - printed) < _ggn_tol(printed, sigma2, B, True)


def test_ggn_batch_max_edge_cases_and_errors():
    assert T.ggn_batch_max(10.0, 1.0, 2000, 300, N=300) == 10.0  # B == N: G_batch = G_emp
    assert T.ggn_batch_max(10.0, 1.0, 2000, 299, N=300) == pytest.approx(10.0, rel=1e-2)  # continuous
    assert T.ggn_batch_max(0.0, 0.0, 100, 10) == 0.0
    np.testing.assert_allclose(T.ggn_batch_max(np.array([1.0, 10.0]), 1.0, 2000, 500), [9.0, 15.4])
    with pytest.raises(ValueError, match="variant"):
        T.ggn_batch_max(1.0, 1.0, 10, 2, variant="printed")
    with pytest.raises(ValueError, match="lam_max"):
        T.ggn_batch_max(-1.0, 1.0, 10, 2)


# --------------------------------------------------------------------------------------------------
# critical batch size and the maximal learning rate (Section 10.1)


def test_critical_batch_size_hessian_is_the_bbp_threshold():
    lam, sigma2, P, N = 2.0, 0.01, 4000, 1000
    b_star = T.critical_batch_size(lam, sigma2, P)
    assert b_star == pytest.approx(P * sigma2 / lam ** 2)
    B_star = T.critical_batch_size(lam, sigma2, P, N=N)
    assert T.effective_batch(B_star, N) == pytest.approx(b_star)
    # at the threshold both branches of Theorem 4 give 2 lam_1; the broadening equals lam_1
    assert T.batch_extremes(lam, 0.0, sigma2, P, B_star, N).lam_max == pytest.approx(2 * lam)
    np.testing.assert_allclose(T.critical_batch_size(np.array([1.0, 2.0]), 1.0, 100), [100.0, 25.0])


@pytest.mark.parametrize("N", [None, 5000])
def test_critical_batch_size_ggn_balances_broadening(N):
    lam, sigma2, P = 10.0, 1.0, 2000
    B_star = T.critical_batch_size(lam, sigma2, P, N=N, curvature="ggn")
    t = sigma2 * (1 - B_star / N) if N else sigma2
    assert T.ggn_batch_max(lam, sigma2, P, B_star, N) - (lam + t) == pytest.approx(lam)


def test_ggn_top_linear_below_and_flat_above_critical_batch():
    # lam_1 = 10, sigma2 = 1, P = 1000: B* = 110. Doubling B well below it nearly halves lam'_1 (linear
    # scaling of the max learning rate), well above it changes lam'_1 by ~10%. Tolerance as above.
    P, lam, sigma2 = 1000, 10.0, 1.0
    assert T.critical_batch_size(lam, sigma2, P, curvature="ggn") == pytest.approx(110.0)
    tops = {B: _ggn_draws(P, B, lam, sigma2, seed=30 + B) for B in (10, 20, 500, 1000)}
    for B, top in tops.items():
        pred = T.ggn_batch_max(lam, sigma2, P, B)
        assert abs(top - pred) < _ggn_tol(pred, sigma2, B, True)
    # predicted ratios 121/66 = 1.83 and 13.2/12.1 = 1.09; the bounds are ~4 standard deviations away
    assert tops[10] / tops[20] > 1.6
    assert tops[500] / tops[1000] < 1.2


def test_max_lr_sgd():
    lam, sigma2, P = 3.0, 1e-2, 10_000
    Bs = np.array([1, 10, 100, 1000, 10_000])
    lr = T.max_lr_sgd(lam, sigma2, P, Bs)
    np.testing.assert_allclose(lr, 2.0 / T.batch_extremes(lam, 0.0, sigma2, P, Bs).lam_max)
    assert np.all(np.diff(lr) > 0) and lr[-1] < 2.0 / lam
    assert T.max_lr_sgd(lam, sigma2, P, 100, N=100) == pytest.approx(2.0 / lam)
    assert T.max_lr_sgd(10.0, 1.0, 2000, 500, curvature="ggn") == pytest.approx(2.0 / 15.4)
    assert T.max_lr_sgd(0.0, 0.0, 10, 2) == np.inf
    with pytest.raises(ValueError, match="curvature"):
        T.max_lr_sgd(lam, sigma2, P, 10, curvature="fisher")


def test_critical_batch_size_errors():
    with pytest.raises(ValueError, match="lam_max"):
        T.critical_batch_size(0.0, 1.0, 10)
    with pytest.raises(ValueError, match="curvature"):
        T.critical_batch_size(1.0, 1.0, 10, curvature="GGNx")


# --------------------------------------------------------------------------------------------------
# learning-rate scaling (Sections 10, 11)


def test_scale_lr_paper_examples():
    assert T.scale_lr(0.01, 128, 1024, "sgd") == pytest.approx(0.08)
    Bs = np.array([8, 16, 128, 512, 2048])
    np.testing.assert_allclose(T.scale_lr(0.0004, 128, Bs, "adam"), 0.0004 * np.sqrt(Bs / 128))
    assert T.scale_lr(0.0004, 128, 512, "Adam") == pytest.approx(0.0008)


def test_scale_lr_critical_batch():
    # up to the threshold linear, beyond it flat, and coming down from above scales from the threshold
    assert T.scale_lr(0.01, 128, 512, critical_batch=1024) == pytest.approx(0.04)
    assert T.scale_lr(0.01, 128, 4096, critical_batch=1024) == pytest.approx(0.08)
    assert T.scale_lr(0.08, 2048, 4096, critical_batch=1024) == pytest.approx(0.08)
    assert T.scale_lr(0.08, 4096, 256, critical_batch=1024) == pytest.approx(0.02)


@pytest.mark.parametrize("kwargs, match", [
    (dict(optimizer="adagrad"), "optimizer"),
    (dict(optimizer="adam", critical_batch=1024), "SGD only"),
    (dict(critical_batch=0), "critical_batch"),
])
def test_scale_lr_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        T.scale_lr(0.01, 128, 256, **kwargs)


def test_scale_lr_rejects_bad_numbers():
    with pytest.raises(ValueError, match="lr"):
        T.scale_lr(-0.1, 128, 256)
    with pytest.raises(ValueError, match="from_batch"):
        T.scale_lr(0.1, 0, 256)


# --------------------------------------------------------------------------------------------------
# Polyak and Nesterov (Section 10.2, Eqs. 24-25), run with torch.optim.SGD on a quadratic


def _sgd_rate(lam_max, lam_min, lr, momentum, nesterov, steps=400):
    """Per-step contraction of torch.optim.SGD on 0.5 x^T diag(eigs) x, eigs in [lam_min, lam_max]."""
    torch = pytest.importorskip("torch")
    eigs = torch.tensor(np.geomspace(lam_min, lam_max, 30), dtype=torch.float64)
    x = torch.nn.Parameter(torch.ones(30, dtype=torch.float64))
    opt = torch.optim.SGD([x], lr=lr, momentum=momentum, nesterov=nesterov)
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * (eigs * x * x).sum()).backward()
        opt.step()
    ratio = float(x.detach().norm() / np.sqrt(30))
    return ratio ** (1.0 / steps) if np.isfinite(ratio) else np.inf


@pytest.mark.parametrize("lam_max, lam_min", [(100.0, 1.0), (2.0, 0.02)])
def test_polyak_attains_optimal_heavy_ball_rate(lam_max, lam_min):
    # Polyak's tuning makes every eigen-direction contract at exactly sqrt(momentum) per step (a double
    # root at the two ends adds a factor of order steps, i.e. (400)^(1/400) = 1.015, to the measured rate).
    lr, mom = T.polyak(lam_max, lam_min)
    k = lam_max / lam_min
    assert mom == pytest.approx(((np.sqrt(k) - 1) / (np.sqrt(k) + 1)) ** 2)
    rate = _sgd_rate(lam_max, lam_min, lr, mom, nesterov=False)
    assert np.sqrt(mom) * 0.99 < rate < np.sqrt(mom) * 1.02


@pytest.mark.parametrize("lam_max, lam_min", [(100.0, 1.0), (2.0, 0.02)])
def test_nesterov_attains_its_rate(lam_max, lam_min):
    # with lr = 1/L, momentum (sqrt k - 1)/(sqrt k + 1) the slowest direction (lam_min) has a double root
    # 1 - 1/sqrt(k); every other one contracts faster
    lr, mom = T.nesterov(lam_max, lam_min)
    assert lr == pytest.approx(1 / lam_max)
    rate = _sgd_rate(lam_max, lam_min, lr, mom, nesterov=True)
    expected = 1 - np.sqrt(lam_min / lam_max)
    assert expected * 0.99 < rate < expected * 1.02


def test_printed_lr_variants_diverge_at_other_scales():
    # Eq. 24 as printed: 2/(sqrt L + sqrt mu) and sqrt(mu/L). With L = 100, mu = 1 both blow up on the
    # quadratic they were tuned for; where sqrt L + sqrt mu = 2 the printed Polyak rate is the standard one.
    for rule in (T.polyak, T.nesterov):
        lr, mom = rule(100.0, 1.0, variant="paper")
        assert mom == rule(100.0, 1.0).momentum
        assert _sgd_rate(100.0, 1.0, lr, mom, nesterov=rule is T.nesterov) > 1.05
    assert T.polyak(2.25, 0.25, variant="paper") == pytest.approx(tuple(T.polyak(2.25, 0.25)))


def test_polyak_nesterov_vectorised_and_errors():
    lr, mom = T.polyak(np.array([4.0, 100.0]), 1.0)
    np.testing.assert_allclose(lr, [4 / 9, 4 / 121])
    np.testing.assert_allclose(mom, [1 / 9, (9 / 11) ** 2])
    for bad in ((1.0, 0.0), (1.0, 2.0), (1.0, -1.0)):
        with pytest.raises(ValueError, match="lam_min"):
            T.nesterov(*bad)
    with pytest.raises(ValueError, match="variant"):
        T.polyak(2.0, 1.0, variant="printed")


class _Spec:
    """Stand-in for hessfast.Spectrum: only .ritz_values and .weights, shape (num_probes, m)."""

    def __init__(self, ritz, weights):
        self.ritz_values = np.asarray(ritz, dtype=float)
        self.weights = np.asarray(weights, dtype=float)


def test_lr_momentum_drops_heavy_ritz_value():
    spec = _Spec([[1e-6, 0.5, 4.0, 100.0]], [[0.7, 0.1, 0.1, 0.1]])
    assert T.lr_momentum_from_spectrum(spec) == pytest.approx(tuple(T.polyak(100.0, 0.5)))
    assert T.lr_momentum_from_spectrum(spec, rule="nesterov") == pytest.approx(tuple(T.nesterov(100.0, 0.5)))
    # not above the threshold: kept
    light = _Spec([[0.01, 0.5, 4.0, 100.0]], [[0.4, 0.2, 0.2, 0.2]])
    assert T.lr_momentum_from_spectrum(light) == pytest.approx(tuple(T.polyak(100.0, 0.01)))
    assert T.lr_momentum_from_spectrum(light, mass_threshold=0.3) == pytest.approx(tuple(T.polyak(100.0, 0.5)))


def test_lr_momentum_pools_probes_and_skips_padding_and_negatives():
    # probe 0 stopped early (NaN padding, weight 0); probe 1 has the heavy near-zero value and a negative
    # Ritz value, which a positive-definite estimate leaves out
    spec = _Spec([[0.8, 50.0, np.nan, np.nan], [-3.0, 1e-8, 0.3, 120.0]],
                 [[0.5, 0.5, 0.0, 0.0], [0.1, 0.6, 0.2, 0.1]])
    assert T.lr_momentum_from_spectrum(spec) == pytest.approx(tuple(T.polyak(120.0, 0.3)))
    hessfast = pytest.importorskip("hessfast")
    real = hessfast.Spectrum(spec.ritz_values, spec.weights)
    assert T.lr_momentum_from_spectrum(real) == pytest.approx(tuple(T.polyak(120.0, 0.3)))


def test_lr_momentum_from_spectrum_errors():
    with pytest.raises(ValueError, match="positive"):
        T.lr_momentum_from_spectrum(_Spec([[-1.0, 1e-9]], [[0.2, 0.8]]))
    with pytest.raises(TypeError, match="ritz_values"):
        T.lr_momentum_from_spectrum(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="shape"):
        T.lr_momentum_from_spectrum(_Spec([[1.0, 2.0]], [[1.0]]))
    with pytest.raises(ValueError, match="rule"):
        T.lr_momentum_from_spectrum(_Spec([[1.0, 2.0]], [[0.5, 0.5]]), rule="adam")
    with pytest.raises(ValueError, match="mass_threshold"):
        T.lr_momentum_from_spectrum(_Spec([[1.0, 2.0]], [[0.5, 0.5]]), mass_threshold=0.0)
