"""``hessfast demo``: the whole method on the embedded digits data in well under a minute on a laptop CPU.

1. Train the 64-128-128-10 MLP on scikit-learn's digits for a few epochs (SGD, momentum 0.9).
2. Full-data Hessian and GGN spectra (Lanczos over all training samples) and batch spectra at B = 128.
3. :func:`hessfast.predict` for both curvatures: the variance sigma2; the measured mean batch lambda_1
   for B in {16, 32, 64, 128, 256}, each from as many random batches as it takes for a 10% standard
   error (capped at ``max_batches``); the fitted batch-size law with its critical batch; Theorem 4
   (Hessian) and Theorem 7 (GGN) as predictions with a verdict against the measurement.
4. Learning-rate advice from the measured curvature (:class:`hessfast.LRAdvice`): SGD with momentum 0.9
   at 0.5 x its stability limit 2(1 + 0.9) / lambda_1(B), never above 2 / measured batch lambda_1, and
   Adam's square-root rule from ``adam_lr`` at B = 128, capped where the curvature says it is unstable.

Every row of ``demo.json`` keeps, per curvature and B: ``batch_lambda1_mean``/``_se``/``_std``, ``num_batches``,
``fit_lambda1`` (and ``_lo``, ``_hi``), ``regime``, ``thm4_lambda1`` and ``thm7_lambda1`` with their verdicts,
``max_lr_sgd`` (2 / measured batch lambda_1, the measured stability limit of plain SGD), ``sgd_lr_advised``,
``adam_lr_advised``, ``adam_lr_sqrt`` (the same capped square-root rule) and ``sgd_lr_linear`` (the advised
B = 128 rate scaled linearly, held under 2 / measured batch lambda_1: the linear rule, for comparison).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import hessfast

from . import plots
from .data import load_data, random_batches
from .measure import full_loader
from .runs import Run, write_json
from .train import TrainConfig, load_trained_model, train


def run_demo(out: str | Path = "hessfast_out", *, epochs: int = 5, batch_sizes: Sequence[int] = (16, 32, 64, 128, 256),
             num_batches: Optional[int] = None, max_batches: int = 40, m: int = 60, m_batch: int = 12,
             ref_batch: int = 128, adam_lr: float = 1e-3, momentum: float = 0.9, safety: float = 0.5,
             variance_probes: int = 4, seed: int = 0, progress: bool = True, echo=print) -> Dict[str, Any]:
    """Train, measure, fit and advise (module docstring); returns what ``demo.json`` holds.

    ``num_batches`` fixes the random batches per batch size; None (default) draws until the mean batch
    lambda_1 has a 10% standard error, at most ``max_batches``.
    """
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_data("digits")
    cfg = TrainConfig(model="mlp", model_kwargs={"hidden": [128, 128]}, data="digits", optimizer="sgd", lr=0.05,
                      momentum=0.9, batch_size=64, epochs=epochs, schedule="constant", seed=seed, device="cpu")
    run = Run(out / "train", cfg.to_dict(), overwrite=True)  # a few seconds: always retrain
    final = train(cfg, run, data, progress=progress)
    model = load_trained_model(run, cfg, data)
    echo(f"trained {cfg.model} {cfg.model_kwargs['hidden']} on digits for {epochs} epochs: "
         f"train error {final['train_err']:.3f}, validation error {final['val_err']:.3f}")

    loader = full_loader(data)
    result: Dict[str, Any] = {"N": data.n_train, "epochs": epochs, "final": final, "ref_batch": ref_batch,
                              "adam_lr": adam_lr, "momentum": momentum, "safety": safety, "curvatures": {}}
    spectra_full, spectra_batch, advice = {}, {}, {}
    for c in ("hessian", "ggn"):
        full = hessfast.lanczos(model, loader, m=m, curvature=c, seed=seed, progress=False)
        xb, yb = random_batches(data.train_x, data.train_y, ref_batch, 1, seed=seed + 3)[0]
        batch = hessfast.lanczos(model, (xb, yb), m=m, curvature=c, seed=seed, progress=False)
        full.save(out / f"spectrum_{c}_full.json")
        batch.save(out / f"spectrum_{c}_batch{ref_batch}.json")
        spectra_full[c], spectra_batch[c] = full, batch
        pred = hessfast.predict(model, loader, batch_sizes=list(batch_sizes), curvature=c, num_batches=num_batches,
                                max_batches=max_batches, m=m_batch, num_probes=variance_probes,
                                reference_batch=ref_batch, seed=seed, progress=False)
        pred.save(out / f"predict_{c}.json")
        sgd = hessfast.LRAdvice.from_prediction(pred, "sgd", momentum=momentum, safety=safety)
        adam = hessfast.LRAdvice.from_prediction(pred, "adam", reference=(ref_batch, adam_lr))
        sgd.save(out / f"advice_sgd_{c}.json")
        adam.save(out / f"advice_adam_{c}.json")
        sgd.plot(out / f"advice_sgd_{c}.png")
        advice[c] = (sgd, adam)
        result["curvatures"][c] = _curvature_record(pred, full, batch, sgd, adam, ref_batch)
    result["elapsed_s"] = time.perf_counter() - t0
    write_json(out / "demo.json", result)
    _plots(out, spectra_full, spectra_batch, result, ref_batch)
    for line in format_table(result, advice):
        echo(line)
    echo(f"\nwrote {out}/demo.json, spectra, predictions and advice (JSON) and PNG plots "
         f"in {result['elapsed_s']:.0f} s")
    return result


def _curvature_record(pred, full, batch, sgd, adam, ref_batch: int) -> Dict[str, Any]:
    """One curvature's part of ``demo.json`` (module docstring)."""
    ref_sgd = next(r["lr"] for r in sgd.rows if r["B"] == ref_batch)
    rows = []
    for r, s, a in zip(pred.rows, sgd.rows, adam.rows):
        rows.append({
            "B": r["B"], "num_batches": r["num_batches"], "stop": r["stop"], "full_lambda1": pred.lam_max,
            "batch_lambda1_mean": r["batch_mean"], "batch_lambda1_se": r["batch_se"],
            "batch_lambda1_std": r["batch_std"], "fit_lambda1": r["fit"], "fit_lambda1_lo": r["fit_lo"],
            "fit_lambda1_hi": r["fit_hi"], "regime": r["regime"],
            "thm4_lambda1": r["theorem4"], "thm4_verdict": r["theorem4_verdict"],
            "thm7_lambda1": r["theorem7"], "thm7_verdict": r["theorem7_verdict"],
            "max_lr_sgd": r["max_lr_measured"], "sgd_lr_advised": s["lr"], "sgd_lr_set_by": s["limited_by"],
            "adam_lr_advised": a["lr"], "adam_lr_sqrt": a["lr"], "adam_lr_set_by": a["limited_by"],
            "sgd_lr_linear": min(ref_sgd * r["B"] / ref_batch, r["max_lr_measured"]),
        })
    crit_lo, crit_hi = pred.critical_batch_interval
    return {"P": pred.P, "lambda_max": full.lambda_max, "lambda_min": full.lambda_min,
            "degeneracy": full.degeneracy().mass, "batch_lambda_max": batch.lambda_max,
            "batch_lambda_min": batch.lambda_min, "sigma2": pred.sigma2,
            "sigma2_stderr": pred.variance.sigma2_stderr, "sigma2_theorem7": pred.sigma2_theorem7,
            "fit_form": pred.fit.chosen, "critical_batch": pred.critical_batch,
            "critical_batch_interval": [crit_lo, crit_hi], "critical_batch_theory": pred.critical_batch_theory,
            "rows": rows}


