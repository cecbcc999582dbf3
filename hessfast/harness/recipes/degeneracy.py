"""``degeneracy`` (Figures 2-5): rank degeneracy of the Hessian and GGN over training.

At each measured epoch, Lanczos on the full training set gives the spectral mass of the Ritz value(s)
nearest zero (Section 7.2: for the Hessian the two nearest, combined) and that value; the spectra are
saved as JSON beside the plots.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import hessfast

from .. import plots
from ..measure import full_loader
from ..runs import Run
from ..train import TrainContext, train
from ._common import callback_records, fmt, md_table, train_config, write_results

DESCRIPTION = "Figures 2-5: spectral mass at zero (rank degeneracy) of the Hessian and GGN over training"

SCALES: Dict[str, Dict[str, Any]] = {
    "tiny": dict(model="mlp", model_kwargs={"hidden": [32]}, data="digits", optimizer="sgd", lr=0.05, momentum=0.9,
                 batch_size=64, epochs=2, every=1, m=20, num_probes=1, curvatures=["hessian", "ggn"]),
    "small": dict(model="mlp", model_kwargs={"hidden": [128, 128]}, data="digits", optimizer="sgd", lr=0.05,
                  momentum=0.9, batch_size=128, epochs=20, every=2, m=60, num_probes=2, curvatures=["hessian", "ggn"]),
    "paper": dict(model="vgg16", data="cifar100", optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4,
                  batch_size=128, epochs=225, augment=True, every=25, m=100, num_probes=1,
                  curvatures=["hessian", "ggn"]),
}


def run(folder: Path, params: Dict[str, Any], *, seed: int = 0, progress: bool = True, overwrite: bool = False,
        device: str = "auto") -> Dict[str, Any]:
    cfg = train_config(params, seed, device)
    measure = {k: params[k] for k in ("every", "m", "num_probes", "curvatures")}
    r = Run(folder / "train", {"train": cfg.to_dict(), "measure": measure}, overwrite=overwrite)
    spec_dir = folder / "spectra"
    spec_dir.mkdir(exist_ok=True)

    def callback(epoch: int, ctx: TrainContext):
        if epoch % params["every"] and epoch != cfg.epochs:
            return None
        loader = full_loader(ctx.data, device=ctx.device)
        out = {}
        for c in params["curvatures"]:
            s = hessfast.lanczos(ctx.model, loader, m=params["m"], curvature=c, num_probes=params["num_probes"],
                                 seed=seed + epoch, progress=False)
            s.save(spec_dir / f"{c}_epoch{epoch:04d}.json")
            d = s.degeneracy()
            lo, hi = s.bulk_edge()
            out[c] = {"mass": d.mass, "value": d.value, "lambda_max": s.lambda_max, "lambda_min": s.lambda_min,
                      "bulk_lo": lo, "bulk_hi": hi, "P": s.meta["P"]}
        return out

    final = train(cfg, r, callback=callback, progress=progress)
    recs = callback_records(r)
    rows = [{"epoch": rec["epoch"], "curvature": c, **rec[c]} for rec in recs for c in params["curvatures"] if c in rec]
    epochs = [rec["epoch"] for rec in recs]
    mass = {c: [rec[c]["mass"] for rec in recs] for c in params["curvatures"]}
    value = {c: [rec[c]["value"] for rec in recs] for c in params["curvatures"]}
    pngs = [plots.series(epochs, mass, folder / "degeneracy_mass.png", xlabel="epoch",
                         ylabel="spectral mass at 0 (degeneracy D)", title="Rank degeneracy over training"),
            plots.series(epochs, value, folder / "degeneracy_value.png", xlabel="epoch",
                         ylabel="Ritz value assigned to 0", title="Ritz value of the degenerate node")]
    lines = [f"Training: {final.get('status')}, final validation error {fmt(final.get('val_err'))}.", ""]
    lines += md_table(["epoch", "curvature", "mass", "value", "lambda_max", "lambda_min"],
                      [[x["epoch"], x["curvature"], x["mass"], x["value"], x["lambda_max"], x["lambda_min"]]
                       for x in rows])
    return write_results(folder, "degeneracy", params, {"final": final, "measurements": rows}, lines, pngs)
