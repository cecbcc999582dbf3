"""PNG plots that mirror the paper's figures (matplotlib, Agg backend)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np


def _plt():
    from hessfast.utils.plotting import pyplot

    return pyplot()


def _save(fig, path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return Path(path)


def track(records: Sequence[Mapping], path) -> Path:
    """Figure 9: full, batch (mean +- std) and predicted lambda_1 over training, one panel per curvature."""
    plt = _plt()
    curvatures = [c for c in ("hessian", "ggn") if any(r["curvature"] == c for r in records)]
    fig, axes = plt.subplots(1, len(curvatures), figsize=(5.5 * len(curvatures), 4), squeeze=False)
    for ax, c in zip(axes[0], curvatures):
        rs = sorted((r for r in records if r["curvature"] == c), key=lambda r: r["epoch"])
        ep = np.array([r["epoch"] for r in rs])
        ax.plot(ep, [r["full_lambda1"] for r in rs], "o-", label="Full $\\lambda_1$")
        mean = np.array([r["batch_lambda1_mean"] for r in rs])
        std = np.array([r["batch_lambda1_std"] for r in rs])
        ax.errorbar(ep, mean, yerr=std, fmt="s-", capsize=3, label=f"Batch $\\lambda_1$ (B={rs[0]['B']})")
        ax.plot(ep, [r["thm4_lambda1"] for r in rs], "^--", label="Pert (Thm 4)")
        if c == "ggn" and "thm7_lambda1" in rs[0]:
            ax.plot(ep, [r["thm7_lambda1"] for r in rs], "v--", label="Pert (Thm 7)")
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("$\\lambda_1$")
        ax.set_title({"hessian": "Hessian", "ggn": "GGN"}.get(c, c))
        ax.legend(fontsize=8)
    return _save(fig, path)


def series(x: Sequence[float], ys: Mapping[str, Sequence[float]], path, *, xlabel: str, ylabel: str,
           title: str = "", logy: bool = False, logx: bool = False, style: str = "o-",
           ticks_at_x: bool = False) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, y in ys.items():
        ax.plot(x, y, style, label=label)
    if logy:
        ax.set_yscale("log")
    if logx:
        ax.set_xscale("log", base=2 if ticks_at_x else 10)
    if ticks_at_x:  # e.g. batch sizes: label exactly the values used
        ax.set_xticks(list(x), [f"{v:g}" for v in x])
        ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def curves(panels: Mapping[str, Mapping[str, Tuple[Sequence[float], Sequence[float]]]], path, *,
           ylabel: str = "error", ncols: int = 2) -> Path:
    """One panel per key; each holds labelled (epochs, values) curves (Figures 11-16, 20-22)."""
    plt = _plt()
    n = len(panels)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.5 * ncols, 3.6 * nrows), squeeze=False)
    for ax, (title, lines) in zip(axes.flat, panels.items()):
        # one colour per curve family ("B=16 train" and "B=16 val" share it); train solid, validation dashed
        colours: Dict[str, str] = {}
        for label, (x, y) in lines.items():
            family, _, kind = label.rpartition(" ")
            family = family or label
            colour = colours.setdefault(family, f"C{len(colours) % 10}")
            val = "val" in kind
            ax.plot(x, y, "--" if val else "-", color=colour, label=None if val else family)
        ax.set_title(title + " (solid: train, dashed: validation)", fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7, ncol=2)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    return _save(fig, path)


def densities(spectra: Mapping[str, "object"], path, *, title: str = "", sigma: Optional[float] = None) -> Path:
    """Overlaid smoothed spectral densities (log y) of several :class:`hessfast.Spectrum`."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    lo = min(s.lambda_min for s in spectra.values())
    hi = max(s.lambda_max for s in spectra.values())
    span = hi - lo or 1.0
    grid = np.linspace(lo - 0.05 * span, hi + 0.05 * span, 2000)
    for label, s in spectra.items():
        ax.semilogy(grid, np.maximum(s.density(grid, sigma if sigma is not None else 0.01 * span), 1e-12),
                    label=label)
    ax.set_ylim(bottom=1e-6)
    ax.set_xlabel("$\\lambda$")
    ax.set_ylabel("$p(\\lambda)$")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def log_histograms(values: Mapping[str, np.ndarray], path, *, xlabel: str, title: str = "", bins: int = 80) -> Path:
    """Histograms on a log10 x axis (Figure 19: Adam's implied curvature)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    allv = np.concatenate([np.asarray(v, dtype=float).ravel() for v in values.values()])
    allv = allv[allv > 0]
    edges = np.logspace(np.log10(allv.min()), np.log10(allv.max()), bins) if allv.size else bins
    for label, v in values.items():
        v = np.asarray(v, dtype=float).ravel()
        ax.hist(v[v > 0], bins=edges, histtype="step", density=False, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)