def _plots(out: Path, full, batch, result, ref_batch):
    for c in full:
        plots.densities({"full data (N=%d)" % result["N"]: full[c], f"one batch (B={ref_batch})": batch[c]},
                        out / f"spectrum_{c}.png", title=f"{c}: full-data vs batch spectrum")
    from hessfast.utils.plotting import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (c, cr) in zip(axes, result["curvatures"].items()):
        rows = cr["rows"]
        Bs = [r["B"] for r in rows]
        ax.errorbar(Bs, [r["batch_lambda1_mean"] for r in rows], yerr=[r["batch_lambda1_se"] for r in rows],
                    fmt="s", capsize=3, label="measured batch $\\lambda_1$ (mean $\\pm$ s.e.)")
        ax.plot(Bs, [r["fit_lambda1"] for r in rows], "-", label=f"fit ({cr['fit_form']})")
        ax.fill_between(Bs, [r["fit_lambda1_lo"] for r in rows], [r["fit_lambda1_hi"] for r in rows], alpha=0.2)
        ax.plot(Bs, [r["thm4_lambda1"] for r in rows], "^--", label="Theorem 4 (prediction)")
        if c == "ggn":
            ax.plot(Bs, [r["thm7_lambda1"] for r in rows], "v--", label="Theorem 7 (prediction)")
        ax.axhline(cr["lambda_max"], color="k", lw=1, label="full-data $\\lambda_1$")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size B")
        ax.set_ylabel("$\\lambda_1$")
        ax.set_title(c)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "batch_lambda1.png", dpi=110)
    plt.close(fig)


