"""Measured batch curvature across batch sizes, its fitted law and the theory beside it (Figure 9, Sections 8-11).

:func:`predict` measures, on one model and data set,

* the full-data top eigenvalue ``lam_1`` (and ``lam_P``) by Lanczos on all N samples (eq. 2),
* the per-sample curvature variance ``sigma2`` (:func:`hessfast.hessian_variance`, Algorithm 1 fixed),
* for each batch size B, the top eigenvalue of random batch curvatures (eq. 3; each batch drawn
  without replacement): as many batches as it takes for the standard error of their mean to fall
  under ``target_rel_se`` of the mean, between ``min_batches`` and ``max_batches`` (the draw stops on
  an 80% upper confidence bound of the standard error, so that a few agreeing first values do not end
  it early),

fits the mean batch ``lam_1(B)`` to the batch-size law of :mod:`hessfast.scaling_law` (outlier
``lam_full + a/b``, bulk edge ``lam_full + c/sqrt(b)``, their sum), and sets beside the measurements
the random-matrix predictions of :mod:`hessfast.theory` -- Theorem 4 (:func:`~hessfast.theory.batch_extremes`)
and, for the GGN, Theorem 7 (:func:`~hessfast.theory.ggn_batch_max`) -- each with a verdict against the
measurement. The learning-rate columns rest on the measured curvature only: SGD keeps ``lr * lam_1(B)``
fixed from the reference batch and never exceeds ``2 / measured batch lam_1``; Adam follows the
square-root rule capped by the curvature (:func:`~hessfast.theory.adam_lr_capped`). For advice with
safety factors and momentum, see :func:`hessfast.lr_advice`.

Reproducibility: the batches of size B come from a generator seeded by ``(seed, B)``, so the batches
at one size do not depend on how many were drawn at another. The batch cap stops the draw
deterministically; ``max_seconds`` is a wall-clock cap that makes the count depend on the machine's
speed, and the result says at which batch sizes it cut the draw (``stop == "max_seconds"``).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from scipy import stats
from torch import nn
from tqdm.auto import tqdm

from . import distributed as _distributed
from . import theory
from ._version import __version__
from .scaling_law import ScalingFit, fit_scaling_law, verdict
from .slq import lanczos
from .utils import data as _data
from .utils.data import is_empty
from .utils.serialization import jsonable
from .variance import HessianVariance, hessian_variance

FORMAT = "hessfast.prediction/2"


def jacobian_entry_variance(v: float, lam_max: float, P: int) -> float:
    """Theorem 7's ``sigma2`` (variance of a per-sample Jacobian entry) from the per-element GGN variance ``v``.

    With one output column per sample, ``v = tau^4 + 2 tau^2 lam_1 / P`` (``docs/theory.md``, Theorem 7,
    "What sigma2 means here"); inverted: ``tau^2 = sqrt(v + (lam_1/P)^2) - lam_1/P``, written without
    cancellation as ``v / (sqrt(v + (lam_1/P)^2) + lam_1/P)``.
    """
    a = max(float(lam_max), 0.0) / P
    v = max(float(v), 0.0)
    return v / (math.sqrt(v + a * a) + a) if v > 0 else 0.0


@dataclass
class Prediction:
    """Result of :func:`predict`: one row per batch size, the fitted law and the full-data quantities.

    Attributes:
        rows: list of dicts with keys ``B``, ``b`` (effective batch), ``num_batches``, ``stop`` (why the
            draw stopped: ``"target"``, ``"max_batches"``, ``"max_seconds"`` or ``"fixed"``),
            ``batch_values``, ``batch_mean``, ``batch_std``, ``batch_se`` (measured batch ``lam_1``),
            ``fit``, ``fit_lo``, ``fit_hi`` (the fitted law and its interval), ``regime``
            (``"linear"``/``"sqrt"``/``"flat"``), ``exponent`` (local ``-d log lam_1 / d log B``),
            ``theorem4``, ``theorem4_verdict``, ``theorem7``, ``theorem7_verdict`` (GGN only, else None),
            ``max_lr`` (the theorems' ``2 / lam'_1``, a prediction), ``max_lr_measured`` (``2 / batch_mean``),
            ``sgd_lr``, ``adam_lr``.
        lam_max, lam_min: full-data extreme Ritz values.
        sigma2: the ``sigma2`` passed to Theorem 4 (per-element variance, ``1/(n-1)`` normalisation);
            ``sigma2_theorem7``: the Jacobian-entry variance passed to Theorem 7 (GGN only).
        fit: the :class:`~hessfast.scaling_law.ScalingFit` of the mean batch ``lam_1(B)``.
        critical_batch, critical_batch_interval: the fit's critical batch (None when every B >= 1 is in
            the flat regime) and its interval; never below 1.
        critical_batch_theory: :func:`hessfast.theory.critical_batch_size` from ``sigma2`` (a prediction; it
            may be below 1, and is then not shown).
        reference_batch, lr_sgd, lr_adam: the reference of the learning-rate columns; with ``relative``
            True the columns are factors relative to the reference batch (no learning rate was given).
    """

    curvature: str
    P: int
    N: int
    lam_max: float
    lam_min: float
    sigma2: float
    sigma2_theorem7: Optional[float]
    critical_batch: Optional[float]
    critical_batch_interval: tuple
    critical_batch_theory: float
    reference_batch: int
    lr_sgd: float
    lr_adam: float
    relative_sgd: bool
    relative_adam: bool
    rows: list
    fit: ScalingFit = field(repr=False)
    variance: HessianVariance = field(repr=False)
    meta: dict = field(repr=False, default_factory=dict)

    # ------------------------------------------------------------------ display
    def table(self) -> str:
        """The rows as a fixed-width text table."""
        sgd = "SGD lr (x ref)" if self.relative_sgd else "SGD lr"
        adam = "Adam lr (x ref)" if self.relative_adam else "Adam lr"
        t7 = self.curvature == "ggn"
        head = ["B", "n", "batch lam1 +- s.e.", "fit [interval]", "regime", "Thm 4 (pred)", "verdict"]
        head += ["Thm 7 (pred)", "verdict"] if t7 else []
        head += ["2/measured", sgd, adam]
        lines = []
        for r in self.rows:
            cells = [f"{r['B']}", f"{r['num_batches']}{'*' if r['stop'] in ('max_batches', 'max_seconds') else ''}",
                     f"{_g(r['batch_mean'])} +- {_g(r['batch_se'], 2)}",
                     f"{_g(r['fit'])} [{_g(r['fit_lo'])}, {_g(r['fit_hi'])}]", r["regime"],
                     _g(r["theorem4"]), r["theorem4_verdict"]]
            cells += [_g(r["theorem7"]), r["theorem7_verdict"]] if t7 else []
            cells += [_g(r["max_lr_measured"]), _g(r["sgd_lr"]), _g(r["adam_lr"])]
            lines.append(cells)
        return _fixed_width(head, lines)

    def notes(self) -> list:
        """Lines saying where the measurement was cut short, and how to read the columns."""
        out = []
        for stop, what in (("max_batches", f"the batch cap ({self.meta.get('max_batches')})"),
                           ("max_seconds", f"the time cap ({self.meta.get('max_seconds')} s per batch size)")):
            cut = [r for r in self.rows if r["stop"] == stop]
            if cut:
                rel = ", ".join(f"B={r['B']}: {r['batch_se'] / abs(r['batch_mean']):.0%}" for r in cut)
                out.append(f"  * {what} stopped the draw before the target s.e. of {self.meta['target_rel_se']:.0%}"
                           f" ({rel})" + (": counts depend on machine speed" if stop == "max_seconds" else ""))
        out.append("  Thm 4/7 are predictions from sigma2; verdicts compare them with the measured mean +- s.e.")
        return out

    def __repr__(self) -> str:
        t7 = f"   sigma2 (Thm 7) = {self.sigma2_theorem7:.4g}" if self.sigma2_theorem7 is not None else ""
        crit = self.fit.critical_batch_text()
        ct = self.critical_batch_theory
        theory_crit = (f"{ct:.4g}" if ct >= 1 else "none at B >= 1 (no linear regime predicted)")
        return "\n".join([
            f"hessfast.Prediction of the {self.curvature}: P = {self.P:,}   N = {self.N:,}",
            f"  full-data lam_1 = {self.lam_max:.6g}   lam_P = {self.lam_min:.6g}",
            f"  sigma2 (per element) = {self.sigma2:.4g} +- {self.variance.sigma2_stderr:.2g}{t7}",
            f"  fitted law: {self.fit.chosen} (AIC)   {crit}",
            f"  critical batch predicted by Theorem {7 if self.curvature == 'ggn' else 4}: {theory_crit}",
            f"  reference batch = {self.reference_batch}"
            + ("" if self.relative_sgd else f"   SGD lr = {self.lr_sgd:g}")
            + ("" if self.relative_adam else f"   Adam lr = {self.lr_adam:g}"),
            self.table(), *self.notes(),
        ])

    # ------------------------------------------------------------------ I/O
    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("curvature", "P", "N", "lam_max", "lam_min", "sigma2", "sigma2_theorem7",
                                           "critical_batch", "critical_batch_interval", "critical_batch_theory",
                                           "reference_batch", "lr_sgd", "lr_adam", "relative_sgd", "relative_adam",
                                           "rows", "meta")}
        d["fit"] = self.fit.to_dict()
        d["variance"] = self.variance.to_dict()
        d["format"] = FORMAT
        return jsonable(d)

    def save(self, path) -> None:
        """Write the prediction as JSON (``to_dict``)."""
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)

    def plot(self, path=None, ax=None, title: Optional[str] = None):
        """Figure 9 against batch size: measured mean batch ``lam_1`` (+- s.e.; band: +- std), the fitted
        law with its interval, the full-data ``lam_1``, Theorems 4 and 7."""
        from .utils.plotting import figure_axes

        with figure_axes(ax, path) as ax:
            B = np.array([r["B"] for r in self.rows], dtype=float)
            mean = np.array([r["batch_mean"] for r in self.rows])
            std = np.array([r["batch_std"] for r in self.rows])
            ax.fill_between(B, mean - std, mean + std, alpha=0.12, label=r"batch $\lambda_1$ $\pm$ std")
            ax.errorbar(B, mean, yerr=[r["batch_se"] for r in self.rows], fmt="o", capsize=3,
                        label=r"batch $\lambda_1$ mean $\pm$ s.e.")
            grid = np.unique(np.geomspace(B.min(), B.max(), 60))
            mu, lo, hi = self.fit.predict(grid)
            ax.plot(grid, mu, "-", color="C3", label=f"fit ({self.fit.chosen})")
            ax.fill_between(grid, lo, hi, color="C3", alpha=0.15)
            ax.axhline(self.lam_max, color="k", ls="--", lw=1, label=r"full-data $\lambda_1$")
            ax.plot(B, [r["theorem4"] for r in self.rows], "s--", ms=4, label="Theorem 4 (prediction)")
            if self.rows and self.rows[0]["theorem7"] is not None:
                ax.plot(B, [r["theorem7"] for r in self.rows], "^--", ms=4, label="Theorem 7 (prediction)")
            if self.critical_batch is not None and B.min() <= self.critical_batch <= B.max():
                ax.axvline(self.critical_batch, color="C2", ls=":", label="critical batch (fit)")
            ax.set_xscale("log")
            ax.set_xticks(B, [str(int(b)) for b in B])  # the measured batch sizes, not 10^k sub-ticks
            ax.minorticks_off()
            ax.set_xlabel("batch size B")
            ax.set_ylabel(r"$\lambda_1$")
            ax.set_title(title or f"{self.curvature}: batch vs full top eigenvalue (P={self.P:,}, N={self.N:,})")
            ax.legend(fontsize=7)
        return ax


def _g(x, digits: int = 4) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}g}"


def _fixed_width(head, lines) -> str:
    """Right-aligned columns under a header and a rule (also used by :mod:`hessfast.advice`)."""
    widths = [max(len(h), *(len(x[i]) for x in lines)) if lines else len(h) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(x) for x in lines])


# ---------------------------------------------------------------------------------- data
def _gather(data: Any):
    """All samples of ``data`` as one ``(inputs, targets)`` batch (random batches need random access)."""
    batches = list(_data.iter_batches(data))
    if len(batches) == 1:
        return batches[0]
    inputs = [b[0] for b in batches]
    first = inputs[0]
    if isinstance(first, torch.Tensor):
        x = torch.cat(inputs)
    elif isinstance(first, dict):
        x = {k: torch.cat([i[k] for i in inputs]) for k in first}
    else:
        x = type(first)(torch.cat([i[j] for i in inputs]) for j in range(len(first)))
    return x, torch.cat([b[1] for b in batches])


def _check_batch_sizes(batch_sizes, N: int) -> list:
    try:
        sizes = [int(b) for b in batch_sizes]
    except (TypeError, ValueError):
        raise TypeError(f"batch_sizes must be a sequence of integers, got {batch_sizes!r}.") from None
    if not sizes:
        raise ValueError("batch_sizes is empty; give at least one batch size, e.g. batch_sizes=[32, 128].")
    bad = [b for b, raw in zip(sizes, batch_sizes) if b < 1 or b > N or b != raw]
    if bad:
        raise ValueError(f"batch sizes {bad} are not integers in [1, N={N}] (batches are drawn without replacement "
                         "from the N samples of the data).")
    return sorted(set(sizes))


def _check_stopping(num_batches, target_rel_se, min_batches, max_batches, max_seconds) -> None:
    def positive_int(name, v):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}.")

    if num_batches is not None:
        positive_int("num_batches", num_batches)
    positive_int("min_batches", min_batches)
    positive_int("max_batches", max_batches)
    if min_batches < 2 or max_batches < min_batches:
        raise ValueError(f"need 2 <= min_batches <= max_batches (a standard error needs two batches), got "
                         f"min_batches={min_batches}, max_batches={max_batches}.")
    if not (isinstance(target_rel_se, (int, float)) and 0 < target_rel_se < 1):
        raise ValueError(f"target_rel_se is the standard error of the mean batch lambda_1 as a fraction of it, "
                         f"in (0, 1) (0.1 = 10%), got {target_rel_se!r}.")
    if max_seconds is not None and not (isinstance(max_seconds, (int, float)) and max_seconds > 0):
        raise ValueError(f"max_seconds must be None or a number of seconds > 0, got {max_seconds!r}.")


def _se_upper(vals) -> float:
    """An 80% upper confidence bound on the standard error of the mean of ``vals`` (n >= 2).

    ``s sqrt((n - 1) / chi2_{0.2, n-1}) / sqrt(n)``: the chi-square bound on the standard deviation. Stopping
    on it rather than on ``s / sqrt(n)`` keeps a draw whose first few values happen to agree from stopping
    too early (with a skewed batch-lambda_1 distribution the plain estimate is low more often than not).
    """
    n = len(vals)
    return float(np.std(vals, ddof=1)) * math.sqrt((n - 1) / float(stats.chi2.ppf(0.2, n - 1))) / math.sqrt(n)


class _BatchDraws:
    """Random batches of each size from the gathered data, and their top eigenvalue by Lanczos.

    Single process: ``x, y`` are all N samples. Distributed: this rank's shard, which sits at
    ``offset`` among the N samples of all shards in rank order; a drawn batch keeps the indices in
    the shard (possibly none) and Lanczos runs distributed on it, so every rank sees the same values.
    """

    def __init__(self, model: nn.Module, data, N: int, ctx, steps: int, seed, common: dict):
        self.model, self.ctx, self.N, self.steps, self.seed, self.common = model, ctx, N, steps, seed, common
        if ctx is None:
            self.x, self.y = _gather(data)
            self.offset, self.n_local = 0, N
            return
        local = ctx.guard(lambda: None if is_empty(data, _data.is_single_batch(data)) else _gather(data),
                          "gathering its data shard for the random batches")
        self.x, self.y = (None, None) if local is None else local
        self.n_local = 0 if self.y is None else int(self.y.shape[0])
        counts = [int(c) for c in ctx.all_gather_small(torch.tensor([float(self.n_local)], dtype=torch.float64))[:, 0]]
        if sum(counts) != N:
            raise ValueError(f"the ranks' shards hold {counts} samples (sum {sum(counts)}) but the curvature "
                             f"operator counted N = {N}; every pass over a shard must yield the same samples.")
        self.offset = sum(counts[:ctx.rank])

    def lam1(self, B: int, j: int, gen: torch.Generator) -> float:
        idx = torch.randperm(self.N, generator=gen)[:B]
        if self.ctx is not None:  # the drawn samples in this rank's shard, in the order drawn
            idx = idx[(idx >= self.offset) & (idx < self.offset + self.n_local)] - self.offset
        if len(idx) == 0:  # none here: an empty shard of this batch (distributed only)
            batch = []
        else:
            batch = (_data.map_tensors(self.x, lambda t: t[idx.to(t.device)]), self.y[idx.to(self.y.device)])
        spec = lanczos(self.model, batch, self.steps, num_probes=1, progress=False,
                       seed=None if self.seed is None else int(self.seed) + 1 + j, **self.common)
        return float(spec.lambda_max)

    def elapsed_max(self, t0: float) -> float:
        """Seconds since ``t0``; under distributed the largest over ranks, so every rank stops together."""
        dt = time.perf_counter() - t0
        if self.ctx is None:
            return dt
        return float(self.ctx.all_gather_small(torch.tensor([dt], dtype=torch.float64)).max())

    def measure_all(self, sizes, stopping: dict, progress) -> tuple:
        """``({B: values}, {B: why the draw stopped})`` over ``sizes``, with one progress bar."""
        per_size = stopping["num_batches"] or stopping["max_batches"]
        bar = tqdm(total=len(sizes) * per_size, desc=f"hessfast: batch lambda_1 ({self.common['curvature']})",
                   unit="batch", disable=None if progress is None else not progress, leave=False)
        measured, stops = {}, {}
        try:
            for B in sizes:
                measured[B], stops[B] = self.measure(B, stopping, bar)
        finally:
            bar.close()
        return measured, stops

    def measure(self, B: int, stopping: dict, bar) -> tuple:
        """Batch ``lam_1`` values at size ``B`` and why the draw stopped."""
        gen = torch.Generator().manual_seed((0 if self.seed is None else int(self.seed)) * 1_000_003 + B)
        fixed, t0, vals = stopping["num_batches"], time.perf_counter(), []
        cap = fixed if fixed is not None else stopping["max_batches"]
        stop = "fixed" if fixed is not None else "max_batches"
        while len(vals) < cap:
            vals.append(self.lam1(B, len(vals), gen))
            bar.update(1)
            n = len(vals)
            if fixed is not None or n < stopping["min_batches"]:
                continue
            mean = float(np.mean(vals))
            if _se_upper(vals) <= stopping["target_rel_se"] * abs(mean):
                stop = "target"
                break
            if stopping["max_seconds"] is not None and n < cap and self.elapsed_max(t0) > stopping["max_seconds"]:
                stop = "max_seconds"
                break
        return vals, stop


# ---------------------------------------------------------------------------------- the rows
def _theory(curvature, var, lam1, lamP, P, N):
    """sigma2 for Theorem 4 (1/(n-1) normalisation: effective_batch is exact), Theorem 7's, and the theory's B*."""
    s2 = max(var.sigma2_unbiased if var.N > 1 else var.sigma2, 0.0)
    s2_t7 = jacobian_entry_variance(s2, lam1, P) if curvature == "ggn" else None
    crit = float(theory.critical_batch_size(max(lam1, 1e-300), s2_t7 if curvature == "ggn" else s2, P, N,
                                            curvature=curvature))
    return s2, s2_t7, crit


def _rows(curvature, measured, stops, fit, s2, s2_t7, lam1, lamP, P, N, ref, lr_s, lr_a, cap_sgd):
    """One row per batch size; ``cap_sgd``: hold the SGD rate (an absolute one) under 2 / measured lambda_1."""
    sizes = sorted(measured)
    mu, lo, hi = fit.predict(sizes)
    fitted = dict(zip(sizes, mu))
    ref_lam = float(fit.predict([ref])[0][0])
    regimes, expo = fit.regime(sizes), fit.exponent(sizes)
    rows = []
    for i, B in enumerate(sizes):
        vals = np.array(measured[B])
        mean = float(vals.mean())
        std = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
        se = std / math.sqrt(len(vals))
        t4 = float(theory.batch_extremes(lam1, min(lamP, lam1), s2, P, B, N).lam_max)
        t7 = float(theory.ggn_batch_max(max(lam1, 0.0), s2_t7, P, B, N)) if curvature == "ggn" else None
        lam_fit = float(fitted[B])
        cap = 2.0 / mean if mean > 0 else float("inf")
        ok = lam_fit > 0 and ref_lam > 0
        sgd = lr_s * ref_lam / lam_fit if ok else float("nan")
        rows.append({
            "B": B, "b": float(theory.effective_batch(B, N)), "num_batches": len(vals), "stop": stops[B],
            "batch_mean": mean, "batch_std": std, "batch_se": se, "batch_values": vals.tolist(),
            "fit": lam_fit, "fit_lo": float(lo[i]), "fit_hi": float(hi[i]), "regime": regimes[i],
            "exponent": float(expo[i]),
            "theorem4": t4, "theorem4_verdict": verdict(t4, mean, se),
            "theorem7": t7, "theorem7_verdict": verdict(t7, mean, se) if t7 is not None else "-",
            "max_lr": float(theory.max_lr_sgd(max(lam1, 1e-300), s2_t7 if curvature == "ggn" else s2, P, B, N,
                                              curvature=curvature)),
            "max_lr_measured": cap,
            "sgd_lr": min(sgd, cap) if cap_sgd and not math.isnan(sgd) else sgd,
            "adam_lr": float(theory.adam_lr_capped(lr_a, ref, B, ref_lam, lam_fit)) if ok else float("nan"),
        })
    return rows


# ---------------------------------------------------------------------------------- public function
def predict(model: nn.Module, data: Any, batch_sizes: Sequence[int], *, curvature: str = "hessian",
            num_batches: Optional[int] = None, target_rel_se: float = 0.1, min_batches: int = 5,
            max_batches: int = 50, max_seconds: Optional[float] = None, m: int = 30, num_probes: int = 4,
            reference_batch: Optional[int] = None, lr_sgd: Optional[float] = None, lr_adam: Optional[float] = None,
            flat_fraction: float = 0.1, loss_fn: Optional[Callable] = None, seed: Optional[int] = 0,
            bn_mode: str = "eval", dtype: Optional[torch.dtype] = None, max_samples: Optional[int] = None,
            variance_route: str = "auto", hvp_mode: str = "auto", progress: Optional[bool] = None,
            distributed: Any = None) -> Prediction:
    """Measured batch ``lam_1`` for each batch size, the fitted batch-size law, Theorems 4 / 7 and learning rates.

    Args:
        model: an ``nn.Module``; never modified.
        data: one ``(inputs, targets)`` batch or an iterable of batches: the N samples of the empirical
            risk (gathered into memory to draw random batches).
        batch_sizes: batch sizes B to measure, each in ``[1, N]``.
        curvature: ``"hessian"`` or ``"ggn"``.
        num_batches: draw exactly this many random batches per batch size (the paper's Figure 9 uses 10);
            default None: draw until the standard error of the mean batch ``lam_1`` is at most
            ``target_rel_se`` of the mean, with at least ``min_batches`` and at most ``max_batches``.
        target_rel_se: target relative standard error, in (0, 1); default 0.1 (10%).
        min_batches, max_batches: bounds of the adaptive draw (``2 <= min_batches <= max_batches``).
        max_seconds: optional wall-clock cap on the draw at each batch size. The batch cap is the
            reproducible stop; a row cut by the time cap says so (``stop == "max_seconds"``).
        m: Lanczos steps for every top eigenvalue (capped at P; the top Ritz value converges first).
        num_probes: probes of the variance estimate.
        reference_batch: batch size the learning rates are scaled from; default the smallest of ``batch_sizes``.
        lr_sgd, lr_adam: learning rates known to work at ``reference_batch``; when omitted the columns are
            factors relative to the reference.
        flat_fraction: the fit's critical batch is where the excess ``lam_1(B) - lam_full`` is this
            fraction of ``lam_full`` (:mod:`hessfast.scaling_law`).
        loss_fn: mean- or sum-reduced loss; default cross-entropy.
        seed: seeds the Lanczos probes, the variance probes and subset, and the random batches.
        bn_mode: ``"eval"``; ``"train"`` is refused for models with batch norm (see :func:`hessian_variance`).
        dtype: compute dtype; default the model's.
        max_samples: estimate the variance on a random subset of this many samples.
        variance_route: ``route`` of :func:`hessian_variance`.
        hvp_mode: as in :func:`hessfast.lanczos`; ``"auto"`` is resolved once, on the full-data operator,
            and that mode is reused for every batch.
        progress: progress bars (rank 0 only when distributed).
        distributed: ``None`` (use the torch.distributed process group when one is initialised), ``True``,
            ``False`` or a ``ProcessGroup``, as in :func:`hessfast.lanczos`. Each rank's ``data`` is then its
            shard (any sizes, an empty shard included) and only the shard is gathered into the rank's
            memory. The variance and the full-data Lanczos are exact means over all ranks' samples; each
            random batch of size B is drawn, with the same generator on every rank, from the N indices of
            the concatenation of the shards in rank order (the shard sizes are all-gathered), each rank
            keeps the drawn indices that fall in its shard (possibly none) and Lanczos runs distributed
            on that batch. The batches are therefore those of a single process given the concatenated
            data and the same seed, and every rank returns the same :class:`Prediction` (the time cap
            uses the slowest rank's clock). Every rank must pass the same model and arguments.

    Returns:
        :class:`Prediction` (``table()``, ``to_dict()``, ``save(path)``, ``plot(path)``).
    """
    start = time.perf_counter()
    _check_stopping(num_batches, target_rel_se, min_batches, max_batches, max_seconds)
    ctx = _distributed.context(distributed)
    if ctx is not None and not ctx.is_main:
        progress = False
    common = dict(curvature=curvature, loss_fn=loss_fn, bn_mode=bn_mode, dtype=dtype,
                  distributed=False if ctx is None else ctx)
    var = hessian_variance(model, data, num_probes=num_probes, seed=seed, max_samples=max_samples,
                           route=variance_route, progress=progress, **common)
    P = var.P
    steps = max(1, min(int(m), P))
    full = lanczos(model, data, steps, num_probes=1, seed=seed, progress=progress, hvp_mode=hvp_mode, **common)
    common["hvp_mode"] = full.meta["hvp_mode"]
    N = int(full.meta["N"])
    sizes = _check_batch_sizes(batch_sizes, N)
    ref = sizes[0] if reference_batch is None else int(reference_batch)
    if ref < 1 or ref > N:
        raise ValueError(f"reference_batch must be in [1, N={N}], got {reference_batch!r}.")
    lam1, lamP = float(full.lambda_max), float(full.lambda_min)

    stopping = dict(num_batches=num_batches, target_rel_se=float(target_rel_se), min_batches=int(min_batches),
                    max_batches=int(max_batches), max_seconds=max_seconds)
    measured, stops = _BatchDraws(model, data, N, ctx, steps, seed, common).measure_all(sizes, stopping, progress)
    means = [float(np.mean(measured[B])) for B in sizes]
    ses = [float(np.std(measured[B], ddof=1) / math.sqrt(len(measured[B]))) if len(measured[B]) > 1 else 0.0
           for B in sizes]
    fit = fit_scaling_law(sizes, means, ses, N, lam_full=lam1, flat_fraction=flat_fraction)
    crit, crit_lo, crit_hi = fit.critical_batch()
    s2, s2_t7, crit_theory = _theory(curvature, var, lam1, lamP, P, N)
    lr_s = 1.0 if lr_sgd is None else float(lr_sgd)
    lr_a = 1.0 if lr_adam is None else float(lr_adam)
    rows = _rows(curvature, measured, stops, fit, s2, s2_t7, lam1, lamP, P, N, ref, lr_s, lr_a,
                 cap_sgd=lr_sgd is not None)  # relative factors have no rate to hold against 2 / lambda_1
    meta = {"m": steps, **stopping, "num_probes": int(num_probes), "seed": seed, "bn_mode": bn_mode,
            "hvp_mode": common["hvp_mode"], "elapsed": time.perf_counter() - start, "hessfast_version": __version__,
            "torch_version": torch.__version__, "variance_route": var.meta.get("route"),
            "world_size": 1 if ctx is None else ctx.world_size,
            "sigma2_normalisation": "1/(n-1) (sigma2_unbiased of hessian_variance)"}
    return Prediction(curvature=curvature, P=P, N=N, lam_max=lam1, lam_min=lamP, sigma2=s2,
                      sigma2_theorem7=s2_t7, critical_batch=crit, critical_batch_interval=(crit_lo, crit_hi),
                      critical_batch_theory=crit_theory, reference_batch=ref, lr_sgd=lr_s, lr_adam=lr_a,
                      relative_sgd=lr_sgd is None, relative_adam=lr_adam is None, rows=rows, fit=fit,
                      variance=var, meta=meta)
