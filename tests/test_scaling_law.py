"""hessfast.scaling_law on synthetic batch lambda_1(B) data whose law and noise are known.

The synthetic measurement mimics the real one: at each batch size, n random "batches" whose top
eigenvalue scatters around the true mean with a relative standard deviation of 40% (the digits MLP
at B = 16 measures 48%); the fit sees only their mean and estimated standard error.
"""
import math

import numpy as np
import pytest

from hessfast import theory
from hessfast.scaling_law import FORMS, fit_scaling_law, verdict

N = 2000
B = np.array([16, 32, 64, 128, 256, 512])
LAM = 4.0
TRUE = {"outlier": {"a": 80.0}, "bulk": {"c": 12.0}, "both": {"a": 50.0, "c": 6.0}, "flat": {}}


def _law(form, Bs, lam=LAM, N=N):
    b = np.asarray(theory.effective_batch(np.asarray(Bs, dtype=float), N), dtype=float)
    p = TRUE[form]
    return lam + p.get("a", 0.0) / b + p.get("c", 0.0) / np.sqrt(b)


def _measure(form, seed, n=20, rel=0.4):
    """Mean and s.e. of n noisy batches per B, and a full-data lambda_1 with its own 0.1% error."""
    rng = np.random.default_rng(seed)
    true = _law(form, B)
    draws = true[:, None] * (1 + rel * rng.standard_normal((len(B), n)))
    return draws.mean(axis=1), draws.std(axis=1, ddof=1) / math.sqrt(n), LAM * (1 + 1e-3 * rng.standard_normal())


def test_noiseless_data_are_fitted_exactly():
    for form in ("outlier", "bulk", "both"):
        y = _law(form, B)
        fit = fit_scaling_law(B, y, 1e-3 * y, N, lam_full=LAM, forms=[form])
        f = fit.fits[form]
        assert f.param("lam_full") == pytest.approx(LAM, rel=1e-9)
        for name, value in TRUE[form].items():
            assert f.param(name) == pytest.approx(value, rel=1e-8)
        assert f.chi2 < 1e-12 and f.dof == len(B) + 1 - len(f.names)
        np.testing.assert_allclose(fit.predict([48, 1000])[0], _law(form, [48, 1000]), rtol=1e-9)


@pytest.mark.parametrize("form", ["outlier", "bulk", "both"])
def test_parameters_recovered_with_calibrated_intervals(form):
    # 200 seeded measurements: each coefficient's 95% interval must cover the truth in 88-99% of them (a
    # binomial(200, 0.95) lies in 0.91-0.98 with 99% probability; the s.e. are estimated from 20 draws, which
    # costs a little coverage), and the mean estimate must sit within 3 standard errors of the truth (no bias).
    # The same for the fitted mean lambda_1 at batch sizes that were not measured (48 between, 1000 beyond).
    z = 1.959964
    cover, est = {}, {}
    for seed in range(200):
        mean, se, lam = _measure(form, seed)
        f = fit_scaling_law(B, mean, se, N, lam_full=lam, lam_full_se=1e-3 * LAM, forms=[form]).fits[form]
        for name in TRUE[form]:
            cover.setdefault(name, []).append(abs(f.param(name) - TRUE[form][name]) <= z * f.stderr(name))
            est.setdefault(name, []).append(f.param(name))
        mu, s = f.mean_and_se(theory.effective_batch(np.array([48.0, 1000.0]), N))
        for Bu, m_, s_, t in zip((48, 1000), mu, s, _law(form, [48, 1000])):
            cover.setdefault(f"lam1(B={Bu})", []).append(abs(m_ - t) <= z * s_)
    for name, hits in cover.items():
        assert 0.88 <= np.mean(hits) <= 0.99, f"{form}: {name} covered in {np.mean(hits):.1%} of 200 seeds"
    for name, values in est.items():
        values = np.array(values)
        assert abs(values.mean() - TRUE[form][name]) < 3 * values.std() / math.sqrt(len(values)), (form, name)


@pytest.mark.parametrize("form", ["outlier", "bulk", "flat"])
def test_aic_picks_the_true_form_when_the_data_can_tell(form):
    # 10% relative scatter with 40 draws: the excess at B=16 is 5-20 s.e., and 1/b and 1/sqrt(b) differ by
    # a factor 5.7 over 16..512, so the true form should win in at least 90% of 40 seeds.
    wins = 0
    for seed in range(40):
        mean, se, lam = _measure(form, seed, n=40, rel=0.1)
        wins += fit_scaling_law(B, mean, se, N, lam_full=lam).chosen == form
    assert wins >= 36, f"{form} chosen in {wins} of 40 seeds"


