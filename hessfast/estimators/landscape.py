"""The loss along one or two directions in parameter space: L(w + a d1) or L(w + a d1 + b d2).

L is the data set's mean loss exactly as the curvature operators define it (hessfast.losses): the
sum of every batch's loss terms over their total count, e.g. (1/N) sum_b n_b * mean-loss_b. Each
grid point is evaluated with ``torch.func.functional_call`` on perturbed copies of the trainable
parameters, in the same batch-norm mode as the operators; the model itself is never written.

Filter normalisation (Li, Xu, Taylor, Studer & Goldstein 2018, "Visualizing the loss landscape of
neural nets"): each filter of a direction (a slice along dimension 0 of a weight tensor:
a row of a linear layer, an output channel of a convolution) is rescaled to the norm of the same
filter of the weights, and directions of one-dimensional parameters (biases, normalisation
scales) are set to zero, as in the paper's plots.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from ..losses import as_loss
from ..utils import data as data_utils
from ..utils.model_state import check_bn_mode, curvature_mode, model_device, trainable_parameters
from ..utils.serialization import JSONFile, jsonable

FORMAT = "hessfast.LossLandscape/1"
NORMALIZE = (None, "filter")


@dataclass
class LossLandscape(JSONFile):
    """Mean losses on a grid of ``w + a d1`` (1-D) or ``w + a d1 + b d2`` (2-D).

    Attributes:
        alphas: (steps,) float64, the coefficients of d1.
        betas: (steps,) float64 coefficients of d2, or None for one direction.
        losses: (steps,) or (steps, steps) float64, ``losses[i, j]`` at alphas[i], betas[j].
        center: the mean loss at w itself.
        meta: N, P, normalize, bn_mode, direction norms.
    """

    alphas: np.ndarray
    betas: Optional[np.ndarray]
    losses: np.ndarray
    center: float
    meta: dict = field(default_factory=dict)

    @property
    def dims(self) -> int:
        return 1 if self.betas is None else 2

    def to_dict(self) -> dict:
        return jsonable({"format": FORMAT, "alphas": self.alphas, "betas": self.betas, "losses": self.losses,
                         "center": self.center, "meta": self.meta})

    @classmethod
    def from_dict(cls, d: dict) -> "LossLandscape":
        if d.get("format") != FORMAT:
            raise ValueError(f"not a hessfast loss landscape (format {d.get('format')!r}, expected {FORMAT!r}).")
        arr = lambda x: None if x is None else np.array(x, dtype=np.float64)  # noqa: E731 -- None -> NaN
        return cls(arr(d["alphas"]), arr(d["betas"]), arr(d["losses"]), float(d["center"]), d.get("meta", {}))


    def plot(self, path=None, ax=None, title: Optional[str] = None):
        """A line (1-D) or filled contours with the centre marked (2-D); saved to ``path`` (PNG)."""
        from ..utils.plotting import figure_axes

        with figure_axes(ax, path) as ax:
            if self.betas is None:
                ax.plot(self.alphas, self.losses, lw=1.2)
                ax.axvline(0.0, color="C3", lw=0.6, alpha=0.6)
                ax.set_xlabel(r"$\alpha$ (along $d_1$)")
                ax.set_ylabel("mean loss")
            else:
                cs = ax.contourf(self.alphas, self.betas, self.losses.T, levels=30, cmap="viridis")
                ax.contour(self.alphas, self.betas, self.losses.T, levels=10, colors="k", linewidths=0.4)
                ax.plot([0.0], [0.0], "r+", ms=8)
                ax.figure.colorbar(cs, ax=ax, label="mean loss")
                ax.set_xlabel(r"$\alpha$ (along $d_1$)")
                ax.set_ylabel(r"$\beta$ (along $d_2$)")
            ax.set_title(title or f"loss landscape, N={self.meta.get('N')}, P={self.meta.get('P')}")
        return ax


def loss_landscape(model: nn.Module, data: Any, directions: Any, span: tuple = (-1.0, 1.0), steps: int = 21,
                   normalize: Optional[str] = None, loss_fn: Optional[Callable] = None,
                   bn_mode: str = "eval") -> LossLandscape:
    """Mean loss of ``model`` on ``data`` along one or two directions.

    Args:
        model: any ``nn.Module``; the directions live in the space of its trainable parameters.
        data: one ``(inputs, targets)`` batch or an iterable of batches (the mean over all samples).
        directions: one direction or two: a (P,) tensor, a (1, P) or (2, P) tensor (e.g.
            ``top.vectors[:2]``), a {parameter name: tensor} dict, or a list of those. P counts the
            parameters with ``requires_grad`` in ``named_parameters`` order, as the operators flatten them.
        span: (low, high) of the coefficients a (and b).
        steps: grid points per axis (>= 2); an odd count with a symmetric span includes 0.
        normalize: None (the directions as given) or ``"filter"`` (Li et al. 2018; module docstring).
        loss_fn: as for the operators; default cross-entropy (``hessfast.losses.as_loss``).
        bn_mode: ``"eval"`` (running statistics) or ``"train"`` (batch statistics, none updated).

    Returns:
        :class:`LossLandscape`. The model's parameters, buffers, flags and gradients are unchanged.
    """
    check_bn_mode(bn_mode)
    if normalize not in NORMALIZE:
        raise ValueError(f"unknown normalize {normalize!r}; choose None or 'filter'.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"steps must be an int >= 2, got {steps!r}.")
    low, high = (float(x) for x in span)
    if not low < high:
        raise ValueError(f"span must be (low, high) with low < high, got {span!r}.")
    params = trainable_parameters(model)
    dirs = [as_parameter_dict(d, params, i) for i, d in enumerate(split_directions(directions))]
    if normalize == "filter":
        dirs = [filter_normalize(d, params) for d in dirs]
    grid = np.linspace(low, high, steps)
    coeffs = [(float(a),) for a in grid] if len(dirs) == 1 else [(float(a), float(b)) for a in grid for b in grid]
    total, count = evaluate(model, data, params, dirs, [()] + coeffs, as_loss(loss_fn), bn_mode)
    losses = (total / count).numpy()
    terms = float(count[0])  # loss terms: samples for per-sample losses, tokens for token losses
    norms = [float(torch.sqrt(sum((t.double() ** 2).sum() for t in d.values()))) for d in dirs]
    meta = {"N": int(terms) if terms.is_integer() else terms, "P": sum(p.numel() for p in params.values()),
            "normalize": normalize, "bn_mode": bn_mode, "direction_norms": norms}
    shape = (steps,) if len(dirs) == 1 else (steps, steps)
    return LossLandscape(grid, None if len(dirs) == 1 else grid.copy(), losses[1:].reshape(shape),
                         float(losses[0]), meta)


def split_directions(directions: Any) -> list:
    """The list of one or two directions in whatever form they were given."""
    if isinstance(directions, torch.Tensor) and directions.dim() == 2:
        items = list(directions)
    elif isinstance(directions, (list, tuple)):
        items = list(directions)
    else:
        items = [directions]
    if not 1 <= len(items) <= 2:
        raise ValueError(f"loss_landscape takes one or two directions, got {len(items)}; pass e.g. "
                         "top.vectors[:2] for a 2-D grid.")
    return items


def as_parameter_dict(d: Any, params: dict, index: int) -> dict:
    """Direction ``index`` as {name: tensor like the parameter}, checked against the trainable parameters."""
    P = sum(p.numel() for p in params.values())
    if isinstance(d, Mapping):
        missing, extra = sorted(set(params) - set(d)), sorted(set(d) - set(params))
        if missing or extra:
            raise ValueError(f"direction {index}: its names must be the model's trainable parameters; "
                             f"missing {missing}, not trainable or unknown {extra}.")
        out = {}
        for name, p in params.items():
            t = torch.as_tensor(d[name])
            if t.shape != p.shape:
                raise ValueError(f"direction {index}: {name!r} has shape {tuple(t.shape)}, the parameter "
                                 f"{tuple(p.shape)}.")
            out[name] = t.detach().to(device=p.device, dtype=p.dtype)
        return out
    if not isinstance(d, torch.Tensor) or d.dim() != 1 or d.numel() != P:
        shape = tuple(d.shape) if isinstance(d, torch.Tensor) else type(d).__name__
        raise ValueError(f"direction {index} must be a (P,) tensor with P = {P} trainable parameters or a "
                         f"{{name: tensor}} dict, got {shape}.")
    out, start = {}, 0
    for name, p in params.items():
        out[name] = d[start:start + p.numel()].detach().view(p.shape).to(device=p.device, dtype=p.dtype)
        start += p.numel()
    return out


def filter_normalize(d: dict, params: dict) -> dict:
    """Li et al. (2018) filter normalisation: ||d_f|| = ||w_f|| per filter; 1-D parameters get 0."""
    out = {}
    for name, p in params.items():
        t, w = d[name], p.detach()
        if t.dim() <= 1:
            out[name] = torch.zeros_like(t)
            continue
        tn = t.reshape(t.shape[0], -1).norm(dim=1)
        wn = w.reshape(w.shape[0], -1).norm(dim=1)
        scale = torch.where(tn > 0, wn / torch.where(tn > 0, tn, torch.ones_like(tn)), torch.zeros_like(tn))
        out[name] = t * scale.view(-1, *([1] * (t.dim() - 1)))
    return out


def evaluate(model: nn.Module, data: Any, params: dict, dirs: list, coeffs: list, loss, bn_mode: str) -> tuple:
    """(sum of loss terms (G,), their count (G,)) float64 at w + sum_k c_k d_k for each coefficient tuple.

    The data are read once; every batch is evaluated at all grid points before the next is read.
    """
    device = model_device(model)
    base = {n: p.detach() for n, p in params.items()}
    total = torch.zeros(len(coeffs), dtype=torch.float64)
    count = torch.zeros(len(coeffs), dtype=torch.float64)
    seen = False
    with torch.no_grad(), curvature_mode(model, bn_mode):
        for i, batch in enumerate(batches(data)):
            seen = True
            inputs, targets = loss.split(batch)
            inputs, targets = data_utils.prepare_batch((inputs, targets), device, None, i)
            for g, c in enumerate(coeffs):
                state = {n: base[n] + sum(ck * dk[n] for ck, dk in zip(c, dirs)) if c else base[n] for n in base}
                out = data_utils.call_model(lambda *a, **k: functional_call(model, state, a, k), inputs)
                s, n = loss.sum_and_count(loss.logits(out), targets)
                total[g] += float(s)
                count[g] += float(n)
    if not seen:
        raise ValueError("the data loader is empty: it yielded no batches. Check its dataset and drop_last.")
    if count[0] == 0:
        raise ValueError("the data hold no loss terms (every target ignored?); the mean loss is undefined.")
    return total, count


def batches(data: Any):
    """One batch (a pair or a dict) or the batches of an iterable."""
    if data_utils.is_single_batch(data) or isinstance(data, Mapping):
        yield data
        return
    if isinstance(data, torch.Tensor) or not hasattr(data, "__iter__"):
        raise TypeError(f"data must be an (inputs, targets) batch or an iterable of batches (e.g. a DataLoader), "
                        f"got {type(data).__name__}.")
    yield from data