def _crit(cr) -> str:
    crit, (lo, hi) = cr["critical_batch"], cr["critical_batch_interval"]
    if crit is None:
        return "critical batch: none (flat at every B >= 1)"
    return f"critical batch (fit) = {crit:.3g} [{lo:.3g}, {hi:.3g}]"


def format_table(result: Dict[str, Any], advice=None):
    """The demo's printout: per curvature, measurement, fit, theorems (with verdicts) and the advised rates."""
    lines = []
    for c, cr in result["curvatures"].items():
        lines += ["", f"{c.upper()}: P={cr['P']:,}  N={result['N']}  sigma2={cr['sigma2']:.3g}  "
                      f"fitted law: {cr['fit_form']}  {_crit(cr)}",
                  f"  full-data spectrum:   lambda_max={cr['lambda_max']:.4g}  lambda_min={cr['lambda_min']:.4g}  "
                  f"degeneracy={cr['degeneracy']:.3f}",
                  f"  one batch (B={result['ref_batch']}): lambda_max={cr['batch_lambda_max']:.4g}  "
                  f"lambda_min={cr['batch_lambda_min']:.4g}"]
        thm = "Thm 7" if c == "ggn" else "Thm 4"
        head = (f"{'B':>5} {'n':>4} {'batch l1 (measured)':>20} {'fit':>7} {'regime':>7} "
                f"{thm + ' (pred)':>12} {'verdict':>27} {'max SGD lr':>11} {'SGD lr':>8} {'Adam lr':>9}")
        lines.append(head)
        for r in cr["rows"]:
            pred, ver = (r["thm7_lambda1"], r["thm7_verdict"]) if c == "ggn" else (r["thm4_lambda1"], r["thm4_verdict"])
            star = "*" if r["stop"] in ("max_batches", "max_seconds") else ""
            lines.append(f"{r['B']:>5} {str(r['num_batches']) + star:>4} {r['batch_lambda1_mean']:>10.4g} +- "
                         f"{r['batch_lambda1_se']:<6.2g} {r['fit_lambda1']:>7.4g} {r['regime']:>7} {pred:>12.4g} "
                         f"{ver:>27} {r['max_lr_sgd']:>11.4g} {r['sgd_lr_advised']:>8.4g} "
                         f"{r['adam_lr_advised']:>9.4g}")
    lines += ["",
              "n = random batches drawn at that B (* = stopped by the cap before a 10% standard error);",
              "batch l1 = mean +- standard error; fit = the fitted law; Thm 4/7 are predictions from sigma2, the",
              "verdict compares them with the measurement; max SGD lr = 2 / measured batch lambda_1;",
              f"SGD lr = {result['safety']:g} x 2(1+{result['momentum']:g}) / lambda_1(B) (fit), "
              "never above max SGD lr;",
              f"Adam lr = {result['adam_lr']:g} at B={result['ref_batch']} x min(sqrt(B/{result['ref_batch']}), "
              f"lambda_1({result['ref_batch']}) / lambda_1(B)) (Section 11, capped by the measured curvature).",
              "See docs/advice.md for how the advice was validated by training."]
    return lines