def test_forms_with_a_negative_term_are_not_chosen():
    # batch lambda_1 below the full-data one and rising with B: every B term is negative, so the fit says "flat"
    y = LAM - 2.0 / np.sqrt(theory.effective_batch(B.astype(float), N))
    fit = fit_scaling_law(B, y, np.full(len(B), 0.01), N, lam_full=LAM)
    assert not fit.fits["outlier"].admissible and not fit.fits["bulk"].admissible
    assert fit.chosen == "flat" and set(fit.akaike_weights) <= {"flat", "both"}


def test_critical_batch_and_regimes_match_the_closed_form():
    # outlier law: the excess a/b falls to f lam at b* = a / (f lam), B* = b* N / (N + b*)
    y = _law("outlier", B)
    fit = fit_scaling_law(B, y, 1e-3 * y, N, lam_full=LAM, forms=["outlier"], flat_fraction=0.1)
    bstar = TRUE["outlier"]["a"] / (0.1 * LAM)
    crit, lo, hi = fit.critical_batch()
    assert crit == pytest.approx(bstar * N / (N + bstar), rel=1e-6)
    assert lo <= crit <= hi
    assert fit.regime([16, 128, 512]) == ["linear", "linear", "flat"]
    # bulk law: the excess c/sqrt(b) = f lam at b* = (c / (f lam))^2; below it the regime is "sqrt"
    yb = _law("bulk", B)
    fitb = fit_scaling_law(B, yb, 1e-3 * yb, N, lam_full=LAM, forms=["bulk"])
    bb = (TRUE["bulk"]["c"] / (0.1 * LAM)) ** 2
    assert fitb.critical_batch()[0] == pytest.approx(bb * N / (N + bb), rel=1e-6)
    assert fitb.regime([16])[0] == "sqrt"


def test_no_critical_batch_below_one():
    # the excess at B = 1 is already under 10% of lambda_full: every batch size is "flat", B* is None, not < 1
    tiny = LAM + 0.05 / theory.effective_batch(B.astype(float), N)
    fit = fit_scaling_law(B, tiny, 1e-4 * tiny, N, lam_full=LAM, forms=["outlier"])
    assert fit.critical_batch() == (None, None, None)
    assert "critical batch: none" in repr(fit)
    flat = fit_scaling_law(B, np.full(len(B), LAM), np.full(len(B), 0.1), N, lam_full=LAM)
    assert flat.chosen == "flat" and flat.critical_batch()[0] is None


def test_exponent_is_one_for_an_outlier_and_one_half_for_a_bulk_edge():
    # with lambda_full negligible and N = None (b = B): -dlog lam / dlog B is exactly 1 and 1/2
    Bs = np.array([8.0, 32.0, 128.0])
    for form, c, e in (("outlier", 100.0 / Bs, 1.0), ("bulk", 10.0 / np.sqrt(Bs), 0.5)):
        y = 1e-9 + c
        fit = fit_scaling_law(Bs, y, 1e-4 * y, None, forms=[form])
        np.testing.assert_allclose(fit.exponent([16.0, 64.0]), e, rtol=1e-5)


def test_ratio_has_zero_width_at_its_own_batch():
    mean, se, lam = _measure("outlier", 1)
    fit = fit_scaling_law(B, mean, se, N, lam_full=lam)
    r, lo, hi = fit.ratio(128, [128, 16])
    assert r[0] == pytest.approx(1.0) and hi[0] - lo[0] == pytest.approx(0.0, abs=1e-12)
    assert lo[1] < r[1] < hi[1] and r[1] < 1


def test_verdicts():
    assert verdict(10.0, 10.5, 1.0) == "within 1 s.e."
    assert verdict(4.224, 12.3, 2.0) == "factor 2.91 low (4.0 s.e.)"
    assert verdict(6.0, 5.0, 0.5) == "factor 1.2 high (2.0 s.e.)"
    assert verdict(None, 5.0, 0.5) == "-"


@pytest.mark.parametrize("kwargs,match", [
    (dict(B=[16, 32], mean=[1.0], se=[0.1, 0.1]), "one length"),
    (dict(B=[16, 32], mean=[1.0, float("nan")], se=[0.1, 0.1]), "finite"),
    (dict(B=[16, 32], mean=[1.0, 2.0], se=[0.1, -1]), "se >= 0"),
    (dict(B=[16, 32], mean=[1.0, 2.0], se=[0.1, 0.1], forms=["cubic"]), "unknown forms"),
    (dict(B=[16], mean=[1.0], se=[0.1], forms=["both"]), "too few"),
    (dict(B=[16, 32], mean=[1.0, 2.0], se=[0.1, 0.1], level=1.5), "level"),
])
def test_input_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit_scaling_law(N=N, **kwargs)


def test_to_dict_holds_every_form():
    mean, se, lam = _measure("both", 3)
    d = fit_scaling_law(B, mean, se, N, lam_full=lam).to_dict()
    assert set(d["forms"]) == set(FORMS) and d["chosen"] in FORMS
    assert abs(sum(d["akaike_weights"].values()) - 1) < 1e-12
