"""Learning rates for a change of batch size, from the measured batch curvature (Sections 9-11).

:func:`lr_advice` measures the mean top eigenvalue of the batch curvature at each batch size (as many
random batches as it takes to pin it to ``target_rel_se``), fits the batch-size law of
:mod:`hessfast.scaling_law` and turns it into learning rates:

* **SGD** (heavy ball, ``torch.optim.SGD(momentum=rho)``): ``safety * 2 (1 + rho) / lam_1(B)``, with
  ``lam_1(B)`` the fitted mean batch curvature (:func:`hessfast.theory.max_lr_heavy_ball`; ``rho = 0``
  gives Eq. 22's ``2 / lam_1``), and never above ``2 / measured batch lam_1`` at a measured B. With a
  ``reference=(B0, lr0)`` known to work, the advice is instead ``lr0 * lam_1(B0) / lam_1(B)`` (the step
  stays the same fraction of the stability limit), under the same cap. The implied scaling is read off
  the fit: linear where the ``1/b`` term dominates, square root where the ``1/sqrt(b)`` term does,
  flat beyond the critical batch size (:mod:`hessfast.scaling_law`).
* **Adam**: the square-root rule from ``reference`` (Section 11), capped where the curvature says the
  rate becomes unstable (:func:`hessfast.theory.adam_lr_capped`). Adam's preconditioner is not
  measured, so without a reference the rates are factors relative to the smallest batch size.

Each row keeps the measurement it rests on (number of batches, mean +- s.e., why the draw stopped), the
fit with its interval, and Theorems 4 and 7 as predictions with a verdict against the measurement.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from . import theory
from .prediction import Prediction, _fixed_width, predict
from .utils.serialization import jsonable

__all__ = ["LRAdvice", "lr_advice"]

FORMAT = "hessfast.lr_advice/1"
_OPTIMIZERS = ("sgd", "adam")


def _check_args(optimizer, momentum, safety, reference):
    if not isinstance(optimizer, str) or optimizer.lower() not in _OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r} is not one of 'sgd', 'adam'.")
    if not (isinstance(momentum, (int, float)) and 0 <= momentum < 1):
        raise ValueError(f"momentum must be in [0, 1) (torch.optim.SGD's heavy-ball momentum), got {momentum!r}.")
    if not (isinstance(safety, (int, float)) and 0 < safety <= 1):
        raise ValueError(f"safety must be in (0, 1]: the fraction of the stability limit to advise, got {safety!r}.")
    if reference is None:
        return None
    try:
        B0, lr0 = reference
        B0, lr0 = int(B0), float(lr0)
    except (TypeError, ValueError):
        raise ValueError(f"reference must be a pair (B0, lr0): a batch size and a learning rate known to work "
                         f"there, got {reference!r}.") from None
    if B0 < 1 or not (lr0 > 0 and math.isfinite(lr0)):
        raise ValueError(f"reference (B0, lr0) needs B0 >= 1 and a finite lr0 > 0, got {reference!r}.")
    return B0, lr0


@dataclass
class LRAdvice:
    """Learning-rate advice per batch size; ``print(advice)`` is the table, ``plot``, ``save``, ``to_dict``.

    Attributes:
        optimizer, momentum, safety: as passed to :func:`lr_advice`.
        reference: ``(B0, lr0)`` or None; ``relative``: the Adam rates are factors (no reference given).
        rows: one dict per batch size (measured, and any of ``predict_at``) with ``B``, ``measured``,
            ``num_batches``, ``stop``, ``batch_mean``, ``batch_se`` (None where not measured), ``fit``,
            ``fit_lo``, ``fit_hi``, ``regime``, ``exponent``, ``theorem4``, ``theorem4_verdict``,
            ``theorem7``, ``theorem7_verdict``, ``cap`` (``2 / measured lam_1``, or ``2 / fit`` where not
            measured; SGD only), ``lr``, ``lr_lo``, ``lr_hi`` (the advice and its range over the fit's
            interval) and ``limited_by`` (what set the rate).
        prediction: the :class:`~hessfast.prediction.Prediction` holding the measurement and the fit.
    """

    optimizer: str
    momentum: float
    safety: float
    reference: Optional[tuple]
    relative: bool
    rows: list
    prediction: Prediction = field(repr=False)
    meta: dict = field(repr=False, default_factory=dict)

    @classmethod
    def from_prediction(cls, pred: Prediction, optimizer: str = "sgd", *, momentum: float = 0.9,
                        reference: Optional[tuple] = None, safety: float = 0.5,
                        predict_at: Sequence[int] = ()) -> "LRAdvice":
        """Advice from an existing :func:`hessfast.predict` measurement (no new measurement is made)."""
        optimizer = optimizer.lower() if isinstance(optimizer, str) else optimizer
        ref = _check_args(optimizer, momentum, safety, reference)
        measured = {r["B"]: r for r in pred.rows}
        extra = sorted({int(b) for b in predict_at} - set(measured))
        bad = [b for b in extra if b < 1 or b > pred.N]
        if bad:
            raise ValueError(f"predict_at batch sizes {bad} are not in [1, N={pred.N}].")
        if ref is not None and ref[0] > pred.N:
            raise ValueError(f"reference batch B0={ref[0]} exceeds the N={pred.N} samples.")
        relative = optimizer == "adam" and ref is None
        if relative:
            ref = (min(measured), 1.0)
        rows = [_row(pred, B, measured.get(B), optimizer, float(momentum), float(safety), ref)
                for B in sorted(set(measured) | set(extra))]
        meta = {"format": FORMAT, "curvature": pred.curvature, "P": pred.P, "N": pred.N,
                "lam_full": pred.lam_max, "flat_fraction": pred.fit.flat_fraction, **pred.meta}
        return cls(optimizer, float(momentum), float(safety), None if relative else ref, relative, rows, pred, meta)

    # ------------------------------------------------------------------ display
    def rule(self) -> str:
        """The rule behind the ``lr`` column, in words."""
        if self.optimizer == "adam":
            base = "factor x lr0" if self.relative else f"{self.reference[1]:g}"
            B0 = self.rows_ref_batch()
            return (f"Adam: {base} at B0={B0} x min(sqrt(B/B0), lam_1(B0)/lam_1(B)) (square root, capped by the "
                    "measured curvature)")
        limit = f"2(1+{self.momentum:g})/lam_1(B)" if self.momentum else "2/lam_1(B)"
        if self.reference is not None:
            B0, lr0 = self.reference
            return (f"SGD: {lr0:g} at B0={B0} x lam_1(B0)/lam_1(B) (lr x curvature kept fixed), "
                    "never above 2/measured lam_1")
        return f"SGD: {self.safety:g} x {limit} (fitted lam_1), never above 2/measured lam_1"

    def rows_ref_batch(self) -> int:
        return self.reference[0] if self.reference is not None else min(r["B"] for r in self.rows if r["measured"])

    def table(self) -> str:
        t7 = self.prediction.curvature == "ggn"
        lr_head = "lr (x ref)" if self.relative else "advised lr"
        head = ["B", "n", "batch lam1 +- s.e.", "fit [interval]", "regime", "exp.", "Thm 4 (pred)", "verdict"]
        head += ["Thm 7 (pred)", "verdict"] if t7 else []
        head += (["2/measured"] if self.optimizer == "sgd" else []) + [lr_head, "range", "set by"]
        lines = []
        for r in self.rows:
            n = "fit only" if not r["measured"] else \
                f"{r['num_batches']}{'*' if r['stop'] in ('max_batches', 'max_seconds') else ''}"
            meas = "-" if not r["measured"] else f"{_g(r['batch_mean'])} +- {_g(r['batch_se'], 2)}"
            cells = [str(r["B"]), n, meas, f"{_g(r['fit'])} [{_g(r['fit_lo'])}, {_g(r['fit_hi'])}]", r["regime"],
                     f"{r['exponent']:.2f}", _g(r["theorem4"]), r["theorem4_verdict"]]
            cells += [_g(r["theorem7"]), r["theorem7_verdict"]] if t7 else []
            cells += [_g(r["cap"])] if self.optimizer == "sgd" else []
            cells += [_g(r["lr"]), f"{_g(r['lr_lo'], 3)}-{_g(r['lr_hi'], 3)}", r["limited_by"]]
            lines.append(cells)
        return _fixed_width(head, lines)

    def __repr__(self) -> str:
        p = self.prediction
        lines = [f"hessfast.LRAdvice for {self.optimizer.upper()} from the batch {p.curvature}: P = {p.P:,}   "
                 f"N = {p.N:,}   full-data lam_1 = {p.lam_max:.5g}",
                 f"  fitted law: {p.fit.chosen} (AIC)   {p.fit.critical_batch_text()}",
                 f"  rule: {self.rule()}", self.table()]
        lines += p.notes()
        lines.append("  regime/exp.: how the stable rate ~ 1/lam_1 scales with B here (1 linear, 0.5 square root, "
                     "0 flat); range: the advice over the fit's interval.")
        return "\n".join(lines)

    # ------------------------------------------------------------------ I/O
    def to_dict(self) -> dict:
        d = {"format": FORMAT, "optimizer": self.optimizer, "momentum": self.momentum, "safety": self.safety,
             "reference": self.reference, "relative": self.relative, "rule": self.rule(), "rows": self.rows,
             "prediction": self.prediction.to_dict(), "meta": self.meta}
        return jsonable(d)

    def save(self, path) -> None:
        """Write the advice as JSON (``to_dict``), the measurement and the fit included."""
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)

    def plot(self, path=None, title: Optional[str] = None):
        """Two panels against B: measured ``lam_1`` with error bars, the fit and the theorems; the advised rates."""
        from .utils.plotting import pyplot

        plt = pyplot()
        from matplotlib.ticker import FormatStrFormatter, NullLocator

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        try:
            self.prediction.plot(ax=ax1, title=f"batch {self.prediction.curvature} $\\lambda_1$")
            B = np.array([r["B"] for r in self.rows], dtype=float)
            lr = np.array([r["lr"] for r in self.rows])
            ax2.fill_between(B, [r["lr_lo"] for r in self.rows], [r["lr_hi"] for r in self.rows], alpha=0.2,
                             color="C0", label="over the fit's interval")
            ax2.plot(B, lr, "o-", color="C0", label="advised" if not self.relative else "advised (x lr0)")
            if self.optimizer == "sgd":
                meas = [(r["B"], r["cap"]) for r in self.rows if r["measured"]]
                ax2.plot(*zip(*meas), "kv", ms=5, label=r"2 / measured batch $\lambda_1$")
            else:
                B0, lr0 = self.reference if self.reference is not None else (self.rows_ref_batch(), 1.0)
                ax2.plot(B, lr0 * np.sqrt(B / B0), "--", color="C1", label=r"$\sqrt{B/B_0}$ rule")
            ax2.set_xscale("log")
            ax2.set_yscale("log")
            ax2.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
            ax2.yaxis.set_minor_formatter(FormatStrFormatter("%.2g"))
            ax2.set_xticks(B, [str(int(b)) for b in B])
            ax2.xaxis.set_minor_locator(NullLocator())  # only the batch sizes on x; y keeps its labelled minor ticks
            ax2.set_xlabel("batch size B")
            ax2.set_ylabel("learning rate")
            ax2.set_title(title or self.rule(), fontsize=8)
            ax2.legend(fontsize=7)
            fig.tight_layout()
            if path is not None:
                fig.savefig(path, dpi=120)
        finally:
            plt.close(fig)
        return fig


def _g(x, digits: int = 4) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}g}"


def _row(pred: Prediction, B: int, meas: Optional[dict], optimizer: str, momentum: float, safety: float,
         ref: Optional[tuple]) -> dict:
    """The advice at one batch size, with what it rests on."""
    fit = pred.fit
    mu, lo, hi = (float(v[0]) for v in fit.predict([B]))
    lo = max(lo, 1e-300)
    row = {"B": B, "measured": meas is not None, "num_batches": meas["num_batches"] if meas else 0,
           "stop": meas["stop"] if meas else None, "batch_mean": meas["batch_mean"] if meas else None,
           "batch_se": meas["batch_se"] if meas else None, "fit": mu, "fit_lo": lo, "fit_hi": hi,
           "regime": fit.regime([B])[0], "exponent": float(fit.exponent([B])[0])}
    row.update(_theory_cols(pred, B, meas))
    if mu <= 0:
        row.update(cap=None, lr=float("nan"), lr_lo=float("nan"), lr_hi=float("nan"),
                   limited_by="no positive curvature fitted")
        return row
    if optimizer == "adam":
        B0, lr0 = ref
        rates = [float(theory.adam_lr_capped(lr0, B0, B, max(r, 1e-300), 1.0)) for r in _ratios(fit, B0, B)]
        capped = rates[0] < float(theory.scale_lr(lr0, B0, B, "adam")) * (1 - 1e-12)
        row.update(cap=None, lr=rates[0], lr_lo=min(rates[1:]), lr_hi=max(rates[1:]),
                   limited_by="curvature cap" if capped else "sqrt rule")
        return row
    cap = 2.0 / meas["batch_mean"] if meas and meas["batch_mean"] > 0 else 2.0 / mu
    if ref is not None:
        rates = [ref[1] * r for r in _ratios(fit, ref[0], B)]
        what = "reference x curvature"
    else:
        rates = [safety * float(theory.max_lr_heavy_ball(lam, momentum)) for lam in (mu, hi, lo)]
        what = f"{safety:g} x heavy-ball limit" if momentum else f"{safety:g} x 2/lam_1"
    lr = min(rates[0], cap)
    row.update(cap=cap, lr=lr, lr_lo=min(rates[1], cap), lr_hi=min(rates[2], cap),
               limited_by=what if rates[0] <= cap else ("2/measured lam_1" if meas else "2/fitted lam_1"))
    return row


def _ratios(fit, B0: int, B: int) -> tuple:
    """``lam_1(B0) / lam_1(B)`` of the fit, then its interval ends in the order (rate low, rate high) for ``_row``."""
    r, lo, hi = (float(v[0]) for v in fit.ratio(B0, [B]))
    return r, lo, hi


def _theory_cols(pred: Prediction, B: int, meas: Optional[dict]) -> dict:
    """Theorem 4 (and 7 for the GGN) at B: from the measured row, or computed where B was not measured."""
    if meas is not None:
        return {k: meas[k] for k in ("theorem4", "theorem4_verdict", "theorem7", "theorem7_verdict")}
    t4 = float(theory.batch_extremes(pred.lam_max, min(pred.lam_min, pred.lam_max), pred.sigma2, pred.P, B,
                                     pred.N).lam_max)
    t7 = (float(theory.ggn_batch_max(max(pred.lam_max, 0.0), pred.sigma2_theorem7, pred.P, B, pred.N))
          if pred.curvature == "ggn" else None)
    return {"theorem4": t4, "theorem4_verdict": "-", "theorem7": t7, "theorem7_verdict": "-"}


def lr_advice(model: nn.Module, data: Any, batch_sizes: Sequence[int], *, optimizer: str = "sgd",
              momentum: float = 0.9, reference: Optional[tuple] = None, safety: float = 0.5,
              curvature: str = "hessian", target_rel_se: float = 0.1, min_batches: int = 5, max_batches: int = 50,
              max_seconds: Optional[float] = None, predict_at: Sequence[int] = (), flat_fraction: float = 0.1,
              m: int = 30, num_probes: int = 4, loss_fn: Optional[Callable] = None, seed: Optional[int] = 0,
              bn_mode: str = "eval", dtype: Optional[torch.dtype] = None, max_samples: Optional[int] = None,
              hvp_mode: str = "auto", progress: Optional[bool] = None, distributed: Any = None) -> LRAdvice:
    """Learning rates per batch size from the measured and fitted batch curvature (module docstring).

    Args:
        model: an ``nn.Module`` at the weights to advise for (e.g. after a short warm-up); never modified.
        data: one ``(inputs, targets)`` batch or an iterable of batches (the N training samples).
        batch_sizes: batch sizes to measure, each in ``[1, N]``; at least two for a fit with a B term.
        optimizer: ``"sgd"`` (heavy ball) or ``"adam"``.
        momentum: SGD's heavy-ball momentum in ``[0, 1)`` (``torch.optim.SGD(momentum=...)``); unused for Adam.
        reference: optional ``(B0, lr0)``, a learning rate known to work at batch size ``B0``. SGD: scale
            it by the fitted curvature. Adam: the anchor of the square-root rule (without it, factors).
        safety: SGD without a reference: the fraction of the stability limit ``2 (1 + rho) / lam_1`` to
            advise, in (0, 1]; default 0.5.
        curvature: ``"hessian"`` (the curvature SGD's stability depends on) or ``"ggn"`` (adds Theorem 7).
        target_rel_se, min_batches, max_batches, max_seconds: how long to draw random batches per B
            (:func:`hessfast.predict`); the batch cap is the reproducible stop, the result marks rows cut
            short by either cap.
        predict_at: further batch sizes to advise at from the fit alone (marked "fit only").
        flat_fraction: the critical batch is where the excess ``lam_1(B) - lam_full`` is this fraction of
            ``lam_full``; beyond it the regime is "flat".
        m, num_probes, loss_fn, seed, bn_mode, dtype, max_samples, hvp_mode, progress, distributed: as in
            :func:`hessfast.predict` (a fixed ``hvp_mode`` such as ``"reverse"`` makes the result independent
            of the machine's timing).

    Returns:
        :class:`LRAdvice`.
    """
    optimizer = optimizer.lower() if isinstance(optimizer, str) else optimizer
    ref = _check_args(optimizer, momentum, safety, reference)
    pred = predict(model, data, batch_sizes, curvature=curvature, target_rel_se=target_rel_se,
                   min_batches=min_batches, max_batches=max_batches, max_seconds=max_seconds, m=m,
                   num_probes=num_probes, flat_fraction=flat_fraction, loss_fn=loss_fn, seed=seed, bn_mode=bn_mode,
                   dtype=dtype, max_samples=max_samples, hvp_mode=hvp_mode, progress=progress,
                   distributed=distributed,
                   reference_batch=None if ref is None else ref[0])
    return LRAdvice.from_prediction(pred, optimizer, momentum=momentum, reference=ref, safety=safety,
                                    predict_at=predict_at)
