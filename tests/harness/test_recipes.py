"""Every recipe end to end at ``tiny`` scale: outputs exist and hold finite numbers of the right shape."""
import json
import math

import numpy as np
import pytest

from hessfast.harness.recipes import RECIPES, run_recipe

pytestmark = pytest.mark.slow  # end-to-end runs of the harness and the CLI


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("recipes")


def _finite(*xs):
    return all(isinstance(x, (int, float)) and math.isfinite(x) for x in xs)


def _check_files(res, n_png):
    folder = res["folder"]
    import pathlib

    folder = pathlib.Path(folder)
    saved = json.loads((folder / "results.json").read_text())
    assert saved["recipe"] in RECIPES
    assert (folder / "summary.md").read_text().startswith("# ")
    pngs = list(folder.glob("*.png"))
    assert len(pngs) >= n_png and all(p.stat().st_size > 1000 for p in pngs)
    return saved


def test_track(out):
    res = run_recipe("track", out, "tiny", progress=False)
    _check_files(res, 1)
    rows = res["measurements"]
    assert [(r["epoch"], r["curvature"]) for r in rows] == [(e, c) for e in (0, 1, 2) for c in ("hessian", "ggn")]
    for r in rows:
        assert _finite(r["full_lambda1"], r["batch_lambda1_mean"], r["batch_lambda1_std"], r["thm4_lambda1"],
                       r["sigma2"])
        assert len(r["batch_lambda1"]) == 4 and r["sigma2"] >= 0
    assert all(_finite(r["thm7_lambda1"]) for r in rows if r["curvature"] == "ggn")


def test_lr_scaling_records_divergence_and_continues(out):
    res = run_recipe("lr-scaling", out, "tiny", progress=False)
    _check_files(res, 3)
    assert len(res["grid"]) == 7
    assert res["diverged"] == ["sgd_B64_lr50"]  # the lr-50 SGD run diverges; the sweep goes on
    assert {r["status"] for r in res["grid"] if r["lr"] != 50.0} == {"finished"}
    assert _finite(res["chosen_lr"]["sgd"], res["chosen_lr"]["adam"])
    assert len(res["scaling"]) == 2 * 2 * 3
    for s in res["scaling"]:
        if s["status"] == "finished":
            assert len(s["curve"]) == 3 and _finite(s["train_err"], s["val_err"])
    # rerunning the same command resumes: everything is done, so the results are unchanged
    again = run_recipe("lr-scaling", out, "tiny", progress=False)
    assert again["scaling"] == json.loads(json.dumps(res["scaling"]))


def test_degeneracy(out):
    res = run_recipe("degeneracy", out, "tiny", progress=False)
    _check_files(res, 2)
    rows = res["measurements"]
    assert len(rows) == 6
    assert all(0.0 <= r["mass"] <= 1.0 and _finite(r["value"], r["lambda_max"]) for r in rows)
    assert len(list((out / "degeneracy-tiny" / "spectra").glob("*.json"))) == 6


def test_tuner(out):
    res = run_recipe("tuner", out, "tiny", progress=False)
    _check_files(res, 2)
    methods = ("schedule", "polyak", "nesterov")
    assert {m: f["status"] for m, f in res["final"].items()} == {m: "finished" for m in methods}
    for m in ("polyak", "nesterov"):
        lrs, moms = res["lr"][m], res["momentum"][m]
        assert len(lrs) == 3 and all(_finite(x) and x > 0 for x in lrs)
        assert all(0.0 <= x < 1.0 for x in moms)
    assert _finite(res["final"]["polyak"]["swa_val_err"])


def test_adam_curvature(out):
    res = run_recipe("adam-curvature", out, "tiny", progress=False)
    _check_files(res, 1)
    ms = res["measurements"]
    assert [m["epoch"] for m in ms] == [1, 2, 3]
    P = 64 * 32 + 32 + 32 * 10 + 10
    for m in ms:
        assert len(m["hist"]) == len(res["bins"]) - 1 and sum(m["hist"]) == P
        q = list(m["quantiles"].values())
        assert q == sorted(q) and q[0] >= 1e-8  # eta + eps is at least eps


def test_outliers(out):
    res = run_recipe("outliers", out, "tiny", progress=False)
    _check_files(res, 1)
    ms = res["measurements"]
    assert [m["epoch"] for m in ms] == [0, 4]
    for m in ms:
        h = m["hessian"]
        assert len(h["top"]) == 12 and _finite(h["lambda_max"], h["bulk_hi"]) and h["n_outliers"] >= 1
    assert res["final"]["train_err"] < res["init_train_err"]


def test_augmentation(out):
    res = run_recipe("augmentation", out, "tiny", progress=False)
    _check_files(res, 2)
    rows = res["measurements"]
    n = rows[0]["N"]
    assert [r["N"] for r in rows] == [n, 2 * n, 4 * n]
    assert all(_finite(r["lambda_max"], r["lambda_min"]) for r in rows)


def test_unknown_recipe_scale_and_setting_are_refused(out):
    with pytest.raises(ValueError, match="unknown recipe 'nope'"):
        run_recipe("nope", out)
    with pytest.raises(ValueError, match="unknown scale 'huge'"):
        run_recipe("track", out, "huge")
    with pytest.raises(ValueError, match="no setting 'epochz'"):
        run_recipe("track", out, "tiny", overrides={"epochz": 3})


def test_track_on_cifar_images_with_batch_norm_and_augmentation(tmp_path):
    # a synthetic CIFAR-10 in the binary layout: the image path (32x32, augmentation, batch norm) end to end
    root = tmp_path / "data" / "cifar-10-batches-bin"
    root.mkdir(parents=True)
    gen = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}.bin", 40) for i in range(1, 6)] + [("test_batch.bin", 10)]:
        rows = np.concatenate([gen.integers(0, 10, (n, 1)), gen.integers(0, 256, (n, 3072))], axis=1)
        (root / name).write_bytes(rows.astype(np.uint8).tobytes())
    res = run_recipe("track", tmp_path / "out", "tiny", progress=False, overrides=dict(
        model="vgg16_bn", model_kwargs={"width": 0.0625}, data="cifar10",
        data_kwargs={"root": str(tmp_path / "data"), "n_val": 40}, augment=True, epochs=1, batch_size=32,
        B=32, num_batches=2, m=6, variance_probes=1, curvatures=["hessian"]))
    rows = res["measurements"]
    assert [r["epoch"] for r in rows] == [0, 1] and rows[0]["N"] == 160
    assert all(_finite(r["full_lambda1"], r["batch_lambda1_mean"], r["thm4_lambda1"], r["sigma2"]) for r in rows)
