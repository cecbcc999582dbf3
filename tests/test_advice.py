"""hessfast.lr_advice: the advised rates follow their stated rules and never exceed the measured stability limit."""
import json
import math
import re

import pytest
import torch

import hessfast
from hessfast import theory
from hessfast.advice import LRAdvice, lr_advice
from hessfast.utils.model_state import snapshot

import cases

SIZES = [4, 8, 16, 32, 64]


@pytest.fixture(scope="module")
def measured():
    """One measurement of the small MLP (N = 96), reused by every rule below (from_prediction measures nothing)."""
    case = cases.mlp_case(n=96)
    return hessfast.predict(case.model, case.loader([32, 32, 32]), SIZES, m=20, seed=0, progress=False)


def _measured_rows(adv):
    return [r for r in adv.rows if r["measured"]]


@pytest.mark.parametrize("safety", [0.5, 1.0])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("reference", [None, (16, 0.5), (16, 100.0)])
def test_sgd_advice_never_exceeds_two_over_measured_batch_lambda(measured, safety, momentum, reference):
    adv = LRAdvice.from_prediction(measured, "sgd", momentum=momentum, safety=safety, reference=reference)
    for r in _measured_rows(adv):
        cap = 2.0 / r["batch_mean"]
        assert r["cap"] == pytest.approx(cap)
        assert r["lr"] <= cap * (1 + 1e-12) and r["lr_hi"] <= cap * (1 + 1e-12) and r["lr_lo"] <= r["lr"] + 1e-15
        assert (r["limited_by"] == "2/measured lam_1") == (r["lr"] < _uncapped(measured, adv, r) * (1 - 1e-12))
    if reference == (16, 100.0):  # a reference far above the limit is capped everywhere
        assert {r["limited_by"] for r in adv.rows} == {"2/measured lam_1"}


def _uncapped(pred, adv, r):
    """The rule before the cap, written out from the fit."""
    if adv.reference is not None:
        B0, lr0 = adv.reference
        return lr0 * pred.fit.predict([B0])[0][0] / r["fit"]
    return adv.safety * 2 * (1 + adv.momentum) / r["fit"]


def test_sgd_advice_is_safety_times_the_heavy_ball_limit_of_the_fitted_curvature(measured):
    adv = LRAdvice.from_prediction(measured, "sgd", momentum=0.9, safety=0.3)
    for r in adv.rows:
        want = min(0.3 * 2 * 1.9 / r["fit"], 2 / r["batch_mean"])
        assert r["lr"] == pytest.approx(want, rel=1e-12)
        assert r["lr_lo"] <= r["lr"] <= r["lr_hi"]                    # the fit's interval, mapped to rates
    # with a reference the product lr x lambda_1(B) stays that of the reference, wherever the cap does not bind
    ref = LRAdvice.from_prediction(measured, "sgd", reference=(16, 0.05))
    lam16 = measured.fit.predict([16])[0][0]
    for r in ref.rows:
        assert r["lr"] * r["fit"] == pytest.approx(0.05 * lam16, rel=1e-10)
    assert next(r for r in ref.rows if r["B"] == 16)["lr_hi"] == pytest.approx(0.05)  # no spread at B0 itself


def test_heavy_ball_limit_is_the_stability_edge_of_a_quadratic():
    # x_{k+1} = x_k - lr v_k, v_k = rho v_{k-1} + lam x_k (torch.optim.SGD): 1% under the limit it contracts,
    # 1% over it grows (per-step factors 0.95 and 1.17), over 300 steps
    lam, rho = 3.0, 0.9
    limit = theory.max_lr_heavy_ball(lam, rho)
    assert limit == pytest.approx(2 * 1.9 / 3.0)
    for factor, grows in ((0.99, False), (1.01, True)):
        w = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
        opt = torch.optim.SGD([w], lr=factor * limit, momentum=rho)
        for _ in range(300):
            opt.zero_grad()
            (0.5 * lam * w ** 2).sum().backward()
            opt.step()
        assert (abs(w.item()) > 1.0) == grows, (factor, w.item())


def test_adam_rule_is_the_square_root_where_the_curvature_allows():
    # lambda_1 ~ 1/B (linear regime): going up the curvature falls faster than sqrt, so the rule is exactly
    # sqrt(B/B0); going down it rises faster, so the cap turns it linear. A flat lambda_1: no growth going up.
    lam = lambda B: 100.0 / B  # noqa: E731
    for B in (256, 512, 1024):
        assert theory.adam_lr_capped(1e-3, 128, B, lam(128), lam(B)) == pytest.approx(1e-3 * math.sqrt(B / 128))
    for B in (16, 32, 64):
        assert theory.adam_lr_capped(1e-3, 128, B, lam(128), lam(B)) == pytest.approx(1e-3 * B / 128)
    assert theory.adam_lr_capped(1e-3, 128, 512, 4.0, 4.0) == pytest.approx(1e-3)
    assert theory.adam_lr_capped(1e-3, 128, 32, 4.0, 4.0) == pytest.approx(1e-3 * 0.5)


