"""``lr-advice``: is the learning rate :func:`hessfast.lr_advice` gives at each batch size one to train with?

1. **Measure.** Warm the model up for ``warmup_epochs`` of SGD at ``warmup_lr`` and batch ``B0`` (0: the
   initialisation itself) and run :func:`hessfast.lr_advice` there on the training set: the mean batch
   Hessian lambda_1 at every B to ``target_rel_se``, the fitted batch-size law, and for SGD (momentum
   ``momentum``) ``safety x 2 (1 + momentum) / lambda_1(B)``, never above 2 / measured batch lambda_1.
2. **Train.** For each B, from the *initialisation* (the same seeded weights for every run) and for the
   same number of epochs with the schedule of equation 21, at the advised rate times each factor of
   ``grid`` (1/4, 1/2, 1, 2, 4). A run diverges when its training loss is NaN/Inf or above
   ``diverge_loss``; it is recorded and the sweep goes on.
3. **Judge.** Per B: did the advised rate train (no divergence, and at most half the initial training
   error at the end), and is its final validation error within ``tol`` (1 point) of the best of the grid?
   Against the baselines users use today, all from ``lr_B0``, the best rate at ``B0`` of the grid and (SGD)
   of ``sgd_grid``, a fixed log grid, so that a poor advice does not also make poor baselines: the same
   rate at every B, linear scaling ``lr_B0 B / B0`` and square-root scaling ``lr_B0 sqrt(B / B0)``
   (Goyal et al. 2017; Krizhevsky 2014); and the advice's own rule given ``reference=(B0, lr_B0)``
   (``lr_B0 * lambda_1(B0) / lambda_1(B)`` under the cap, for SGD; the capped square root for Adam).

Adam (when ``optimizers`` lists it): the rates of ``adam_grid`` are tried at ``B0`` and the best becomes the
reference of the advice, as a user would tune it (the square-root rule capped by the measured curvature);
each B then gets the same ``grid`` around its advised rate.

The measurement is repeated on a rerun (it is deterministic: batch cap, fixed ``hvp_mode``, seeds);
finished training runs are reused.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

import hessfast

from ..data import load_data
from ..measure import full_loader
from ..models import build_model
from ..runs import Run
from ..train import load_trained_model, resolve_device, train
from ._common import fmt, md_table, train_config, write_results

DESCRIPTION = ("lr advice from the measured batch curvature, validated by training: advised rate vs a x1/4..x4 grid "
               "and the fixed / linear / square-root baselines")

_GRID = [0.25, 0.5, 1.0, 2.0, 4.0]
_ADAM_GRID = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
_SGD_GRID = [0.01, 0.03, 0.1, 0.3, 1.0]
_MEASURE = dict(momentum=0.9, safety=0.5, warmup_lr=0.05, target_rel_se=0.1, m=20, num_probes=4, tol=0.01,
                diverge_loss=100.0, grid=_GRID, adam_grid=_ADAM_GRID, sgd_grid=_SGD_GRID, measure_samples=None)
SCALES: Dict[str, Dict[str, Any]] = {
    "tiny": {**_MEASURE, **dict(model="mlp", model_kwargs={"hidden": [32]}, data="digits", epochs=2, B0=64,
                                batch_sizes=[32, 64, 128], grid=[0.5, 1.0, 2.0], optimizers=["sgd"], warmup_epochs=1,
                                adam_grid=[1e-3, 1e-2], sgd_grid=[0.03, 0.3],
                                target_rel_se=0.25, max_batches=6, m=12, num_probes=1)},
    "small": {**_MEASURE, **dict(model="mlp", model_kwargs={"hidden": [128, 128]}, data="digits", epochs=20,
                                 B0=128, batch_sizes=[16, 32, 64, 128, 256, 512], optimizers=["sgd", "adam"],
                                 warmup_epochs=5, max_batches=40)},
    "paper": {**_MEASURE, **dict(model="vgg16", data="cifar100", epochs=200, B0=128, augment=True,
                                 batch_sizes=[16, 32, 64, 128, 256, 512, 1024], optimizers=["sgd", "adam"],
                                 warmup_epochs=5, warmup_lr=0.01, adam_grid=[1e-5, 3e-5, 1e-4, 4e-4, 1e-3, 3e-3],
                                 sgd_grid=[0.003, 0.01, 0.03, 0.1],
                                 max_batches=30, m=30,
                                 measure_samples=5000, diverge_loss=1000.0)},
}


def _round(lr: float) -> float:
    """4 significant digits: one rate, one run folder, however it was computed."""
    return float(f"{lr:.4g}")


def _train_one(folder: Path, data, params, seed, device, progress, overwrite, *, optimizer, lr, B) -> Dict[str, Any]:
    """One training run (reused when it is already done); ``trains``: it did not diverge and ended with at
    most half its initial training error (a run stuck at chance, e.g. a collapsed network, does not train)."""
    cfg = train_config(params, seed, device, optimizer=optimizer, lr=lr, batch_size=int(B),
                       diverge_loss=params.get("diverge_loss"))
    name = f"{optimizer}_B{B}_lr{lr:.4g}"
    run = Run(folder / "runs" / name, cfg.to_dict(), overwrite=overwrite)
    final = train(cfg, run, data, progress=progress)
    first = run.records("epoch")[0]["train_err"]
    trains = final["status"] == "finished" and final["train_err"] <= 0.5 * first
    return {"name": name, "optimizer": optimizer, "B": int(B), "lr": lr, "status": final["status"],
            "val_err": final.get("val_err"), "train_err": final.get("train_err"), "trains": bool(trains)}


def _measured_model(folder: Path, data, params, seed, device, progress, overwrite):
    """The model the curvature is measured on: after the warm-up, or the initialisation."""
    if params["warmup_epochs"] <= 0:
        return build_model(params["model"], num_classes=data.num_classes, in_shape=data.in_shape, seed=seed,
                           **params.get("model_kwargs", {})).to(resolve_device(device))
    cfg = train_config(params, seed, device, optimizer="sgd", lr=params["warmup_lr"], batch_size=params["B0"],
                       epochs=params["warmup_epochs"], schedule="constant", diverge_loss=params.get("diverge_loss"))
    run = Run(folder / "warmup", cfg.to_dict(), overwrite=overwrite)
    res = train(cfg, run, data, progress=progress)
    if res["status"] != "finished":
        raise RuntimeError(f"the warm-up run diverged ({res.get('diverged_at')}); lower warmup_lr.")
    return load_trained_model(run, cfg, data, device=str(resolve_device(device)))


def _measure(folder: Path, data, params, seed, device, progress, overwrite) -> "hessfast.Prediction":
    model = _measured_model(folder, data, params, seed, device, progress, overwrite)
    loader = full_loader(data, device=resolve_device(device), max_samples=params.get("measure_samples"))
    advice = hessfast.lr_advice(model, loader, params["batch_sizes"], optimizer="sgd", momentum=params["momentum"],
                                safety=params["safety"], target_rel_se=params["target_rel_se"],
                                max_batches=params["max_batches"], m=params["m"], num_probes=params["num_probes"],
                                seed=seed, hvp_mode="reverse", progress=progress)
    return advice.prediction


def _judge(rows: List[Dict[str, Any]], advised: float, tol: float) -> Dict[str, Any]:
    ok = [r for r in rows if r["status"] == "finished" and r["val_err"] is not None and math.isfinite(r["val_err"])]
    # ties go to the rate nearest the advised one
    best = min(ok, key=lambda r: (r["val_err"], abs(math.log(r["lr"] / advised)))) if ok else None
    adv = next(r for r in rows if r["lr"] == advised)
    return {"advised_lr": advised, "advised_status": adv["status"], "advised_val_err": adv["val_err"],
            "best_lr": None if best is None else best["lr"], "best_val_err": None if best is None else best["val_err"],
            "best_factor": None if best is None else best["lr"] / advised, "diverged": adv["status"] != "finished",
            "trains": adv["trains"],
            "within_tol": bool(adv["trains"] and best is not None and adv["val_err"] <= best["val_err"] + tol)}


def _sweep(folder, data, params, seed, device, progress, overwrite, opt, advised, scaled) -> Dict[str, Any]:
    """Grid around the advised rate at every B, then the baselines from ``lr_B0``, the best rate at B0:
    fixed, linear, square root, and ``scaled(lr_B0)`` (the advice's own rule with ``reference=(B0, lr_B0)``)."""
    run = lambda B, lr: _train_one(folder, data, params, seed, device, progress, overwrite,  # noqa: E731
                                   optimizer=opt, lr=lr, B=B)
    grid = {B: [run(B, _round(advised[B] * f)) for f in params["grid"]] for B in params["batch_sizes"]}
    judged = {B: _judge(grid[B], _round(advised[B]), params["tol"]) for B in grid}
    B0 = params["B0"]
    # lr_B0 as a user would tune it: the best of the grid around the advice and of a fixed log grid at B0
    tuning = [run(B0, _round(lr)) for lr in params[f"{opt}_grid"]] if opt == "sgd" else []
    lr0 = _judge(grid[B0] + tuning, _round(advised[B0]), params["tol"])["best_lr"]
    base = {}
    if lr0 is not None:
        curv = scaled(lr0)
        rules = {"curvature": lambda B: curv[B], "fixed": lambda B: lr0, "linear": lambda B: lr0 * B / B0,
                 "sqrt": lambda B: lr0 * math.sqrt(B / B0)}
        base = {name: {B: run(B, _round(f(B))) for B in params["batch_sizes"]} for name, f in rules.items()}
    return {"grid": grid, "judged": judged, "lr_B0": lr0, "tuning": tuning, "baselines": base}


def _adam_advised(folder, data, params, seed, device, progress, overwrite, pred):
    """The Adam reference is the best rate of ``adam_grid`` at B0 (as a user would tune it); the advice scales it."""
    B0 = params["B0"]
    rows = [_train_one(folder, data, params, seed, device, progress, overwrite, optimizer="adam", lr=_round(lr), B=B0)
            for lr in params["adam_grid"]]
    finished = [r for r in rows if r["status"] == "finished" and math.isfinite(r["val_err"])]
    best = min(finished, key=lambda r: r["val_err"])["lr"] if finished else None
    if best is None:
        raise RuntimeError(f"every Adam rate of adam_grid={params['adam_grid']} diverged at B0={B0}; lower it.")
    adv = hessfast.LRAdvice.from_prediction(pred, "adam", reference=(B0, best))
    adv.save(folder / "advice_adam.json")
    adv.plot(folder / "advice_adam.png")
    return {r["B"]: r["lr"] for r in adv.rows}, best


def run(folder: Path, params: Dict[str, Any], *, seed: int = 0, progress: bool = True, overwrite: bool = False,
        device: str = "auto") -> Dict[str, Any]:
    if params["B0"] not in params["batch_sizes"]:
        raise ValueError(f"B0={params['B0']} must be one of batch_sizes={params['batch_sizes']} (the baselines "
                         "start from the best rate there).")
    if 1.0 not in params["grid"]:
        raise ValueError(f"grid={params['grid']} must contain 1.0 (the advised rate itself).")
    data = load_data(params["data"], **params.get("data_kwargs", {}))
    pred = _measure(folder, data, params, seed, device, progress, overwrite)
    sgd = hessfast.LRAdvice.from_prediction(pred, "sgd", momentum=params["momentum"], safety=params["safety"])
    sgd.save(folder / "advice_sgd.json")
    pngs = [Path(folder / "advice_sgd.png")]
    sgd.plot(pngs[0])
    results: Dict[str, Any] = {"measurement": {"fit": pred.fit.chosen, "critical_batch": pred.critical_batch,
                                               "rows": [{k: r[k] for k in ("B", "num_batches", "stop", "batch_mean",
                                                                           "batch_se", "fit", "regime")}
                                                        for r in pred.rows], "lam_full": pred.lam_max},
                               "optimizers": {}}
    for opt in params["optimizers"]:
        reference = None
        if opt == "sgd":
            advised = {r["B"]: r["lr"] for r in sgd.rows}
        else:
            advised, reference = _adam_advised(folder, data, params, seed, device, progress, overwrite, pred)
            pngs.append(folder / "advice_adam.png")
        def scaled(lr0, opt=opt):
            adv = hessfast.LRAdvice.from_prediction(pred, opt, momentum=params["momentum"],
                                                    reference=(params["B0"], lr0))
            return {r["B"]: r["lr"] for r in adv.rows}

        res = _sweep(folder, data, params, seed, device, progress, overwrite, opt, advised, scaled)
        res["reference"] = reference
        results["optimizers"][opt] = res
        pngs += [_plot_sweep(folder, opt, res, params), _plot_vs_batch(folder, opt, res, params)]
    lines = _summary(results, params)
    return write_results(folder, "lr-advice", params, results, lines, pngs)


# -------------------------------------------------------------------------------------------------- report
def _summary(results: Dict[str, Any], params: Dict[str, Any]) -> List[str]:
    m = results["measurement"]
    crit = "none (flat)" if m["critical_batch"] is None else fmt(m["critical_batch"])
    lines = [f"Measured on the model after {params['warmup_epochs']} warm-up epoch(s) (SGD lr {params['warmup_lr']}, "
             f"B0 = {params['B0']}): full-data lambda_1 = {fmt(m['lam_full'])}, fitted law {m['fit']}, "
             f"critical batch {crit}.", ""]
    lines += md_table(["B", "batches", "batch lambda_1", "s.e.", "fit", "regime"],
                      [[r["B"], f"{r['num_batches']}{'*' if r['stop'] != 'target' else ''}", r["batch_mean"],
                        r["batch_se"], r["fit"], r["regime"]] for r in m["rows"]])
    for opt, res in results["optimizers"].items():
        tol = 100 * params["tol"]
        lines += ["", f"## {opt.upper()}: advised rate against the grid and the baselines (val. error, %)", "",
                  f"Baselines start from lr_B0 = {fmt(res['lr_B0'])}, the best rate at B0 = {params['B0']} of the grid "
                  f"around the advice{' and of sgd_grid' if opt == 'sgd' else ''}."
                  + ("" if res.get("reference") is None else
                     f" The advice's reference is {fmt(res['reference'])}, the best of adam_grid at B0."), ""]
        head = ["B", "advised lr", "advised", "grid best (factor)", "trains", f"within {tol:g} pt",
                "curvature x lr_B0", "fixed", "linear", "sqrt"]
        rows = []
        pct = lambda r: "div." if r["status"] != "finished" else f"{100 * r['val_err']:.1f}"  # noqa: E731
        for B, j in res["judged"].items():
            b = {k: res["baselines"][k][B] for k in res["baselines"]}
            adv = next(r for r in res["grid"][B] if r["lr"] == j["advised_lr"])
            best = "-" if j["best_val_err"] is None else f"{100 * j['best_val_err']:.1f} (x{j['best_factor']:.2g})"
            rows.append([B, j["advised_lr"], pct(adv), best, "yes" if j["trains"] else "no",
                         "yes" if j["within_tol"] else "no",
                         *(pct(b[k]) if k in b else "-" for k in ("curvature", "fixed", "linear", "sqrt"))])
        lines += md_table(head, rows)
        n_ok = sum(j["within_tol"] for j in res["judged"].values())
        lines += ["", f"The advised rate trained at {sum(j['trains'] for j in res['judged'].values())} of "
                      f"{len(res['judged'])} batch sizes and ended within {tol:g} point of the grid's best at {n_ok}. "
                      "'trains': no divergence and at most half the initial training error at the end; "
                      "'curvature x lr_B0': the advice's rule with reference (B0, lr_B0)."]
    return lines


def _plot_sweep(folder: Path, opt: str, res: Dict[str, Any], params) -> Path:
    """Final validation error against the learning rate, one line per B; stars: advised; open marks: baselines."""
    from hessfast.utils.plotting import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, (B, rows) in enumerate(res["grid"].items()):
        c = f"C{i % 10}"
        rs = sorted(rows, key=lambda r: r["lr"])
        ax.plot([r["lr"] for r in rs], [r["val_err"] if r["status"] == "finished" else np.nan for r in rs], "o-",
                color=c, ms=3, label=f"B={B}")
        j = res["judged"][B]
        if not j["diverged"]:
            ax.plot(j["advised_lr"], j["advised_val_err"], "*", color=c, ms=12, mec="k")
        for mark, name in (("D", "curvature"), ("s", "fixed"), ("^", "linear"), ("v", "sqrt")):
            r = res["baselines"].get(name, {}).get(B)
            if r is not None and r["status"] == "finished":
                ax.plot(r["lr"], r["val_err"], mark, color=c, mfc="none", ms=6)
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=0.01)  # log above 1%, linear below: a 0% error stays on the plot
    ax.set_ylim(bottom=0)
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final validation error (symlog; diverged: left out)")
    ax.set_title(f"{opt}: grid x{params['grid'][0]:g}..x{params['grid'][-1]:g} around the advice (*); "
                 "open: curvature x lr_B0 (D), fixed (s), linear (^), sqrt (v)", fontsize=8)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = folder / f"sweep_{opt}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_vs_batch(folder: Path, opt: str, res: Dict[str, Any], params) -> Path:
    from .. import plots

    Bs = list(res["judged"])
    nan = lambda r: r["val_err"] if r["status"] == "finished" else np.nan  # noqa: E731
    ys = {"advised": [np.nan if res["judged"][B]["diverged"] else res["judged"][B]["advised_val_err"] for B in Bs],
          "grid best": [res["judged"][B]["best_val_err"] for B in Bs]}
    for name, by_B in res["baselines"].items():
        ys[name] = [nan(by_B[B]) for B in Bs]
    return plots.series(Bs, ys, folder / f"val_err_{opt}.png", xlabel="batch size B",
                        ylabel="final validation error (gap: diverged)", logx=True, ticks_at_x=True,
                        title=f"{opt}: advised rate vs grid best and baselines")
