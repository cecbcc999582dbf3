"""``hessfast run lr-advice --scale tiny`` end to end: measure, advise, train around the advice, judge, report."""
import json
import time

import pytest

from hessfast.harness.recipes import RECIPES, run_recipe


@pytest.mark.slow
def test_lr_advice_tiny_runs_end_to_end_and_resumes(tmp_path):
    # The issue asks for under a minute; CPU time (all threads) is held to that, which wall time on a
    # loaded machine need not be.
    assert "lr-advice" in RECIPES
    cpu = time.process_time()
    res = run_recipe("lr-advice", tmp_path, "tiny", progress=False)
    cpu = time.process_time() - cpu
    assert cpu < 60, f"lr-advice --scale tiny took {cpu:.0f} s of CPU"
    folder = tmp_path / "lr-advice-tiny"
    saved = json.loads((folder / "results.json").read_text())
    settings = saved["settings"]
    sgd = saved["optimizers"]["sgd"]
    advice = json.loads((folder / "advice_sgd.json").read_text())
    assert [r["B"] for r in advice["rows"]] == settings["batch_sizes"]
    for row in advice["rows"]:
        B = str(row["B"])
        assert row["lr"] <= 2 / row["batch_mean"] * (1 + 1e-12)          # the advice respects the measured limit
        grid = sgd["grid"][B]
        assert sorted(r["lr"] for r in grid) == sorted(float(f"{row['lr'] * f:.4g}") for f in settings["grid"])
        judged = sgd["judged"][B]
        assert judged["advised_lr"] == float(f"{row['lr']:.4g}")
        finished = [r for r in grid if r["status"] == "finished"]
        adv = next(r for r in grid if r["lr"] == judged["advised_lr"])
        assert judged["diverged"] == (adv["status"] != "finished")
        assert judged["trains"] == adv["trains"] and (not adv["trains"] or adv["status"] == "finished")
        if finished:
            assert judged["best_val_err"] == min(r["val_err"] for r in finished)
            assert judged["within_tol"] == (judged["trains"] and
                                            judged["advised_val_err"] <= judged["best_val_err"] + settings["tol"])
    B0 = str(settings["B0"])
    at_B0 = [r for r in sgd["grid"][B0] + sgd["tuning"] if r["status"] == "finished"]
    assert next(r["val_err"] for r in at_B0 if r["lr"] == sgd["lr_B0"]) == min(r["val_err"] for r in at_B0)
    for rule, scale in (("fixed", lambda B: 1.0), ("linear", lambda B: B / settings["B0"]),
                        ("sqrt", lambda B: (B / settings["B0"]) ** 0.5)):
        for B, r in sgd["baselines"][rule].items():
            assert r["lr"] == float(f"{sgd['lr_B0'] * scale(int(B)):.4g}")
    # the advice's own rule from lr_B0: lr_B0 lambda_1(B0) / lambda_1(B) under the cap (rounded to 4 digits)
    fit = {r["B"]: r for r in advice["rows"]}
    for B, r in sgd["baselines"]["curvature"].items():
        row, ref = fit[int(B)], fit[settings["B0"]]
        want = min(sgd["lr_B0"] * ref["fit"] / row["fit"], 2 / row["batch_mean"])
        assert r["lr"] == pytest.approx(want, rel=1e-3)
    summary = (folder / "summary.md").read_text()
    assert summary.startswith("# lr-advice") and "grid best" in summary and "within 1 pt" in summary
    for png in ("advice_sgd.png", "sweep_sgd.png", "val_err_sgd.png"):
        assert (folder / png).stat().st_size > 1000
    # rerunning resumes: the measurement repeats exactly and every training run is reused
    again = run_recipe("lr-advice", tmp_path, "tiny", progress=False)
    assert json.loads(json.dumps(again["optimizers"])) == json.loads(json.dumps(res["optimizers"]))
