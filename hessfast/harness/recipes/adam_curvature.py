"""``adam-curvature`` (Figure 19): the curvature Adam implies, read from its state.

Adam divides the step by ``sqrt(v_hat_i) + eps``; ``eta_i = sqrt(v_hat_i)`` with ``v_hat = v / (1 - beta_2^t)``
is its diagonal curvature estimate and ``eta_i + eps`` the preconditioner. At each measured epoch the
recipe stores a histogram of ``eta_i + eps`` on fixed log-spaced bins and its quantiles; the plot
shows the densities per epoch (the paper: values from ~0.6 down to the 1e-8 floor set by eps).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch

from .. import plots
from ..runs import Run
from ..train import TrainContext, train
from ._common import callback_records, md_table, train_config, write_results

DESCRIPTION = "Figure 19: density of Adam's implied curvature eta_i (from its second-moment state) over training"

SCALES: Dict[str, Dict[str, Any]] = {
    "tiny": dict(model="mlp", model_kwargs={"hidden": [32]}, data="digits", optimizer="adam", lr=1e-3,
                 batch_size=64, epochs=3, every=1, eps=1e-8),
    "small": dict(model="mlp", model_kwargs={"hidden": [128, 128]}, data="digits", optimizer="adam", lr=1e-3,
                  batch_size=128, epochs=20, every=5, eps=1e-8),
    "paper": dict(model="vgg16", data="cifar100", optimizer="adam", lr=4e-4, batch_size=128, epochs=200,
                  augment=True, every=25, eps=1e-8),
}

BINS = np.logspace(-12, 2, 141)  # fixed edges so histograms of different epochs compare
QUANTILES = (0.0, 0.01, 0.1, 0.5, 0.9, 0.99, 1.0)


def implied_curvature(optimizer: torch.optim.Optimizer) -> np.ndarray:
    """``sqrt(v_hat) + eps`` of every parameter Adam has a state for, flattened (empty before step 1)."""
    out = []
    for g in optimizer.param_groups:
        beta2, eps = g["betas"][1], g["eps"]
        for p in g["params"]:
            st = optimizer.state.get(p, {})
            if "exp_avg_sq" not in st:
                continue
            step = float(st["step"])
            v_hat = st["exp_avg_sq"] / (1.0 - beta2 ** step)
            out.append((v_hat.sqrt() + eps).detach().cpu().double().ravel().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def run(folder: Path, params: Dict[str, Any], *, seed: int = 0, progress: bool = True, overwrite: bool = False,
        device: str = "auto") -> Dict[str, Any]:
    cfg = train_config(params, seed, device)
    if cfg.optimizer not in ("adam", "adamw"):
        raise ValueError(f"adam-curvature needs optimizer adam or adamw, got {cfg.optimizer!r}.")
    r = Run(folder / "train", {"train": cfg.to_dict(), "every": params["every"]}, overwrite=overwrite)

    def callback(epoch: int, ctx: TrainContext):
        if epoch == 0 or (epoch % params["every"] and epoch != cfg.epochs):
            return None
        eta = implied_curvature(ctx.optimizer)
        counts, _ = np.histogram(np.clip(eta, BINS[0], BINS[-1]), bins=BINS)
        return {"eta_hist": counts.tolist(), "eta_quantiles": np.quantile(eta, QUANTILES).tolist(), "P": int(eta.size)}

    final = train(cfg, r, callback=callback, progress=progress)
    recs = callback_records(r)
    centres = np.sqrt(BINS[:-1] * BINS[1:])
    values = {f"epoch {rec['epoch']}": np.repeat(centres, np.asarray(rec["eta_hist"], dtype=int)) for rec in recs}
    pngs = [plots.log_histograms(values, folder / "adam_eta.png",
                                 xlabel="$\\eta_i + \\epsilon$ (Adam's implied curvature)",
                                 title=f"Adam, lr={cfg.lr}, eps={cfg.eps}")]
    rows = [[rec["epoch"], *rec["eta_quantiles"]] for rec in recs]
    lines = md_table(["epoch", "min", "1%", "10%", "median", "90%", "99%", "max"], rows)
    out = {"final": final, "bins": BINS.tolist(),
           "measurements": [{"epoch": rec["epoch"], "quantiles": dict(zip(map(str, QUANTILES), rec["eta_quantiles"])),
                             "hist": rec["eta_hist"]} for rec in recs]}
    return write_results(folder, "adam-curvature", params, out, lines, pngs)
