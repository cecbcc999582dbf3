"""The ``hessfast`` command line: help, bad arguments (non-zero exit, clear message), small real runs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


pytestmark = pytest.mark.slow  # end-to-end runs of the harness and the CLI

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("argv,message", [
    ([], "usage: hessfast"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["run", "nope"], "unknown recipe 'nope'"),
    (["run"], "give a recipe name"),
    (["run", "track", "--scale", "huge"], "invalid choice: 'huge'"),
    (["run", "track", "--set", "epochs"], "is not KEY=VALUE"),
    (["run", "track", "--set", "epochz=3"], "no setting 'epochz'"),
    (["spectrum", "--model", "resnet9000"], "unknown model 'resnet9000'"),
    (["spectrum", "--data", "mnist"], "unknown data set 'mnist'"),
    (["spectrum", "--model", "no_such_module:f"], "cannot import module 'no_such_module'"),
    (["spectrum", "--m", "0"], "--m must be >= 1"),
    (["spectrum", "--curvature", "kfac"], "invalid choice: 'kfac'"),
    (["spectrum", "--checkpoint", "/nonexistent/w.pt"], "does not exist"),
    (["spectrum", "--data", "cifar10", "--data-arg", "root=/nonexistent"], "cifar-10-batches-bin"),
    (["spectrum", "--float64", "--bf16-basis"], "not allowed with argument"),
    (["predict", "--batch-sizes", "16,x"], "comma-separated integers"),
    (["predict", "--batch-sizes", "0,16"], "positive integers"),
    (["variance", "--probes", "-2"], "positive integer"),
    (["demo", "--epochs", "0"], "positive integer"),
])
def test_bad_arguments_exit_nonzero_with_a_clear_message(run_cli, argv, message):
    code, out, err = run_cli(*argv)
    assert code != 0
    assert message in out + err


def test_help_explains_each_command(run_cli):
    for cmd, words in [("spectrum", "Lanczos"), ("variance", "variance"), ("predict", "batch size"),
                       ("run", "resumes"), ("demo", "digits")]:
        code, out, _ = run_cli(cmd, "--help")
        assert code == 0 and words in out and "--out" in out
    code, out, _ = run_cli("run", "--list")
    assert code == 0 and all(r in out for r in ("track", "lr-scaling", "augmentation"))


def test_spectrum_command_writes_json_and_png(run_cli, tmp_path):
    code, out, err = run_cli("-q", "spectrum", "--model", "mlp", "--model-arg", "hidden=[16]", "--data", "digits",
                          "--m", "12", "--max-samples", "200", "--curvature", "ggn", "--out", str(tmp_path))
    assert code == 0, err
    spec = json.loads((tmp_path / "spectrum_ggn_full.json").read_text())
    assert spec["meta"]["N"] == 200 and len(spec["ritz_values"][0]) == 12
    assert (tmp_path / "spectrum_ggn_full.png").stat().st_size > 1000
    assert "lambda_max" in out
    code, out, err = run_cli("-q", "spectrum", "--model", "mlp", "--model-arg", "hidden=[16]", "--data", "digits",
                          "--m", "12", "--max-samples", "200", "--curvature", "ggn", "--bf16-basis",
                          "--out", str(tmp_path / "bf16"))
    assert code == 0, err
    half = json.loads((tmp_path / "bf16" / "spectrum_ggn_full.json").read_text())
    assert half["meta"]["basis_dtype"] == "bfloat16" and spec["meta"]["basis_dtype"] == "float32"
    lmax, lmax_half = max(spec["ritz_values"][0]), max(half["ritz_values"][0])
    assert abs(lmax_half - lmax) <= 1e-3 * abs(lmax)


def test_spectrum_under_torchrun_equals_one_process(run_cli, tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    common = ["-q", "spectrum", "--model", "mlp", "--model-arg", "hidden=[16]", "--data", "digits", "--steps", "10",
              "--max-samples", "301", "--float64"]
    code, _, err = run_cli(*common, "--out", str(tmp_path / "one"))
    assert code == 0, err
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "hessfast", *common,
                        "--out", str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    one = json.loads((tmp_path / "one" / "spectrum_hessian_full.json").read_text())
    two = json.loads((tmp_path / "two" / "spectrum_hessian_full.json").read_text())
    assert two["meta"]["world_size"] == 2 and two["meta"]["N"] == one["meta"]["N"] == 301
    for a, b in zip(one["ritz_values"][0], two["ritz_values"][0]):
        assert abs(a - b) <= 1e-9 * abs(one["ritz_values"][0][-1])


def test_spectrum_loads_a_checkpoint_that_does_not_fit(run_cli, tmp_path):
    import torch

    torch.save({"weight": torch.zeros(2, 2)}, tmp_path / "w.pt")
    code, _, err = run_cli("-q", "spectrum", "--checkpoint", str(tmp_path / "w.pt"), "--out", str(tmp_path))
    assert code == 2 and "does not fit model 'mlp'" in err


def test_entry_point_runs_as_a_module():
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "hessfast", "run", "nope"], capture_output=True, text=True, env=env,
                       cwd=REPO, timeout=120)
    assert r.returncode == 2 and "unknown recipe 'nope'" in r.stderr


def test_demo_prints_the_table_and_writes_json_and_plots(run_cli, tmp_path):
    code, out, err = run_cli("-q", "demo", "--epochs", "1", "--num-batches", "2", "--m", "12",
                          "--out", str(tmp_path))
    assert code == 0, err
    res = json.loads((tmp_path / "demo.json").read_text())
    for c in ("hessian", "ggn"):
        rows = res["curvatures"][c]["rows"]
        assert [r["B"] for r in rows] == [16, 32, 64, 128, 256]
        for r in rows:
            vals = [r["batch_lambda1_mean"], r["thm4_lambda1"], r["max_lr_sgd"], r["sgd_lr_linear"], r["adam_lr_sqrt"]]
            assert all(isinstance(v, float) and v == v and abs(v) < float("inf") for v in vals)
        assert res["curvatures"][c]["sigma2"] > 0
    assert [r["adam_lr_sqrt"] for r in res["curvatures"]["ggn"]["rows"]][3] == pytest.approx(1e-3)
    for png in ("spectrum_hessian.png", "spectrum_ggn.png", "batch_lambda1.png"):
        assert (tmp_path / png).stat().st_size > 1000
    assert "max SGD lr" in out and "HESSIAN" in out and "GGN" in out


def test_variance_predict_and_run_commands(run_cli, tmp_path):
    common = ["--model-arg", "hidden=[16]", "--max-samples", "300", "--out", str(tmp_path)]
    code, out, err = run_cli("-q", "variance", "--probes", "2", *common)
    assert code == 0, err
    var = json.loads((tmp_path / "variance_hessian.json").read_text())
    assert var["N"] == 300 and var["sigma2"] > 0
    code, out, err = run_cli("-q", "predict", "--batch-sizes", "16,64", "--num-batches", "2", *common)
    assert code == 0, err
    assert (tmp_path / "predict_hessian.json").exists() and (tmp_path / "predict_hessian.png").exists()
    code, _, err = run_cli("-q", "predict", "--batch-sizes", "16,512", *common)
    assert code == 2 and "exceed the 300 training samples" in err
    code, out, err = run_cli("-q", "run", "outliers", "--scale", "tiny", "--set", "epochs=1",
                          "--out", str(tmp_path / "runs"))
    assert code == 0, err
    res = json.loads((tmp_path / "runs" / "outliers-tiny" / "results.json").read_text())
    assert res["settings"]["epochs"] == 1 and [m["epoch"] for m in res["measurements"]] == [0, 1]
    assert "# outliers" in out
