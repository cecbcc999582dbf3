"""``tuner`` (Figures 17, 18): learning rate and momentum learned from the batch Hessian against a fixed
schedule, all three with SWA near the end (Section 10.2).

Runs: ``schedule`` (equation 21 from ``lr``, SGD with momentum), ``polyak`` and ``nesterov``
(:class:`hessfast.tuner.CurvatureTuner` every ``tune_every`` steps with m = ``tune_m``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

from ...tuner import CurvatureTuner
from .. import plots
from ..data import load_data
from ..runs import Run
from ..train import train
from ._common import md_table, train_config, write_results

DESCRIPTION = "Figures 17-18: curvature-tuned lr and momentum (Polyak, Nesterov) against a fixed schedule, with SWA"

SCALES: Dict[str, Dict[str, Any]] = {
    "tiny": dict(model="mlp", model_kwargs={"hidden": [32]}, data="digits", lr=0.05, momentum=0.9, batch_size=64,
                 epochs=3, swa_start=0.6, tune_every=10, tune_m=10, variant="standard"),
    "small": dict(model="mlp", model_kwargs={"hidden": [128, 128]}, data="digits", lr=0.05, momentum=0.9,
                  batch_size=128, epochs=20, swa_start=0.75, tune_every=24, tune_m=20, variant="standard"),
    "paper": dict(model="preresnet110", data="cifar100", lr=0.1, momentum=0.9, weight_decay=5e-4, batch_size=128,
                  epochs=300, augment=True, swa_start=0.75, swa_lr=0.05, tune_every=7040, tune_m=20,
                  variant="standard"),  # 7040 steps = 20 epochs of 45,000 / 128
}


def run(folder: Path, params: Dict[str, Any], *, seed: int = 0, progress: bool = True, overwrite: bool = False,
        device: str = "auto") -> Dict[str, Any]:
    data = load_data(params["data"], **params.get("data_kwargs", {}))
    results, curves, lr_traj, mom_traj = {}, {}, {}, {}
    for method in ("schedule", "polyak", "nesterov"):
        cfg = train_config(params, seed, device, optimizer="sgd", nesterov=(method == "nesterov"))
        tune = {"rule": method, "every": params["tune_every"], "m": params["tune_m"], "variant": params["variant"]}
        r = Run(folder / method, {"train": cfg.to_dict(), "tuner": tune if method != "schedule" else None},
                overwrite=overwrite)
        def make(model, opt, _m=method):
            return CurvatureTuner(opt, model, every=params["tune_every"], m=params["tune_m"], rule=_m,
                                  variant=params["variant"], seed=seed)
        final = train(cfg, r, data, make_tuner=None if method == "schedule" else make, progress=progress)
        ep = r.records("epoch")
        results[method] = final
        x = [e["epoch"] for e in ep]
        curves[method] = {"train": (x, [e["train_err"] for e in ep]), "val": (x, [e["val_err"] for e in ep])}
        swa = [e for e in ep if "swa_val_err" in e]
        if swa:
            curves[method]["SWA val"] = ([e["epoch"] for e in swa], [e["swa_val_err"] for e in swa])
        if method != "schedule":
            t = r.records("tuner")
            lr_traj[method] = ([e["epoch"] for e in t], [e["lr"] for e in t])
            mom_traj[method] = ([e["epoch"] for e in t], [e["momentum"] for e in t])
        else:
            lr_traj[method] = (x[1:], [e["lr"] for e in ep[1:]])
            mom_traj[method] = (x[1:], [params["momentum"]] * len(x[1:]))
    panels = {m: {f"{m} {k}": v for k, v in c.items()} for m, c in curves.items()}
    pngs = [plots.curves(panels, folder / "errors.png", ncols=3)]
    pngs.append(_lr_mom_plot(lr_traj, mom_traj, folder / "lr_momentum.png"))
    lines = md_table(["method", "status", "train err", "val err", "SWA val err", "final lr"],
                     [[m, f["status"], f.get("train_err"), f.get("val_err"), f.get("swa_val_err", "-"), f.get("lr")]
                      for m, f in results.items()])
    out = {"final": results, "lr": {m: v[1] for m, v in lr_traj.items()},
           "momentum": {m: v[1] for m, v in mom_traj.items()}}
    return write_results(folder, "tuner", params, out, lines, pngs)


def _lr_mom_plot(lr_traj, mom_traj, path):
    from hessfast.utils.plotting import pyplot

    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for m, (x, y) in lr_traj.items():
        a.plot(x, y, "o-", label=m)
    for m, (x, y) in mom_traj.items():
        b.plot(x, y, "o-", label=m)
    a.set_yscale("log")
    a.set_xlabel("epoch")
    a.set_ylabel("learning rate")
    b.set_xlabel("epoch")
    b.set_ylabel("momentum")
    a.legend()
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
