"""Training loop: resume after an interruption, divergence detection, run folders."""
import json
import sys
import types

import pytest
import torch
from torch import nn

from hessfast.harness.data import gmm
from hessfast.harness.runs import Run
from hessfast.harness.train import TrainConfig, train

pytestmark = pytest.mark.slow  # end-to-end runs of the harness and the CLI


@pytest.fixture(scope="module")
def data():
    return gmm(n_train=240, n_val=60, dim=12)


@pytest.fixture
def dropout_model(monkeypatch):
    """A user model with dropout, so resuming must also restore the global RNG."""
    mod = types.ModuleType("harness_test_models")
    mod.drop_mlp = lambda in_shape, num_classes: nn.Sequential(
        nn.Flatten(), nn.Linear(in_shape[0], 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, num_classes))
    monkeypatch.setitem(sys.modules, "harness_test_models", mod)
    return "harness_test_models:drop_mlp"


def _epochs(run):
    return [{k: v for k, v in r.items()} for r in run.records("epoch")]


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_resume_after_interruption_equals_uninterrupted_run(tmp_path, data, dropout_model, optimizer):
    cfg = TrainConfig(model=dropout_model, data="gmm", optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 3e-3,
                      batch_size=32, epochs=4, swa_start=0.5, seed=5, device="cpu")
    ref = Run(tmp_path / "ref", cfg.to_dict())
    train(cfg, ref, data, progress=False)

    run = Run(tmp_path / "cut", cfg.to_dict())

    def interrupt(epoch, step):
        if epoch == 2 and step == 3:  # half-way through the third epoch
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, run, data, on_step=interrupt, progress=False)
    assert run.status["status"] == "running" and run.load_checkpoint()["epoch"] == 2
    resumed = Run(tmp_path / "cut", cfg.to_dict())
    out = train(cfg, resumed, data, progress=False)

    assert out["status"] == "finished" and out["epoch"] == 4
    assert _epochs(resumed) == _epochs(ref)  # identical metrics, no duplicated or missing epochs
    a, b = ref.load_checkpoint(), resumed.load_checkpoint()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["swa"][k], b["swa"][k]) for k in a["swa"])


def test_diverging_run_is_recorded_not_raised(tmp_path, data):
    cfg = TrainConfig(model="mlp", model_kwargs={"hidden": [16]}, data="gmm", lr=1e4, momentum=0.9, batch_size=32,
                      epochs=3, diverge_loss=100.0, device="cpu")
    run = Run(tmp_path / "div", cfg.to_dict())
    out = train(cfg, run, data, progress=False)
    assert out["status"] == "diverged"
    rec = run.records("diverged")
    assert len(rec) == 1 and rec[0]["lr"] == pytest.approx(1e4)
    assert json.loads((tmp_path / "div" / "status.json").read_text())["status"] == "diverged"
    # a rerun of a diverged run does not train again
    assert train(cfg, Run(tmp_path / "div", cfg.to_dict()), data, progress=False)["status"] == "diverged"


def test_run_refuses_a_different_config_and_checkpoints_are_weights_only(tmp_path, data):
    cfg = TrainConfig(model="mlp", model_kwargs={"hidden": [8]}, data="gmm", epochs=1, batch_size=64, device="cpu")
    run = Run(tmp_path / "r", cfg.to_dict())
    train(cfg, run, data, progress=False)
    state = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1 and "model" in state and "optimizer" in state
    other = TrainConfig(model="mlp", model_kwargs={"hidden": [8]}, data="gmm", epochs=2, batch_size=64, device="cpu")
    with pytest.raises(ValueError, match="different configuration.*epochs"):
        Run(tmp_path / "r", other.to_dict())
    Run(tmp_path / "r", other.to_dict(), overwrite=True)  # explicit restart is allowed
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def test_bad_train_config_is_refused():
    with pytest.raises(ValueError, match="unknown optimizer"):
        TrainConfig(optimizer="lbfgs")
    with pytest.raises(ValueError, match="lr must be a positive"):
        TrainConfig(lr=-1.0)


def test_resume_with_the_curvature_tuner_restores_its_state(tmp_path, data):
    from hessfast.tuner import CurvatureTuner

    cfg = TrainConfig(model="mlp", model_kwargs={"hidden": [8]}, data="gmm", lr=0.05, batch_size=48, epochs=3,
                      seed=2, device="cpu")

    def make(model, opt):
        return CurvatureTuner(opt, model, every=4, m=6, rule="nesterov", seed=1)

    ref = Run(tmp_path / "ref", cfg.to_dict())
    train(cfg, ref, data, make_tuner=make, progress=False)

    def interrupt(epoch, step):
        if epoch == 1 and step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, Run(tmp_path / "cut", cfg.to_dict()), data, make_tuner=make, on_step=interrupt, progress=False)
    resumed = Run(tmp_path / "cut", cfg.to_dict())
    train(cfg, resumed, data, make_tuner=make, progress=False)
    assert _epochs(resumed) == _epochs(ref)
    assert resumed.records("tuner") == ref.records("tuner") and len(ref.records("tuner")) == 3
    assert ref.load_checkpoint()["tuner"]["updates"] == 4  # 15 steps: updates at steps 0, 4, 8 and 12
