"""``hessfast eigenpairs``, ``hessfast trace`` and ``hessfast blocks``: JSON and PNG written, numbers checked
against independent computations on the same operator (ARPACK, the exact trace, a dense diagonal block)."""
import json

import numpy as np
import pytest
import torch

import hessfast
from hessfast.harness.data import load_data
from hessfast.harness.measure import full_loader
from hessfast.harness.models import build_model

pytestmark = pytest.mark.slow  # end-to-end runs of the CLI

COMMON = ["--model", "mlp", "--model-arg", "hidden=[8]", "--data", "digits", "--max-samples", "150", "--float64"]


@pytest.fixture(scope="module")
def operator():
    """The operator the commands build from COMMON: the float64 Hessian of the first 150 digits (P = 610)."""
    data = load_data("digits")
    model = build_model("mlp", num_classes=data.num_classes, in_shape=data.in_shape, seed=0, hidden=[8])
    data.train_x, data.train_y = data.train_x[:150], data.train_y[:150]
    return hessfast.CurvatureOperator(model, full_loader(data), dtype=torch.float64)


def test_eigenpairs_command_matches_arpack_and_writes_json_vectors_and_png(run_cli, tmp_path, operator):
    from scipy.sparse.linalg import eigsh

    code, out, err = run_cli("-q", "eigenpairs", *COMMON, "--k", "3", "--out", str(tmp_path))
    assert code == 0, err
    stem = tmp_path / "eigenpairs_hessian_LA"
    saved = json.loads(stem.with_suffix(".json").read_text())
    assert saved["converged"] and saved["meta"]["P"] == operator.P == 610 and saved["meta"]["N"] == 150
    ref = np.sort(eigsh(operator.to_scipy(), k=3, which="LA", tol=1e-12, return_eigenvectors=False))[::-1]
    np.testing.assert_allclose(saved["values"], ref, rtol=1e-8)
    back = hessfast.Eigenpairs.load(stem.with_suffix(".json"))
    assert back.vectors.shape == (3, 610)
    assert stem.with_suffix(".png").stat().st_size > 1000 and "values" in out


def test_trace_command_is_within_its_error_bars_of_the_exact_trace(run_cli, tmp_path, operator):
    code, out, err = run_cli("-q", "trace", *COMMON, "--method", "xtrace", "--num-matvecs", "40",
                          "--out", str(tmp_path))
    assert code == 0, err
    saved = json.loads((tmp_path / "trace_hessian_xtrace.json").read_text())
    exact = float(sum(operator.matmat(torch.eye(operator.P, dtype=torch.float64)[i:i + 64]).diagonal(offset=i).sum()
                      for i in range(0, operator.P, 64)))
    assert saved["num_matvecs"] == 40 and saved["stderr"] > 0
    assert abs(saved["estimate"] - exact) <= 5 * saved["stderr"]
    assert (tmp_path / "trace_hessian_xtrace.png").stat().st_size > 1000 and "trace =" in out


def test_blocks_command_gives_the_extremes_of_a_dense_block(run_cli, tmp_path, operator):
    code, out, err = run_cli("-q", "blocks", *COMMON, "--m", "90", "--out", str(tmp_path))
    assert code == 0, err
    saved = json.loads((tmp_path / "blocks_hessian.json").read_text())
    assert saved["groups"] == {"net.1": ["net.1.weight", "net.1.bias"], "net.3": ["net.3.weight", "net.3.bias"]}
    head = hessfast.BlockSpectra.load(tmp_path / "blocks_hessian.json")["net.3"]          # the last 90 coordinates
    E = torch.eye(operator.P, dtype=torch.float64)[-90:]
    ev = np.linalg.eigvalsh(operator.matmat(E)[:, -90:].numpy())
    assert head.P == 90
    np.testing.assert_allclose([head.lambda_max, head.lambda_min], [ev.max(), ev.min()], rtol=0, atol=1e-10)
    assert (tmp_path / "blocks_hessian.png").stat().st_size > 1000 and "lambda_max" in out
    code, _, err = run_cli("-q", "blocks", *COMMON, "--m", "5", "--blocks", '{"head": ["net.3.bias"]}',
                        "--out", str(tmp_path / "one"))
    assert code == 0, err
    assert list(json.loads((tmp_path / "one" / "blocks_hessian.json").read_text())["spectra"]) == ["head"]


@pytest.mark.parametrize("argv, message", [
    (["blocks", "--blocks", "layers"], "--blocks takes module, parameter or a JSON object"),
    (["blocks", "--blocks", '{"a": ["nope"]}', "--max-samples", "20"], "'nope' is neither a trainable parameter"),
    (["eigenpairs", "--which", "XX"], "invalid choice: 'XX'"),
    (["eigenpairs", "--k", "0"], "positive integer"),
    (["trace", "--method", "exact"], "invalid choice: 'exact'"),
    (["trace", "--curvature", "bogus"], "invalid choice: 'bogus'"),
])
def test_bad_arguments_exit_nonzero_with_a_clear_message(run_cli, argv, message):
    code, out, err = run_cli(*argv)
    assert code != 0
    assert message in out + err


def test_help_lists_the_estimator_commands(run_cli):
    code, out, _ = run_cli("--help")
    assert code == 0 and all(c in out for c in ("eigenpairs", "trace", "blocks"))
    code, out, _ = run_cli("eigenpairs", "--help")
    assert code == 0 and "--which" in out and "--max-subspace" in out
