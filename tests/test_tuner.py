"""CurvatureTuner (Section 10.2) on quadratics whose Hessian spectrum is known exactly."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from hessfast import theory
from hessfast.tuner import CurvatureTuner


def quadratic(eigs):
    """A linear model with MSE loss whose Hessian is diag(eigs): L(w) = mean_i (x_i . w)^2, H = (2/n) X^T X."""
    eigs = torch.as_tensor(eigs, dtype=torch.float64)
    n = eigs.numel()
    x = torch.diag(torch.sqrt(eigs * n / 2.0))
    model = nn.Linear(n, 1, bias=False).double()
    return model, (x, torch.zeros(n, 1, dtype=torch.float64))


def _lr_mom(opt):
    g = opt.param_groups[0]
    return g["lr"], g.get("momentum", g.get("betas", (None,))[0])


@pytest.mark.parametrize("rule", ["polyak", "nesterov"])
def test_tuner_sets_lr_and_momentum_from_known_spectrum(rule):
    eigs = [0.5, 1.0, 2.0, 3.0, 8.0]
    model, batch = quadratic(eigs)
    opt = torch.optim.SGD(model.parameters(), lr=123.0, momentum=0.0, nesterov=False)
    # mass_threshold=1: no Ritz value is dropped, so lambda_min is the true smallest eigenvalue
    tuner = CurvatureTuner(opt, model, nn.MSELoss(), every=1, m=5, rule=rule, mass_threshold=1.0, seed=3)
    lr, mom = tuner.update(batch)
    want = (theory.polyak if rule == "polyak" else theory.nesterov)(8.0, 0.5)
    assert lr == pytest.approx(want[0], rel=1e-6)
    assert mom == pytest.approx(want[1], rel=1e-6)
    assert _lr_mom(opt) == (pytest.approx(lr), pytest.approx(mom))
    # textbook heavy ball on [0.5, 8]: lr = 4 / (sqrt 8 + sqrt .5)^2, momentum = ((sqrt 8 - sqrt .5) / (...))^2
    if rule == "polyak":
        assert lr == pytest.approx(4 / (math.sqrt(8) + math.sqrt(0.5)) ** 2, rel=1e-6)
        assert mom == pytest.approx(((math.sqrt(8) - math.sqrt(0.5)) / (math.sqrt(8) + math.sqrt(0.5))) ** 2, rel=1e-6)


def test_tuner_drops_degenerate_mass_before_taking_lambda_min():
    # 30 zero eigenvalues (most of a random probe's mass) and a bulk in [1, 4]: lambda_min must be 1, not 0
    eigs = [0.0] * 30 + list(np.linspace(1.0, 4.0, 10))
    model, batch = quadratic(eigs)
    opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.5)
    tuner = CurvatureTuner(opt, model, nn.MSELoss(), m=20, rule="polyak", seed=0)
    lr, mom = tuner.update(batch)
    want = theory.polyak(4.0, 1.0)
    assert lr == pytest.approx(want[0], rel=1e-6)
    assert mom == pytest.approx(want[1], rel=1e-6)
    assert mom < 0.2  # momentum 1 would have come from keeping the zero eigenvalues


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_tuner_ignores_rounding_level_ritz_values_of_the_null_space(seed):
    # Lanczos runs one step past the 11-dimensional Krylov space: a Ritz value at ~1e-17 takes part of the
    # null space's mass (seeds 1-3: a positive piece), which alone would make lambda_min ~1e-19
    eigs = [0.0] * 30 + list(np.linspace(1.0, 4.0, 10))
    model, batch = quadratic(eigs)
    opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.5)
    tuner = CurvatureTuner(opt, model, nn.MSELoss(), m=20, rule="polyak", seed=seed)
    lr, mom = tuner.update(batch)
    want = theory.polyak(4.0, 1.0)
    assert lr == pytest.approx(want[0], rel=1e-6) and mom == pytest.approx(want[1], rel=1e-6)


def test_merge_zero_ritz_values_sums_the_null_space_into_one_value():
    from types import SimpleNamespace

    from hessfast.tuner import merge_zero_ritz_values

    spec = SimpleNamespace(ritz_values=[[-3e-17, 2e-16, 1.0, 4.0, np.nan], [1e-3, 2.0, 4.0, np.nan, np.nan]],
                           weights=[[0.4, 0.35, 0.05, 0.2, 0.0], [0.3, 0.4, 0.3, 0.0, 0.0]],
                           meta={"dtype": "float64"})
    out = merge_zero_ritz_values(spec)
    np.testing.assert_array_equal(out.ritz_values[0], [0.0, np.nan, 1.0, 4.0, np.nan])
    np.testing.assert_allclose(out.weights[0], [0.75, 0.0, 0.05, 0.2, 0.0], rtol=1e-15)
    np.testing.assert_array_equal(out.ritz_values[1], spec.ritz_values[1])   # 1e-3 is curvature, not rounding
    assert theory.lr_momentum_from_spectrum(out).lr == pytest.approx(theory.polyak(4.0, 1e-3)[0], rel=1e-12)


def test_tuner_every_and_adam_betas_and_state_roundtrip():
    model, batch = quadratic([1.0, 4.0, 9.0])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.999))
    tuner = CurvatureTuner(opt, model, nn.MSELoss(), every=3, m=3, rule="nesterov", mass_threshold=1.0)
    done = [tuner.maybe_update(batch) is not None for _ in range(7)]
    assert done == [True, False, False, True, False, False, True]
    lr, mom = theory.nesterov(9.0, 1.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-6)
    assert opt.param_groups[0]["betas"] == (pytest.approx(mom, rel=1e-6), 0.999)
    state = tuner.state_dict()
    opt2 = torch.optim.Adam(model.parameters(), lr=5.0)
    t2 = CurvatureTuner(opt2, model, nn.MSELoss(), every=3, m=3, rule="nesterov")
    t2.load_state_dict(state)
    assert (t2.calls, t2.updates) == (7, 3)
    assert opt2.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-6)


def test_tuner_keeps_values_when_no_positive_curvature_is_left():
    model, batch = quadratic([0.0, 0.0, 0.0])  # all-zero Hessian
    model.weight.data.fill_(1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.07, momentum=0.3)
    tuner = CurvatureTuner(opt, model, nn.MSELoss(), m=1, rule="polyak")
    assert tuner.update(batch) == (pytest.approx(0.07), pytest.approx(0.3))
    assert tuner.history[-1]["skipped"] is True


def test_tuner_rejects_bad_arguments():
    model, _ = quadratic([1.0, 2.0])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="rule"):
        CurvatureTuner(opt, model, rule="adagrad")
    with pytest.raises(ValueError, match="every"):
        CurvatureTuner(opt, model, every=0)
