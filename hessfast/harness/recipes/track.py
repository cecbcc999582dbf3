"""``track`` (Figure 9): lambda_1 of the full-data and the batch Hessian and GGN over training.

At each measured epoch: the full-data lambda_1 (Lanczos over the training set), the batch lambda_1 of
``num_batches`` random batches of size B (mean and standard deviation), the Hessian variance and the
batch lambda_1 that Theorem 4 (and Theorem 7 for the GGN) predicts from them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import numpy as np

from .. import plots
from ..measure import snapshot
from ..runs import Run
from ..train import TrainContext, train
from ._common import callback_records, fmt, md_table, train_config, write_results

DESCRIPTION = "Figure 9: full vs batch lambda_1 (Hessian and GGN), Theorem 4/7 predictions and variance over training"

SCALES: Dict[str, Dict[str, Any]] = {
    "tiny": dict(model="mlp", model_kwargs={"hidden": [32]}, data="digits", optimizer="sgd", lr=0.05,
                 momentum=0.9, batch_size=64, epochs=2, every=1, B=128, num_batches=4, m=15,
                 variance_probes=2, curvatures=["hessian", "ggn"]),
    "small": dict(model="mlp", model_kwargs={"hidden": [128, 128]}, data="digits", optimizer="sgd", lr=0.05,
                  momentum=0.9, batch_size=128, epochs=20, every=2, B=128, num_batches=10, m=40,
                  variance_probes=4, curvatures=["hessian", "ggn"]),
    "paper": dict(model="vgg16", data="cifar100", optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4,
                  batch_size=128, epochs=225, augment=True, every=25, B=128, num_batches=10, m=100,
                  variance_probes=4, variance_samples=5000, curvatures=["hessian", "ggn"]),
}


def run(folder: Path, params: Dict[str, Any], *, seed: int = 0, progress: bool = True, overwrite: bool = False,
        device: str = "auto") -> Dict[str, Any]:
    cfg = train_config(params, seed, device)
    measure = {k: params[k] for k in ("every", "B", "num_batches", "m", "variance_probes", "curvatures")}
    measure["variance_samples"] = params.get("variance_samples")
    r = Run(folder / "train", {"train": cfg.to_dict(), "measure": measure}, overwrite=overwrite)

    def callback(epoch: int, ctx: TrainContext):
        if epoch % params["every"] and epoch != cfg.epochs:
            return None
        out = {}
        for c in params["curvatures"]:
            out[c] = snapshot(ctx.model, ctx.data, curvature=c, B=params["B"], num_batches=params["num_batches"],
                              m=params["m"], variance_probes=params["variance_probes"],
                              variance_samples=params.get("variance_samples"), seed=seed + 1000 * epoch,
                              device=ctx.device)
        return out

    final = train(cfg, r, callback=callback, progress=progress)
    rows = []
    for rec in callback_records(r):
        for c in params["curvatures"]:
            if c in rec:
                rows.append({"epoch": rec["epoch"], **rec[c]})
    png = plots.track(rows, folder / "track.png")
    lines = [f"Training: {final.get('status')} after {final.get('epoch')} epochs; final train error "
             f"{fmt(final.get('train_err'))}, validation error {fmt(final.get('val_err'))}.", ""]
    header = ["epoch", "curvature", "full l1", "batch l1 mean", "batch l1 std", "Thm 4", "Thm 7", "sigma2",
              "batch/full"]
    lines += md_table(header, [[r_["epoch"], r_["curvature"], r_["full_lambda1"], r_["batch_lambda1_mean"],
                                r_["batch_lambda1_std"], r_["thm4_lambda1"], r_.get("thm7_lambda1", "-"), r_["sigma2"],
                                r_["ratio_measured"]] for r_ in rows])
    above = [r_["batch_lambda1_mean"] > r_["full_lambda1"] for r_ in rows]
    lines += ["", f"Batch lambda_1 above the full-data lambda_1 in {sum(above)} of {len(above)} measurements."]
    results = {"final": final, "measurements": rows,
               "batch_above_full_fraction": float(np.mean(above)) if above else float("nan")}
    return write_results(folder, "track", params, results, lines, [png])
