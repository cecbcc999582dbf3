"""``outliers`` (Figure 27): outliers persist in the Hessian spectrum of a 1-hidden-layer MLP on a
10-class Gaussian mixture, at initialisation and after training.

Outliers are the Ritz values above the bulk's upper edge (:meth:`hessfast.Spectrum.bulk_edge`: the
outermost Ritz value whose weight is still >= 1/P).
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

DESCRIPTION = ("Figure 27: outliers of the Hessian spectrum of a 1-hidden-layer MLP on a Gaussian mixture, "
               "init vs trained")

SCALES: Dict[str, Dict[str, Any]] = {
    "tiny": dict(model="mlp", model_kwargs={"hidden": [32]}, data="gmm",
                 data_kwargs={"n_train": 500, "n_val": 200, "dim": 20}, optimizer="sgd", lr=0.05, momentum=0.9,
                 batch_size=64, epochs=4, m=30, num_probes=1, curvatures=["hessian"]),
    "small": dict(model="mlp", model_kwargs={"hidden": [100]}, data="gmm",
                  data_kwargs={"n_train": 2000, "n_val": 500, "dim": 50}, optimizer="sgd", lr=0.01, momentum=0.9,
                  batch_size=128, epochs=100, m=80, num_probes=2, curvatures=["hessian", "ggn"]),
    "paper": dict(model="mlp", model_kwargs={"hidden": [100]}, data="gmm",
                  data_kwargs={"n_train": 10000, "n_val": 2000, "dim": 100}, optimizer="sgd", lr=0.01, momentum=0.9,
                  batch_size=128, epochs=100, m=100, num_probes=4, curvatures=["hessian", "ggn"]),
}


def run(folder: Path, params: Dict[str, Any], *, seed: int = 0, progress: bool = True, overwrite: bool = False,
        device: str = "auto") -> Dict[str, Any]:
    cfg = train_config(params, seed, device)
    r = Run(folder / "train", {"train": cfg.to_dict(), "m": params["m"], "num_probes": params["num_probes"],
                               "curvatures": params["curvatures"]}, overwrite=overwrite)

    def callback(epoch: int, ctx: TrainContext):
        if epoch not in (0, cfg.epochs):
            return None
        loader = full_loader(ctx.data, device=ctx.device)
        out = {}
        for c in params["curvatures"]:
            s = hessfast.lanczos(ctx.model, loader, m=params["m"], curvature=c, num_probes=params["num_probes"],
                                 seed=seed, progress=False)
            s.save(folder / f"spectrum_{c}_epoch{epoch}.json")
            lo, hi = s.bulk_edge()
            top = s.top(min(12, s.m))
            out[c] = {"lambda_max": s.lambda_max, "lambda_min": s.lambda_min, "bulk_lo": lo, "bulk_hi": hi,
                      "top": top.tolist(), "n_outliers": int((top > hi).sum())}
        return out

    final = train(cfg, r, callback=callback, progress=progress)
    recs = callback_records(r)
    init_err = r.records("epoch")[0]["train_err"]
    pngs = []
    for c in params["curvatures"]:
        spectra = {}
        for rec in recs:
            f = folder / f"spectrum_{c}_epoch{rec['epoch']}.json"
            if f.exists():
                label = "initialisation" if rec["epoch"] == 0 else f"end of training (epoch {rec['epoch']})"
                spectra[label] = hessfast.Spectrum.load(f)
        if spectra:
            pngs.append(plots.densities(spectra, folder / f"outliers_{c}.png",
                                        title=f"{c}: 1-hidden-layer MLP on a 10-class Gaussian mixture"))
    rows = [[rec["epoch"], c, rec[c]["lambda_max"], rec[c]["bulk_hi"], rec[c]["n_outliers"]]
            for rec in recs for c in params["curvatures"] if c in rec]
    lines = [f"Train error at initialisation {fmt(init_err)}, after training {fmt(final.get('train_err'))} "
             f"(validation {fmt(final.get('val_err'))}).", ""]
    lines += md_table(["epoch", "curvature", "lambda_max", "bulk upper edge", "outliers above edge (of top 12)"], rows)
    out = {"final": final, "init_train_err": init_err,
           "measurements": [{"epoch": rec["epoch"], **{c: rec[c] for c in params["curvatures"] if c in rec}}
                            for rec in recs]}
    return write_results(folder, "outliers", params, out, lines, pngs)
