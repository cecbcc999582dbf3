"""Cross-entropy over classes or tokens, as ``torch.nn.functional.cross_entropy`` defines its mean."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._base import Loss, compute_dtype


class CrossEntropy(Loss):
    """Softmax cross-entropy whose data-set mean is torch's ``reduction="mean"`` on all the data at once.

    With class-index targets y, class weights w (all 1 without ``weight``), label smoothing ε and C
    classes, a position i that is not ignored contributes the term and the count

        l_i = (1 - ε) w_{y_i} (-log p_i[y_i]) + (ε / C) sum_c w_c (-log p_i[c]),    c_i = w_{y_i},

    and an ignored one (``y_i == ignore_index``) contributes 0 and 0: the mean sum l / sum c is
    torch's weighted mean over the non-ignored targets. With probability targets (floating, the
    logits' shape) a position contributes ``-sum_c w_c t_c log p_i[c]`` (t smoothed by ε) and the
    count 1, as torch divides by the number of positions there.

    Args:
        ignore_index: class index whose positions carry no loss.
        label_smoothing: ε in [0, 1].
        weight: class weights ``(C,)``, or None.
        class_dim: 1 (torch's convention, the default): logits ``(n, C)`` or ``(n, C, d1, ...)`` with
            targets ``(n,)`` or ``(n, d1, ...)``; or -1: logits ``(n, ..., C)`` with targets ``(n, ...)``.
        shift: predict the next token (Hugging Face causal LM): logits ``(n, T, C)`` at positions
            0..T-2 against labels ``(n, T)`` at 1..T-1; needs ``class_dim=-1``.
        name: the factory's name, for ``repr``.
    """

    def __init__(self, ignore_index: int = -100, label_smoothing: float = 0.0,
                 weight: Optional[torch.Tensor] = None, class_dim: int = 1, shift: bool = False,
                 name: str = "cross_entropy"):
        if class_dim not in (1, -1):
            raise ValueError(f"class_dim must be 1 (logits (n, C, ...)) or -1 (logits (..., C)), got {class_dim}.")
        if not 0.0 <= float(label_smoothing) <= 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing}.")
        if weight is not None and (not isinstance(weight, torch.Tensor) or weight.dim() != 1
                                   or not weight.is_floating_point()):
            raise ValueError("weight must be a floating tensor of shape (C,) with one weight per class, got "
                             f"{weight!r:.80}.")
        if shift and class_dim != -1:
            raise ValueError("shift=True (causal LM) needs class_dim=-1: logits (n, T, C).")
        self.ignore_index = int(ignore_index)
        self.label_smoothing = float(label_smoothing)
        self.weight = weight
        self.class_dim = class_dim
        self.shift = shift
        self.name = name

    def _options(self) -> str:
        weight = None if self.weight is None else f"tensor of shape {tuple(self.weight.shape)}"
        opts = f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, weight={weight}"
        return opts + (f", class_dim={self.class_dim}" if self.name == "cross_entropy" else "")

    def _align(self, logits: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Logits as ``(n, ..., C)`` in the compute dtype and targets aligned with them."""
        if not isinstance(targets, torch.Tensor):
            raise TypeError(f"{self.name}: targets must be a tensor, got {type(targets).__name__}.")
        need = 3 if self.shift else 2
        if logits.dim() < need:
            shape = "(n, T, C)" if self.shift else ("(n, C, ...)" if self.class_dim == 1 else "(n, ..., C)")
            raise ValueError(f"{self.name}: logits of shape {tuple(logits.shape)}; expected {shape}.")
        x = logits.to(compute_dtype(logits))
        if self.class_dim == 1:
            x = x.movedim(1, -1)
            if targets.is_floating_point() and targets.dim() >= 2:
                targets = targets.movedim(1, -1)
        if self.shift:
            if targets.dim() != 2:
                raise ValueError(f"{self.name}: labels of shape {tuple(targets.shape)}; expected (n, T) token ids.")
            x, targets = x[:, :-1], targets[:, 1:]
        return x, targets

    def _check_indices(self, x: torch.Tensor, targets: torch.Tensor) -> None:
        if tuple(targets.shape) != tuple(x.shape[:-1]):
            raise ValueError(
                f"{self.name}: targets of shape {tuple(targets.shape)} do not match logits with classes moved "
                f"last {tuple(x.shape)}: expected targets of shape {tuple(x.shape[:-1])} (class_dim="
                f"{self.class_dim}).")

    def terms(self, logits: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-position terms and counts, shape ``(n, ...)`` = the (shifted) targets' shape."""
        x, targets = self._align(logits, targets)
        logp = torch.log_softmax(x, dim=-1)
        num_classes = logp.shape[-1]
        eps = self.label_smoothing
        w = None if self.weight is None else self.weight.to(device=logp.device, dtype=logp.dtype)
        if targets.is_floating_point():
            if tuple(targets.shape) != tuple(logp.shape):
                raise ValueError(f"{self.name}: probability targets of shape {tuple(targets.shape)} must have the "
                                 f"logits' shape {tuple(logp.shape)} (classes last).")
            t = targets.to(logp.dtype)
            if eps > 0:
                t = t * (1 - eps) + eps / num_classes
            wlogp = logp if w is None else logp * w
            values = -(t * wlogp).sum(-1)
            return values, torch.ones(values.shape, dtype=values.dtype, device=values.device)
        self._check_indices(logp, targets)
        valid = targets != self.ignore_index
        safe = torch.where(valid, targets, torch.zeros_like(targets)).long()
        nll = -logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
        if w is None:
            counts = valid.to(logp.dtype)
            values = nll if eps == 0 else (1 - eps) * nll - (eps / num_classes) * logp.sum(-1)
        else:
            counts = w[safe] * valid
            values = counts * nll if eps == 0 else (1 - eps) * w[safe] * nll - (eps / num_classes) * (logp * w).sum(-1)
        return torch.where(valid, values, torch.zeros_like(values)), counts

    def sample(self, logits: torch.Tensor, *, targets: Optional[torch.Tensor] = None,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Class indices drawn from softmax(logits), shaped like index targets; ignored positions stay ignored.

        Args:
            logits: ``(n, C, ...)`` (class_dim 1) or ``(n, ..., C)``; ``(n, T, C)`` for the causal LM.
            targets: true index targets of the same shape as the result; their ``ignore_index``
                positions get ``ignore_index``.
            generator: random generator on the logits' device.

        Returns:
            ``(n, ...)`` int64 class indices (``(n, T)`` for the causal LM, position 0 = ignore_index,
            as no logit predicts it).
        """
        with torch.no_grad():
            x = logits.detach().to(compute_dtype(logits))
            x = x.movedim(1, -1) if self.class_dim == 1 else x
            if self.shift:
                x = x[:, :-1]
            probs = torch.softmax(x, dim=-1).reshape(-1, x.shape[-1])
            drawn = torch.multinomial(probs, 1, generator=generator).view(x.shape[:-1])
            if self.shift:
                pad = torch.full_like(drawn[:, :1], self.ignore_index)
                drawn = torch.cat([pad, drawn], dim=1)
            if targets is not None and not targets.is_floating_point():
                drawn = torch.where(targets == self.ignore_index, torch.full_like(drawn, self.ignore_index), drawn)
            return drawn


def cross_entropy(ignore_index: int = -100, label_smoothing: float = 0.0, weight: Optional[torch.Tensor] = None,
                  class_dim: int = 1) -> Loss:
    """Softmax cross-entropy; the data set's loss is torch's mean-reduced ``F.cross_entropy`` on all of it.

    Equals ``nn.CrossEntropyLoss(weight, ignore_index=..., label_smoothing=...)`` on the concatenated
    data set: the mean over non-ignored targets, weighted by their class weights where given. With
    the default options and logits ``(n, C)`` it is ``nn.CrossEntropyLoss()`` (hessfast's default loss).

    Args:
        ignore_index: class index whose positions carry no loss (padding).
        label_smoothing: ε in [0, 1], as torch's.
        weight: class weights ``(C,)``; the mean is then weighted (count = sum of the weights of the
            non-ignored targets).
        class_dim: 1 (default, torch's layout): logits ``(n, C)`` or ``(n, C, d1, ...)``, targets ``(n,)``
            or ``(n, d1, ...)``; -1: logits ``(n, ..., C)``, targets ``(n, ...)`` (token logits).
            Targets are class indices, or probabilities of the logits' shape.

    Returns:
        The loss; a dict or ``ModelOutput`` from the model gives its ``"logits"``.
    """
    return CrossEntropy(ignore_index, label_smoothing, weight, class_dim)
