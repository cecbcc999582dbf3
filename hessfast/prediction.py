"""End to end: measured and predicted batch curvature and learning rates across batch sizes (Figure 9, Sections 8-11).

:func:`predict` measures, on one model and data set,

* the full-data top eigenvalue ``lam_1`` (and ``lam_P``) by Lanczos on all N samples (eq. 2),
* the per-sample curvature variance ``sigma2`` (:func:`hessfast.hessian_variance`, Algorithm 1 fixed),
* for each batch size B, the top eigenvalue of ``num_batches`` random batch curvatures (eq. 3; drawn
  without replacement), their mean and standard deviation, as in Figure 9,

and sets beside them the random-matrix predictions of :mod:`hessfast.theory`: Theorem 4
(:func:`~hessfast.theory.batch_extremes`), Theorem 7 for the GGN (:func:`~hessfast.theory.ggn_batch_max`),
the maximal SGD learning rate ``2 / lam'_1`` (:func:`~hessfast.theory.max_lr_sgd`), and the SGD (linear
up to the critical batch size) and Adam (square-root) learning rates scaled from a reference batch size
(:func:`~hessfast.theory.scale_lr`).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed as _distributed
from . import theory
from ._version import __version__
from .slq import lanczos
from .utils import data as _data
from .utils.data import is_empty
from .utils.serialization import jsonable
from .variance import HessianVariance, hessian_variance

FORMAT = "hessfast.prediction/1"


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
    """Result of :func:`predict`: one row per batch size, plus the full-data quantities.

    Attributes:
        rows: list of dicts with keys ``B``, ``b`` (effective batch), ``batch_mean``, ``batch_std``,
            ``batch_values`` (measured batch ``lam_1``), ``theorem4``, ``theorem7`` (GGN only, else None),
            ``max_lr`` (predicted ``2 / lam'_1``), ``max_lr_measured`` (``2 / batch_mean``), ``sgd_lr``, ``adam_lr``.
        lam_max, lam_min: full-data extreme Ritz values.
        sigma2: the ``sigma2`` passed to Theorem 4 (per-element variance, ``1/(n-1)`` normalisation);
            ``sigma2_theorem7``: the Jacobian-entry variance passed to Theorem 7 (GGN only).
        critical_batch: :func:`hessfast.theory.critical_batch_size`.
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
    critical_batch: float
    reference_batch: int
    lr_sgd: float
    lr_adam: float
    relative_sgd: bool
    relative_adam: bool
    rows: list
    variance: HessianVariance = field(repr=False)
    meta: dict = field(repr=False, default_factory=dict)

    # ------------------------------------------------------------------ display
    def table(self) -> str:
        """The rows as a fixed-width text table."""
        sgd = "SGD lr (x ref)" if self.relative_sgd else "SGD lr"
        adam = "Adam lr (x ref)" if self.relative_adam else "Adam lr"
        head = ["B", "batch lam1 mean", "std", "Thm 4", "Thm 7", "max lr (pred)", "max lr (meas)", sgd, adam]
        lines = []
        for r in self.rows:
            lines.append([f"{r['B']}", _g(r["batch_mean"]), _g(r["batch_std"]), _g(r["theorem4"]),
                          _g(r["theorem7"]), _g(r["max_lr"]), _g(r["max_lr_measured"]), _g(r["sgd_lr"]),
                          _g(r["adam_lr"])])
        widths = [max(len(h), *(len(x[i]) for x in lines)) for i, h in enumerate(head)]
        fmt = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
        return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(x) for x in lines])

    def __repr__(self) -> str:
        t7 = f"   sigma2 (Thm 7) = {self.sigma2_theorem7:.4g}" if self.sigma2_theorem7 is not None else ""
        return "\n".join([
            f"hessfast.Prediction of the {self.curvature}: P = {self.P:,}   N = {self.N:,}",
            f"  full-data lam_1 = {self.lam_max:.6g}   lam_P = {self.lam_min:.6g}",
            f"  sigma2 (per element) = {self.sigma2:.4g} +- {self.variance.sigma2_stderr:.2g}{t7}",
            f"  critical batch size = {self.critical_batch:.4g}   reference batch = {self.reference_batch}"
            + ("" if self.relative_sgd else f"   SGD lr = {self.lr_sgd:g}")
            + ("" if self.relative_adam else f"   Adam lr = {self.lr_adam:g}"),
            self.table(),
        ])

    # ------------------------------------------------------------------ I/O
    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("curvature", "P", "N", "lam_max", "lam_min", "sigma2", "sigma2_theorem7",
                                           "critical_batch", "reference_batch", "lr_sgd", "lr_adam", "relative_sgd",
                                           "relative_adam", "rows", "meta")}
        d["variance"] = self.variance.to_dict()
        d["format"] = FORMAT
        return jsonable(d)

    def save(self, path) -> None:
        """Write the prediction as JSON (``to_dict``)."""
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)

    def plot(self, path=None, ax=None, title: Optional[str] = None):
        """Figure 9 against batch size: measured batch ``lam_1`` (mean +- std), full ``lam_1``, Theorems 4 and 7."""
        from .utils.plotting import figure_axes

        with figure_axes(ax, path) as ax:
            B = np.array([r["B"] for r in self.rows], dtype=float)
            mean = np.array([r["batch_mean"] for r in self.rows])
            std = np.array([r["batch_std"] for r in self.rows])
            ax.errorbar(B, mean, yerr=std, fmt="o-", capsize=3, label=r"batch $\lambda_1$ (mean $\pm$ std)")
            ax.fill_between(B, mean - std, mean + std, alpha=0.15)
            ax.axhline(self.lam_max, color="k", ls="--", lw=1, label=r"full-data $\lambda_1$")
            ax.plot(B, [r["theorem4"] for r in self.rows], "s--", label="Theorem 4")
            if self.rows and self.rows[0]["theorem7"] is not None:
                ax.plot(B, [r["theorem7"] for r in self.rows], "^--", label="Theorem 7")
            ax.set_xscale("log")
            ax.set_xticks(B, [str(int(b)) for b in B])  # the measured batch sizes, not 10^k sub-ticks
            ax.minorticks_off()
            ax.set_xlabel("batch size B")
            ax.set_ylabel(r"$\lambda_1$")
            ax.set_title(title or f"{self.curvature}: batch vs full top eigenvalue (P={self.P:,}, N={self.N:,})")
            ax.legend(fontsize=8)
        return ax


