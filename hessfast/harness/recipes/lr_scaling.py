"""``lr-scaling`` (Sections 10 and 11): does the largest stable learning rate scale linearly (SGD) or
with the square root (Adam) of the batch size?

1. Grid search at the reference batch size B0 for each optimiser. A run *diverges* when its training
   loss becomes NaN/Inf or exceeds ``diverge_loss``; it is recorded and the sweep goes on. The chosen
   learning rate is the largest on the grid that did not diverge and whose final validation error is
   within ``tol`` of the grid's best (the paper's "working maximum" for networks without a hard NaN edge).
2. For every batch size B and both rules, train with lr0 * B / B0 (linear) and lr0 * sqrt(B / B0)
   (square root) for the same number of epochs, recording train and validation error curves.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

from .. import plots
from ..data import load_data
from ..runs import Run
from ..train import train
from ._common import fmt, md_table, train_config, write_results

DESCRIPTION = ("Sections 10-11: largest stable lr at B0, then linear and square-root scaling across batch sizes "
               "(SGD, Adam)")



def _log_grid(lo: float, hi: float, n: int) -> List[float]:
    """``n`` learning rates log-spaced from 10^lo to 10^hi, as plain floats with 4 significant digits."""
    return [float(f"{x:.4g}") for x in np.logspace(lo, hi, n)]


SCALES: Dict[str, Dict[str, Any]] = {
    "tiny": dict(model="mlp", model_kwargs={"hidden": [32]}, data="digits", epochs=2, B0=64,
                 batch_sizes=[32, 64, 128], optimizers=["sgd", "adam"], momentum=0.9,
                 grid={"sgd": [0.02, 0.1, 0.5, 50.0], "adam": [1e-3, 1e-2, 1e-1]}, tol=0.05, diverge_loss=100.0),
    "small": dict(model="mlp", model_kwargs={"hidden": [128, 128]}, data="digits", epochs=20, B0=128,
                  batch_sizes=[16, 32, 64, 128, 256, 512], optimizers=["sgd", "adam"], momentum=0.9,
                  grid={"sgd": _log_grid(-2.5, 0.5, 13), "adam": _log_grid(-4, -0.5, 15)},
                  tol=0.02, diverge_loss=100.0),
    "paper": dict(model="vgg16", data="cifar100", epochs=200, B0=128, batch_sizes=[16, 32, 64, 128, 256, 512, 1024],
                  optimizers=["sgd", "adam"], momentum=0.9, augment=True,
                  grid={"sgd": _log_grid(-3, 0, 13), "adam": _log_grid(-5, -2, 13)},
                  tol=0.02, diverge_loss=1000.0),
}


def _run_one(folder: Path, data, params, seed, device, progress, overwrite, *, optimizer, lr, batch_size):
    cfg = train_config(params, seed, device, optimizer=optimizer, lr=float(lr), batch_size=int(batch_size),
                       diverge_loss=params.get("diverge_loss"))
    name = f"{optimizer}_B{batch_size}_lr{lr:.6g}"
    r = Run(folder / "runs" / name, cfg.to_dict(), overwrite=overwrite)
    final = train(cfg, r, data, progress=progress)
    curve = [[e["epoch"], e["train_err"], e["val_err"]] for e in r.records("epoch")]
    return {"name": name, "optimizer": optimizer, "B": int(batch_size), "lr": float(lr),
            "status": final["status"], "train_err": final.get("train_err"), "val_err": final.get("val_err"),
            "train_loss": final.get("train_loss"), "curve": curve}


def choose_lr(rows: List[Dict[str, Any]], tol: float) -> float | None:
    """Largest learning rate that did not diverge and ends within ``tol`` of the best validation error."""
    ok = [r for r in rows if r["status"] == "finished" and r["val_err"] is not None and math.isfinite(r["val_err"])]
    if not ok:
        return None
    best = min(r["val_err"] for r in ok)
    return max(r["lr"] for r in ok if r["val_err"] <= best + tol)


def run(folder: Path, params: Dict[str, Any], *, seed: int = 0, progress: bool = True, overwrite: bool = False,
        device: str = "auto") -> Dict[str, Any]:
    data = load_data(params["data"], **params.get("data_kwargs", {}))
    B0 = params["B0"]
    grid_rows, chosen, scaling = [], {}, []
    for opt in params["optimizers"]:
        rows = [_run_one(folder, data, params, seed, device, progress, overwrite, optimizer=opt, lr=lr, batch_size=B0)
                for lr in params["grid"][opt]]
        grid_rows += rows
        chosen[opt] = choose_lr(rows, params["tol"])
        if chosen[opt] is None:
            continue
        for rule in ("linear", "sqrt"):
            for B in params["batch_sizes"]:
                ratio = B / B0
                lr = chosen[opt] * (ratio if rule == "linear" else math.sqrt(ratio))
                row = _run_one(folder, data, params, seed, device, progress, overwrite, optimizer=opt, lr=lr,
                               batch_size=B)
                scaling.append({"rule": rule, **row})

    pngs = []
    for opt in params["optimizers"]:
        rows = [r for r in grid_rows if r["optimizer"] == opt]
        fig_y = {"final val error": [r["val_err"] if r["status"] == "finished" else np.nan for r in rows],
                 "final train error": [r["train_err"] if r["status"] == "finished" else np.nan for r in rows]}
        pngs.append(plots.series([r["lr"] for r in rows], fig_y, folder / f"grid_{opt}.png", xlabel="learning rate",
                                 ylabel="error (diverged runs left out)", logx=True,
                                 title=f"{opt} at B0={B0}: chosen lr {fmt(chosen[opt])}"))
    panels = {}
    for opt in params["optimizers"]:
        for rule in ("linear", "sqrt"):
            lines = {}
            for r in (s for s in scaling if s["optimizer"] == opt and s["rule"] == rule):
                tag = f"B={r['B']}" + (" (diverged)" if r["status"] == "diverged" else "")
                ep = [c[0] for c in r["curve"]]
                lines[f"{tag} train"] = (ep, [c[1] for c in r["curve"]])
                lines[f"{tag} val"] = (ep, [c[2] for c in r["curve"]])
            if lines:
                panels[f"{opt}, {rule} scaling from lr {fmt(chosen[opt])} at B0={B0}"] = lines
    if panels:
        pngs.append(plots.curves(panels, folder / "scaling_curves.png"))
    # final validation error against B for each (optimiser, rule): flat means the rule "works"
    fin = {}
    for opt in params["optimizers"]:
        for rule in ("linear", "sqrt"):
            rs = sorted((s for s in scaling if s["optimizer"] == opt and s["rule"] == rule), key=lambda s: s["B"])
            if rs:
                fin[f"{opt} {rule}"] = [s["val_err"] if s["status"] == "finished" else np.nan for s in rs]
    if fin:
        pngs.append(plots.series(params["batch_sizes"], fin, folder / "final_val_err.png", xlabel="batch size B",
                                 ylabel="final validation error (gap: diverged)", logx=True,
                                 ticks_at_x=True))

    lines = ["Chosen learning rates at B0 = %d: %s." % (B0, ", ".join(f"{k} {fmt(v)}" for k, v in chosen.items())),
             "", "## Grid at B0", ""]
    lines += md_table(["optimizer", "lr", "status", "train err", "val err"],
                      [[r["optimizer"], r["lr"], r["status"], r["train_err"], r["val_err"]] for r in grid_rows])
    lines += ["", "## Scaling", ""]
    lines += md_table(["optimizer", "rule", "B", "lr", "status", "train err", "val err"],
                      [[s["optimizer"], s["rule"], s["B"], s["lr"], s["status"], s["train_err"], s["val_err"]]
                       for s in scaling])
    diverged = [r["name"] for r in grid_rows + scaling if r["status"] == "diverged"]
    lines += ["", f"Diverged runs (recorded, sweep continued): {', '.join(diverged) or 'none'}."]
    results = {"B0": B0, "chosen_lr": chosen, "grid": grid_rows, "scaling": scaling, "diverged": diverged}
    return write_results(folder, "lr-scaling", params, results, lines, pngs)
