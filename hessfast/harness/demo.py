"""``hessfast demo``: the whole method on the embedded digits data in about a minute on a laptop CPU.

1. Train the 64-128-128-10 MLP on scikit-learn's digits for a few epochs (SGD, momentum 0.9).
2. Full-data Hessian and GGN spectra (Lanczos over all training samples) and batch spectra at B = 128.
3. :func:`hessfast.predict.predict` for both curvatures: the variance sigma2, the measured batch
   lambda_1 for B in {16, 32, 64, 128, 256} (mean and standard deviation over random batches) against
   Theorem 4 (Hessian) and Theorem 7 (GGN), the largest stable SGD learning rate 2 / lambda'_1 per B,
   the linear SGD rule (capped at the critical batch size) from the predicted maximum at B = 128 and the
   square-root Adam rule from ``adam_lr`` at B = 128.

Writes ``demo.json``, spectra and prediction JSON and PNG plots into the output folder and prints the table.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, Sequence

import hessfast

from . import plots
from .data import load_data, random_batches
from .measure import full_loader
from .runs import Run, write_json
from .train import TrainConfig, load_trained_model, train


def run_demo(out: str | Path = "hessfast_out", *, epochs: int = 5, batch_sizes: Sequence[int] = (16, 32, 64, 128, 256),
             num_batches: int = 10, m: int = 60, m_batch: int = 30, ref_batch: int = 128, adam_lr: float = 1e-3,
             variance_probes: int = 4, seed: int = 0, progress: bool = True, echo=print) -> Dict[str, Any]:
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
    from hessfast import predict

    result: Dict[str, Any] = {"N": data.n_train, "epochs": epochs, "final": final, "curvatures": {}}
    spectra_full, spectra_batch, preds = {}, {}, {}
    for c in ("hessian", "ggn"):
        full = hessfast.lanczos(model, loader, m=m, curvature=c, seed=seed, progress=False)
        xb, yb = random_batches(data.train_x, data.train_y, ref_batch, 1, seed=seed + 3)[0]
        batch = hessfast.lanczos(model, (xb, yb), m=m, curvature=c, seed=seed, progress=False)
        full.save(out / f"spectrum_{c}_full.json")
        batch.save(out / f"spectrum_{c}_batch{ref_batch}.json")
        spectra_full[c], spectra_batch[c] = full, batch
        # measured vs predicted batch lambda_1, the variance and the learning-rate rules: hessfast.predict
        pred = predict(model, loader, batch_sizes=list(batch_sizes), curvature=c, num_batches=num_batches,
                       m=m_batch, num_probes=variance_probes, reference_batch=ref_batch, lr_adam=adam_lr,
                       seed=seed, progress=False)
        pred.save(out / f"predict_{c}.json")
        pred.plot(out / f"predict_{c}.png")
        preds[c] = pred
        ref_row = next(r for r in pred.rows if r["B"] == ref_batch)
        rows = [{"B": r["B"], "full_lambda1": pred.lam_max, "batch_lambda1_mean": r["batch_mean"],
                 "batch_lambda1_std": r["batch_std"], "thm4_lambda1": r["theorem4"], "thm7_lambda1": r["theorem7"],
                 "max_lr_sgd": r["max_lr"], "measured_max_lr_sgd": r["max_lr_measured"],
                 # SGD: the predicted maximal rate at the reference batch, scaled by the SGD rule (sgd_lr is the
                 # factor relative to the reference because no SGD rate was given to predict)
                 "sgd_lr_linear": r["sgd_lr"] * ref_row["max_lr"], "adam_lr_sqrt": r["adam_lr"]}
                for r in pred.rows]
        result["curvatures"][c] = {
            "P": pred.P, "lambda_max": full.lambda_max, "lambda_min": full.lambda_min,
            "degeneracy": full.degeneracy().mass, "batch_lambda_max": batch.lambda_max,
            "batch_lambda_min": batch.lambda_min, "sigma2": pred.sigma2,
            "sigma2_stderr": pred.variance.sigma2_stderr, "sigma2_theorem7": pred.sigma2_theorem7,
            "critical_batch": pred.critical_batch, "rows": rows}
    result["elapsed_s"] = time.perf_counter() - t0
    write_json(out / "demo.json", result)
    _plots(out, spectra_full, spectra_batch, result, ref_batch)
    for line in format_table(result, ref_batch, adam_lr):
        echo(line)
    echo(f"\nwrote {out}/demo.json, spectra and predictions (JSON) and PNG plots in {result['elapsed_s']:.0f} s")
    return result


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
        ax.errorbar(Bs, [r["batch_lambda1_mean"] for r in rows], yerr=[r["batch_lambda1_std"] for r in rows],
                    fmt="s-", capsize=3, label="measured batch $\\lambda_1$")
        ax.plot(Bs, [r["thm4_lambda1"] for r in rows], "^--", label="Theorem 4")
        if c == "ggn":
            ax.plot(Bs, [r["thm7_lambda1"] for r in rows], "v--", label="Theorem 7")
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


def format_table(result: Dict[str, Any], ref_batch: int, adam_lr: float):
    lines = []
    for c, cr in result["curvatures"].items():
        lines += ["", f"{c.upper()}: P={cr['P']:,}  N={result['N']}  sigma2={cr['sigma2']:.3g}  "
                      f"critical batch={cr['critical_batch']:.3g}",
                  f"  full-data spectrum:   lambda_max={cr['lambda_max']:.4g}  lambda_min={cr['lambda_min']:.4g}  "
                  f"degeneracy={cr['degeneracy']:.3f}",
                  f"  one batch (B={ref_batch}): lambda_max={cr['batch_lambda_max']:.4g}  "
                  f"lambda_min={cr['batch_lambda_min']:.4g}"]
        head = f"{'B':>5} {'batch l1 (measured)':>21} {'Thm 4':>9}"
        head += f" {'Thm 7':>9}" if c == "ggn" else ""
        head += f" {'max SGD lr':>11} {'2/measured':>11} {'SGD lr (lin)':>12} {'Adam lr (sqrt)':>14}"
        lines.append(head)
        for r in cr["rows"]:
            s = (f"{r['B']:>5} {r['batch_lambda1_mean']:>11.4g} +- {r['batch_lambda1_std']:<7.3g}"
                 f" {r['thm4_lambda1']:>9.4g}")
            s += f" {r['thm7_lambda1']:>9.4g}" if c == "ggn" else ""
            s += (f" {r['max_lr_sgd']:>11.4g} {r['measured_max_lr_sgd']:>11.4g} {r['sgd_lr_linear']:>12.4g}"
                  f" {r['adam_lr_sqrt']:>14.4g}")
            lines.append(s)
    lines += ["",
              "max SGD lr = 2 / predicted batch lambda_1 (Section 10.1); 2/measured = 2 / measured batch lambda_1;",
              f"SGD lr (lin) scales the B={ref_batch} maximum linearly, capped at the critical batch;",
              f"Adam lr (sqrt) scales {adam_lr:g} at B={ref_batch} by sqrt(B/{ref_batch}) (Section 11)."]
    return lines