def _g(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4g}"


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


# ---------------------------------------------------------------------------------- public function
def predict(model: nn.Module, data: Any, batch_sizes: Sequence[int], *, curvature: str = "hessian",
            num_batches: int = 10, m: int = 30, num_probes: int = 4, reference_batch: Optional[int] = None,
            lr_sgd: Optional[float] = None, lr_adam: Optional[float] = None, loss_fn: Optional[Callable] = None,
            seed: Optional[int] = 0, bn_mode: str = "eval", dtype: Optional[torch.dtype] = None,
            max_samples: Optional[int] = None, variance_route: str = "auto",
            progress: Optional[bool] = None, distributed: Any = None) -> Prediction:
    """Measured batch ``lam_1`` against the Theorem 4 / 7 predictions, and learning rates, for each batch size.

    Args:
        model: an ``nn.Module``; never modified.
        data: one ``(inputs, targets)`` batch or an iterable of batches: the N samples of the empirical
            risk (gathered into memory to draw random batches).
        batch_sizes: batch sizes B to measure and predict, each in ``[1, N]``.
        curvature: ``"hessian"`` or ``"ggn"``.
        num_batches: random batches per batch size (the paper's Figure 9 uses 10).
        m: Lanczos steps for every top eigenvalue (capped at P; the top Ritz value converges first).
        num_probes: probes of the variance estimate.
        reference_batch: batch size the learning rates are scaled from; default the smallest of ``batch_sizes``.
        lr_sgd, lr_adam: learning rates tuned at ``reference_batch``; when omitted the columns are factors
            relative to the reference.
        loss_fn: mean- or sum-reduced loss; default cross-entropy.
        seed: seeds the Lanczos probes, the variance probes and subset, and the random batches.
        bn_mode: ``"eval"``; ``"train"`` is refused for models with batch norm (see :func:`hessian_variance`).
        dtype: compute dtype; default the model's.
        max_samples: estimate the variance on a random subset of this many samples.
        variance_route: ``route`` of :func:`hessian_variance`.
        progress: progress bars (rank 0 only when distributed).
        distributed: ``None`` (use the torch.distributed process group when one is initialised), ``True``,
            ``False`` or a ``ProcessGroup``, as in :func:`hessfast.lanczos`. Each rank's ``data`` is then its
            shard (any sizes, an empty shard included) and only the shard is gathered into the rank's
            memory. The variance and the full-data Lanczos are exact means over all ranks' samples; each
            random batch of size B is drawn, with the same generator on every rank, from the N indices of
            the concatenation of the shards in rank order (the shard sizes are all-gathered), each rank
            keeps the drawn indices that fall in its shard (possibly none) and Lanczos runs distributed
            on that batch. The batches are therefore those of a single process given the concatenated
            data and the same seed, and every rank returns the same :class:`Prediction`. Every rank must
            pass the same model and arguments.

    Returns:
        :class:`Prediction` (``table()``, ``to_dict()``, ``save(path)``, ``plot(path)``).
    """
    start = time.perf_counter()
    if isinstance(num_batches, bool) or not isinstance(num_batches, (int, np.integer)) or num_batches < 1:
        raise ValueError(f"num_batches must be a positive integer, got {num_batches!r}.")
    ctx = _distributed.context(distributed)
    if ctx is not None and not ctx.is_main:
        progress = False
    common = dict(curvature=curvature, loss_fn=loss_fn, bn_mode=bn_mode, dtype=dtype,
                  distributed=False if ctx is None else ctx)
    var = hessian_variance(model, data, num_probes=num_probes, seed=seed, max_samples=max_samples,
                           route=variance_route, progress=progress, **common)
    P = var.P
    steps = max(1, min(int(m), P))
    full = lanczos(model, data, steps, num_probes=1, seed=seed, progress=progress, **common)
    N = int(full.meta["N"])
    sizes = _check_batch_sizes(batch_sizes, N)
    ref = sizes[0] if reference_batch is None else int(reference_batch)
    if ref < 1:
        raise ValueError(f"reference_batch must be >= 1, got {reference_batch!r}.")
    lam1, lamP = float(full.lambda_max), float(full.lambda_min)

    if ctx is None:
        x, y = _gather(data)
        offset, n_local = 0, N
    else:  # this rank's shard, and where it sits among the N samples of all shards (in rank order)
        local = ctx.guard(lambda: None if is_empty(data, _data.is_single_batch(data)) else _gather(data),
                          "gathering its data shard for the random batches")
        x, y = (None, None) if local is None else local
        n_local = 0 if y is None else int(y.shape[0])
        counts = [int(c) for c in ctx.all_gather_small(torch.tensor([float(n_local)], dtype=torch.float64))[:, 0]]
        if sum(counts) != N:
            raise ValueError(f"the ranks' shards hold {counts} samples (sum {sum(counts)}) but the curvature "
                             f"operator counted N = {N}; every pass over a shard must yield the same samples.")
        offset = sum(counts[:ctx.rank])
    gen = torch.Generator().manual_seed(int(seed) if seed is not None else 0)
    measured = {}
    bar = tqdm(total=len(sizes) * num_batches, desc=f"hessfast: batch lambda_1 ({curvature})", unit="batch",
               disable=None if progress is None else not progress, leave=False)
    try:
        for B in sizes:
            vals = []
            for j in range(num_batches):
                idx = torch.randperm(N, generator=gen)[:B]
                if ctx is not None:  # the drawn samples in this rank's shard, in the order drawn
                    idx = idx[(idx >= offset) & (idx < offset + n_local)] - offset
                if len(idx) == 0:  # none here: an empty shard of this batch (distributed only)
                    batch = []
                else:
                    batch = (_data._map_tensors(x, lambda t: t[idx.to(t.device)]), y[idx.to(y.device)])
                spec = lanczos(model, batch, min(steps, P), num_probes=1, progress=False,
                               seed=None if seed is None else int(seed) + 1 + j, **common)
                vals.append(float(spec.lambda_max))
                bar.update(1)
            measured[B] = vals
    finally:
        bar.close()

    # Theory (hessfast.theory): sigma2 with the 1/(n-1) normalisation that makes effective_batch exact.
    s2 = var.sigma2_unbiased if var.N > 1 else var.sigma2
    s2 = max(s2, 0.0)
    s2_t7 = jacobian_entry_variance(s2, lam1, P) if curvature == "ggn" else None
    s2_lr = s2_t7 if curvature == "ggn" else s2
    top = max(lam1, 1e-300)
    crit = float(theory.critical_batch_size(top, s2_lr, P, N, curvature=curvature))
    lr_s = 1.0 if lr_sgd is None else float(lr_sgd)
    lr_a = 1.0 if lr_adam is None else float(lr_adam)
    rows = []
    for B in sizes:
        vals = np.array(measured[B])
        t4 = float(theory.batch_extremes(lam1, min(lamP, lam1), s2, P, B, N).lam_max)
        t7 = float(theory.ggn_batch_max(max(lam1, 0.0), s2_t7, P, B, N)) if curvature == "ggn" else None
        rows.append({
            "B": B, "b": float(theory.effective_batch(B, N)), "batch_mean": float(vals.mean()),
            "batch_std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0, "batch_values": vals.tolist(),
            "theorem4": t4, "theorem7": t7,
            "max_lr": float(theory.max_lr_sgd(top, s2_lr, P, B, N, curvature=curvature)),
            "max_lr_measured": 2.0 / float(vals.mean()) if vals.mean() > 0 else float("inf"),
            "sgd_lr": float(theory.scale_lr(lr_s, ref, B, "sgd", critical_batch=max(crit, 1e-12))),
            "adam_lr": float(theory.scale_lr(lr_a, ref, B, "adam")),
        })
    meta = {"m": steps, "num_batches": int(num_batches), "num_probes": int(num_probes), "seed": seed,
            "bn_mode": bn_mode, "elapsed": time.perf_counter() - start, "hessfast_version": __version__,
            "torch_version": torch.__version__, "variance_route": var.meta.get("route"),
            "world_size": 1 if ctx is None else ctx.world_size,
            "sigma2_normalisation": "1/(n-1) (sigma2_unbiased of hessian_variance)"}
    return Prediction(curvature=curvature, P=P, N=N, lam_max=lam1, lam_min=lamP, sigma2=s2,
                      sigma2_theorem7=s2_t7, critical_batch=crit, reference_batch=ref, lr_sgd=lr_s, lr_adam=lr_a,
                      relative_sgd=lr_sgd is None, relative_adam=lr_adam is None, rows=rows, variance=var,
                      meta=meta)
