"""Losses with one term per output element: squared error and binary cross-entropy on logits."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ._base import Loss, compute_dtype


def _pair(name: str, logits: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Logits and targets in the compute dtype, checked to have one shape (no silent broadcasting)."""
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"{name}: targets must be a tensor, got {type(targets).__name__}.")
    if tuple(logits.shape) != tuple(targets.shape):
        raise ValueError(
            f"{name}: logits of shape {tuple(logits.shape)} and targets of shape {tuple(targets.shape)} differ; "
            f"{name} compares them element by element, so reshape the targets (e.g. targets.view_as(logits)) or, "
            "for class indices, use hessfast.losses.cross_entropy().")
    dtype = compute_dtype(logits)
    return logits.to(dtype), targets.to(dtype)


def _ones(values: torch.Tensor) -> torch.Tensor:
    return torch.ones(values.shape, dtype=values.dtype, device=values.device)


class MSE(Loss):
    """Squared error ``(f - y)^2`` per element: the data set's loss is the mean over all its elements.

    The Monte-Carlo Fisher samples ``y ~ N(f, variance)`` with ``variance = 1/2``: ``(f - y)^2`` is then
    exactly the negative log-likelihood up to a constant, so the sampled Fisher equals the GGN
    (loss Hessian ``2 I`` per element) in expectation. Equivalently: a unit-variance Gaussian whose
    NLL is ``(f - y)^2 / 2``, times 2.
    """

    name = "mse"
    variance = 0.5

    def terms(self, logits: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-element terms ``(f - y)^2`` and counts 1, both of the logits' shape ``(n, ...)``."""
        f, y = _pair(self.name, logits, targets)
        values = (f - y) ** 2
        return values, _ones(values)

    def sample(self, logits: torch.Tensor, *, targets: Optional[torch.Tensor] = None,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Targets ``f + sqrt(1/2) z``, z standard normal, of the logits' shape and compute dtype."""
        with torch.no_grad():
            f = logits.detach().to(compute_dtype(logits))
            z = torch.randn(f.shape, generator=generator, dtype=f.dtype, device=f.device)
            return f + math.sqrt(self.variance) * z


class BCEWithLogits(Loss):
    """Binary cross-entropy on logits, per element, as ``nn.BCEWithLogitsLoss`` defines it.

    An element with logit x and target y in [0, 1] contributes, with ``pos_weight`` p and ``weight`` w
    (1 where not given), ``w [(1 - y) x - (1 + (p - 1) y) log sigmoid(x)]`` and the count 1: torch's
    mean divides by the number of elements, not by the weights.

    Args:
        pos_weight: weight of the positive class, broadcast along the last dimension, e.g. ``(C,)``.
        weight: rescaling weight broadcast against every batch's logits (so per class, e.g. ``(C,)``,
            not per sample of the whole data set).
    """

    name = "bce_with_logits"

    def __init__(self, pos_weight: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None):
        for label, tensor in (("pos_weight", pos_weight), ("weight", weight)):
            if tensor is not None and (not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point()):
                raise ValueError(f"bce_with_logits: {label} must be a floating tensor or None, got {tensor!r:.80}.")
        self.pos_weight = pos_weight
        self.weight = weight

    def _options(self) -> str:
        def shape(t):
            return None if t is None else f"tensor of shape {tuple(t.shape)}"
        return f"pos_weight={shape(self.pos_weight)}, weight={shape(self.weight)}"

    def terms(self, logits: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-element terms and counts 1, both of the logits' shape ``(n, ...)``."""
        x, y = _pair(self.name, logits, targets)
        if self.pos_weight is None:
            values = (1 - y) * x - torch.nn.functional.logsigmoid(x)
        else:
            p = self.pos_weight.to(device=x.device, dtype=x.dtype)
            values = (1 - y) * x - (1 + (p - 1) * y) * torch.nn.functional.logsigmoid(x)
        if self.weight is not None:
            values = values * self.weight.to(device=x.device, dtype=x.dtype)
        if tuple(values.shape) != tuple(x.shape):
            raise ValueError(f"bce_with_logits: weight or pos_weight broadcasts the logits of shape "
                             f"{tuple(x.shape)} to {tuple(values.shape)}; give them a shape that broadcasts "
                             "against one batch, e.g. (C,).")
        return values, _ones(values)

    def sample(self, logits: torch.Tensor, *, targets: Optional[torch.Tensor] = None,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Targets in {0, 1} drawn from Bernoulli(sigmoid(x)), of the logits' shape and compute dtype."""
        with torch.no_grad():
            x = logits.detach().to(compute_dtype(logits))
            return torch.bernoulli(torch.sigmoid(x), generator=generator)


def mse() -> Loss:
    """Squared error; the data set's loss is ``nn.MSELoss()`` on all of it: the mean over all elements.

    Logits and targets must have one shape ``(n, ...)`` (torch would broadcast, usually by mistake).
    Its ``sample`` draws ``N(f, 1/2)``, the Gaussian whose NLL is the loss (see :class:`MSE`).
    """
    return MSE()


def bce_with_logits(pos_weight: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None) -> Loss:
    """Binary cross-entropy on logits; the data set's loss is ``nn.BCEWithLogitsLoss(weight, pos_weight=)`` on it.

    Args:
        pos_weight: positive-class weight, broadcast along the last dimension, e.g. ``(C,)``.
        weight: rescaling weight broadcast against a batch's logits ``(n, ...)``, e.g. ``(C,)``.

    Returns:
        The loss: the mean over all elements of the data set; targets in [0, 1] of the logits' shape.
    """
    return BCEWithLogits(pos_weight, weight)