def test_adam_advice_follows_sqrt_from_the_reference_where_unconstrained(measured):
    adv = LRAdvice.from_prediction(measured, "adam", reference=(16, 2e-3))
    lam16 = measured.fit.predict([16])[0][0]
    kinds = set()
    for r in adv.rows:
        sq, ratio = math.sqrt(r["B"] / 16), lam16 / r["fit"]
        assert r["lr"] == pytest.approx(2e-3 * min(sq, ratio), rel=1e-10)
        kinds.add(r["limited_by"])
        if sq <= ratio:
            assert r["limited_by"] == "sqrt rule" and r["lr"] == pytest.approx(2e-3 * sq, rel=1e-12)
    assert "sqrt rule" in kinds
    rel = LRAdvice.from_prediction(measured, "adam")              # no reference: factors from the smallest B
    assert rel.relative and rel.rows[0]["lr"] == pytest.approx(1.0)


def test_lr_advice_end_to_end(tmp_path, assert_model_unchanged):
    case = cases.mlp_case(n=96)
    before = snapshot(case.model)
    adv = lr_advice(case.model, case.loader([32, 32, 32]), [4, 16, 64], predict_at=[32, 96], m=20, seed=0,
                    max_batches=10, progress=False)
    assert_model_unchanged(case.model, before)
    assert [(r["B"], r["measured"]) for r in adv.rows] == [(4, True), (16, True), (32, False), (64, True), (96, False)]
    assert all(r["num_batches"] >= 5 for r in adv.rows if r["measured"])
    text = repr(adv)
    assert "advised lr" in text and "fit only" in text and "2/measured" in text and "Thm 4 (pred)" in text
    adv.save(tmp_path / "a.json")
    d = json.loads((tmp_path / "a.json").read_text())
    assert d["format"] == "hessfast.lr_advice/1" and d["prediction"]["format"] == "hessfast.prediction/2"
    assert [r["B"] for r in d["rows"]] == [4, 16, 32, 64, 96]
    adv.plot(tmp_path / "a.png")
    assert (tmp_path / "a.png").stat().st_size > 1000


@pytest.mark.parametrize("kw,match", [(dict(optimizer="lamb"), "not one of"), (dict(momentum=1.0), "momentum"),
                                      (dict(safety=0.0), "safety"), (dict(reference=(16,)), "pair"),
                                      (dict(reference=(16, -1.0)), "lr0 > 0"), (dict(predict_at=[500]), "predict_at"),
                                      (dict(reference=(500, 0.1)), "exceeds")])
def test_argument_errors(measured, kw, match):
    with pytest.raises(ValueError, match=match):
        LRAdvice.from_prediction(measured, **{"optimizer": "sgd", **kw})


@pytest.mark.slow
def test_demo_shows_only_measured_advice_and_no_critical_batch_below_one(tmp_path):
    from hessfast.harness.demo import run_demo

    lines = []
    res = run_demo(tmp_path, epochs=1, num_batches=3, m=12, m_batch=12, variance_probes=1, progress=False,
                   echo=lines.append)
    text = "\n".join(lines)
    for value in re.findall(r"critical batch[^\n]*?=\s*([0-9][0-9.e+-]*)", text):
        assert float(value) >= 1, text
    for c, cr in res["curvatures"].items():
        assert cr["critical_batch"] is None or cr["critical_batch"] >= 1
        for r in cr["rows"]:
            assert r["sgd_lr_advised"] <= r["max_lr_sgd"] * (1 + 1e-12)     # never above 2 / measured lambda_1
            assert r["sgd_lr_linear"] <= r["max_lr_sgd"] * (1 + 1e-12)
            assert r["max_lr_sgd"] == pytest.approx(2 / r["batch_lambda1_mean"])
        ref = next(r for r in cr["rows"] if r["B"] == 128)
        assert ref["adam_lr_advised"] == pytest.approx(1e-3)
    assert "(pred)" in text and "verdict" in text and "HESSIAN" in text and "GGN" in text
    assert (tmp_path / "advice_sgd_hessian.png").stat().st_size > 1000
