"""hessfast.predict end to end on a small model: Figure 9's batch-vs-full top eigenvalue, and its outputs."""
import json
import math

import numpy as np
import pytest
import torch

from hessfast import theory
from hessfast.utils.model_state import snapshot
from hessfast.prediction import Prediction, jacobian_entry_variance, predict

import cases
from test_operators import assert_model_unchanged


@pytest.fixture(scope="module")
def small():
    case = cases.mlp_case(n=96)
    return case, case.loader([32, 32, 32])


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_batch_lambda_exceeds_full_lambda_on_average(small, curvature, tmp_path):
    case, loader = small
    before = snapshot(case.model)
    pred = predict(case.model, loader, [4, 16, 64], curvature=curvature, num_batches=5, m=20, seed=0,
                   lr_sgd=0.01, progress=False)
    assert_model_unchanged(case.model, before)
    assert isinstance(pred, Prediction) and (pred.P, pred.N) == (75, 96)
    means = np.array([r["batch_mean"] for r in pred.rows])
    assert means.mean() > pred.lam_max                     # the theory's broadening, as in Figure 9
    assert means[0] > means[-1]                            # and it shrinks with the batch size
    for r in pred.rows:
        assert len(r["batch_values"]) == 5 and r["batch_std"] >= 0
        assert r["b"] == pytest.approx(theory.effective_batch(r["B"], 96))
        assert r["theorem4"] >= pred.lam_max - 1e-12       # Theorem 4 only ever moves lam_1 up
        assert (r["theorem7"] is None) == (curvature == "hessian")
        assert r["max_lr"] == pytest.approx(theory.max_lr_sgd(pred.lam_max, pred.sigma2_theorem7 or pred.sigma2,
                                                               75, r["B"], 96, curvature=curvature))
        assert r["adam_lr"] == pytest.approx(math.sqrt(r["B"] / 4))          # relative: no Adam lr given
    assert pred.rows[0]["sgd_lr"] == pytest.approx(0.01)
    # outputs: JSON round trip, PNG, table
    pred.save(tmp_path / "p.json")
    d = json.loads((tmp_path / "p.json").read_text())
    assert d["format"] == "hessfast.prediction/1" and [r["B"] for r in d["rows"]] == [4, 16, 64]
    pred.plot(tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000
    text = repr(pred)
    assert "Thm 4" in text and len(pred.table().splitlines()) == 2 + 3


def test_jacobian_entry_variance_inverts_the_one_column_relation():
    for tau2, lam, P in ((1.0, 10.0, 1000), (0.1, 50.0, 1000), (3e-4, 2.0, 75)):
        v = tau2 ** 2 + 2 * tau2 * lam / P
        assert jacobian_entry_variance(v, lam, P) == pytest.approx(tau2, rel=1e-12)
    assert jacobian_entry_variance(0.0, 1.0, 10) == 0.0


@pytest.mark.parametrize("sizes,match", [([], "empty"), ([0, 4], r"\[0\]"), ([97], "N=96"), ([2.5], "integers")])
def test_batch_size_checks(small, sizes, match):
    case, loader = small
    with pytest.raises((ValueError, TypeError), match=match):
        predict(case.model, loader, sizes, num_batches=1, m=3, num_probes=1, progress=False)


def test_batchnorm_train_mode_is_refused():
    case = cases.bn_case()
    with pytest.raises(ValueError, match="per-sample curvature"):
        predict(case.model, case.batch, [8], bn_mode="train", progress=False)


def test_dict_inputs_are_gathered():
    class DictModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(5, 3).double()

        def forward(self, a):
            return self.lin(a)

    torch.manual_seed(0)
    x, y = torch.randn(20, 5, dtype=torch.float64), torch.randint(0, 3, (20,))
    loader = [({"a": x[:10]}, y[:10]), ({"a": x[10:]}, y[10:])]
    pred = predict(DictModel(), loader, [5, 20], num_batches=2, m=18, num_probes=2, progress=False)  # m = P: exact
    assert pred.N == 20
    assert pred.rows[-1]["batch_mean"] == pytest.approx(pred.lam_max, rel=1e-6)   # B = N is the full data
