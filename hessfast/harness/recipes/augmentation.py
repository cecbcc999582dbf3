"""``augmentation`` (Section 12, Figure 26): the empirical Hessian spectrum as the data set grows by
augmentation.

Train (with augmentation), then for each factor k compute the full-data Hessian spectrum on the
training set plus k - 1 augmented copies of it (the data set's own augmentation: flips, zero padding
and random crops for CIFAR; padding and crops for digits). Theorem 4 predicts the extremes shrink
towards those of the true Hessian as N grows.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import torch

import hessfast

from .. import plots
from ..data import Augment, BatchLoader, load_data
from ..runs import Run
from ..train import load_trained_model, resolve_device, train
from ._common import fmt, md_table, train_config, write_results

DESCRIPTION = "Section 12 / Figure 26: Hessian spectra on a training set enlarged by augmentation (factor 1..k)"

SCALES: Dict[str, Dict[str, Any]] = {
    "tiny": dict(model="mlp", model_kwargs={"hidden": [32]}, data="digits", optimizer="sgd", lr=0.05, momentum=0.9,
                 batch_size=64, epochs=2, augment=True, factors=[1, 2, 4], m=15),
    "small": dict(model="mlp", model_kwargs={"hidden": [128, 128]}, data="digits", optimizer="sgd", lr=0.05,
                  momentum=0.9, batch_size=128, epochs=20, augment=True, factors=[1, 2, 4, 8, 16], m=50),
    "paper": dict(model="vgg16", data="cifar100", optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4,
                  batch_size=128, epochs=300, augment=True, factors=[1, 2, 5, 10, 100], m=100),
}


def augmented_loader(x: torch.Tensor, y: torch.Tensor, factor: int, augment: Augment, seed: int,
                     batch_size: int = 1024, device="cpu"):
    """The original samples plus ``factor - 1`` augmented copies, as in-order batches (N = factor * n)."""
    batches = [(xb.to(device), yb.to(device)) for xb, yb in BatchLoader(x, y, batch_size, shuffle=False)]
    for k in range(1, factor):
        loader = BatchLoader(x, y, batch_size, shuffle=False, seed=seed + k, augment=augment)
        batches += [(xb.to(device), yb.to(device)) for xb, yb in loader]
    return batches


def run(folder: Path, params: Dict[str, Any], *, seed: int = 0, progress: bool = True, overwrite: bool = False,
        device: str = "auto") -> Dict[str, Any]:
    data = load_data(params["data"], **params.get("data_kwargs", {}))
    if data.augment is None:
        raise ValueError(f"data set {params['data']!r} defines no augmentation; the augmentation recipe needs one.")
    cfg = train_config(params, seed, device)
    r = Run(folder / "train", cfg.to_dict(), overwrite=overwrite)
    if overwrite:
        for old in folder.glob("spectrum_x*.json"):
            old.unlink()
    final = train(cfg, r, data, progress=progress)
    dev = resolve_device(device)
    model = load_trained_model(r, cfg, data, str(dev))
    spectra, rows = {}, []
    for k in params["factors"]:
        f = folder / f"spectrum_x{k}.json"
        if not f.exists():  # each factor is saved as it completes, so a rerun resumes here
            loader = augmented_loader(data.train_x, data.train_y, k, data.augment, seed, device=dev)
            s = hessfast.lanczos(model, loader, m=params["m"], seed=seed, progress=False)
            s.save(f)
        s = hessfast.Spectrum.load(f)
        spectra[f"x{k} (N={s.meta['N']})"] = s
        rows.append({"factor": k, "N": s.meta["N"], "lambda_max": s.lambda_max, "lambda_min": s.lambda_min,
                     "degeneracy": s.degeneracy().mass})
    pngs = [plots.densities(spectra, folder / "augmentation_density.png",
                            title="Hessian spectrum vs amount of augmentation"),
            plots.series([x["N"] for x in rows], {"lambda_max": [x["lambda_max"] for x in rows],
                                                   "|lambda_min|": [abs(x["lambda_min"]) for x in rows]},
                         folder / "augmentation_extremes.png", xlabel="samples N", ylabel="eigenvalue",
                         logx=True, logy=True)]
    lines = [f"Model trained with augmentation: {final.get('status')}, "
             f"validation error {fmt(final.get('val_err'))}.", ""]
    lines += md_table(["factor", "N", "lambda_max", "lambda_min", "degeneracy"],
                      [[x["factor"], x["N"], x["lambda_max"], x["lambda_min"], x["degeneracy"]] for x in rows])
    return write_results(folder, "augmentation", params, {"final": final, "measurements": rows}, lines, pngs)
