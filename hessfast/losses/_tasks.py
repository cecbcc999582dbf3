"""Losses of Hugging Face task heads: causal and masked language models, sequence classification."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._base import Loss
from ._categorical import CrossEntropy
from ._elementwise import MSE, BCEWithLogits

PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


def causal_lm(ignore_index: int = -100, label_smoothing: float = 0.0,
              weight: Optional[torch.Tensor] = None) -> Loss:
    """Next-token cross-entropy with Hugging Face's shift: the mean over all non-ignored tokens of the data set.

    Logits ``(n, T, V)`` at positions 0..T-2 predict labels ``(n, T)`` at 1..T-1 (label 0 of each
    sequence is never used); labels equal to ``ignore_index`` (padding, prompts) carry no loss. A
    batch of one data set then counts its tokens, so unequal batches, sequence lengths and padding
    weigh every token alike. Per sample means per sequence. Half-precision logits are upcast to
    float32, as Hugging Face's own loss does.

    Args:
        ignore_index: label that carries no loss.
        label_smoothing: ε in [0, 1], as torch's.
        weight: token weights ``(V,)``, or None.

    Returns:
        The loss; a dict batch gives its ``"labels"`` as targets and the rest as the model's inputs.
    """
    return CrossEntropy(ignore_index, label_smoothing, weight, class_dim=-1, shift=True, name="causal_lm")


def masked_lm(ignore_index: int = -100, label_smoothing: float = 0.0,
              weight: Optional[torch.Tensor] = None) -> Loss:
    """Token cross-entropy without a shift (masked LM, token classification): logits ``(n, T, V)``, labels ``(n, T)``.

    The mean over all non-ignored tokens of the data set (the unmasked positions carry
    ``ignore_index``). Options as for :func:`causal_lm`.
    """
    return CrossEntropy(ignore_index, label_smoothing, weight, class_dim=-1, name="masked_lm")


class SequenceClassification(Loss):
    """Hugging Face's sequence-classification loss, picked by ``problem_type`` as its models pick it.

    Args:
        problem_type: ``"regression"`` (MSE, the mean over all elements), ``"single_label_classification"``
            (cross-entropy, the mean over non-ignored samples) or ``"multi_label_classification"``
            (binary cross-entropy on logits, the mean over all elements); None: Hugging Face's rule per
            batch, from logits ``(n, num_labels)`` and labels: regression if num_labels == 1, else
            single-label for integer labels (int32/int64), else multi-label.
        ignore_index: label that carries no loss in single-label classification.
    """

    name = "sequence_classification"

    def __init__(self, problem_type: Optional[str] = None, ignore_index: int = -100):
        if problem_type is not None and problem_type not in PROBLEM_TYPES:
            raise ValueError(f"sequence_classification: problem_type must be None or one of {PROBLEM_TYPES}, "
                             f"got {problem_type!r}.")
        self.problem_type = problem_type
        self.ignore_index = int(ignore_index)
        self.classify = CrossEntropy(ignore_index, class_dim=-1, name="sequence_classification")
        self.regress = MSE()
        self.multi_label = BCEWithLogits()

    def _options(self) -> str:
        return f"problem_type={self.problem_type!r}, ignore_index={self.ignore_index}"

    def resolve(self, logits: torch.Tensor, targets: Optional[torch.Tensor]) -> str:
        """The problem type of a batch (``self.problem_type`` if set, else Hugging Face's rule)."""
        if self.problem_type is not None:
            return self.problem_type
        if logits.dim() != 2:
            raise ValueError(f"sequence_classification: logits of shape {tuple(logits.shape)}; expected "
                             "(n, num_labels).")
        if logits.shape[-1] == 1:
            return "regression"
        if targets is None:
            raise ValueError("sequence_classification: with num_labels > 1 and no targets the problem type is "
                             "ambiguous; pass targets= or set problem_type=.")
        return "single_label_classification" if targets.dtype in (torch.int32, torch.int64) \
            else "multi_label_classification"

    def terms(self, logits: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Terms and counts: ``(n,)`` for classification and 1-label regression, ``(n, num_labels)`` else."""
        kind = self.resolve(logits, targets)
        n = logits.shape[0]
        if kind == "regression":
            if logits.shape[-1] == 1 and targets.numel() == n:
                return self.regress.terms(logits.reshape(n), targets.reshape(n))
            return self.regress.terms(logits, targets)
        if kind == "single_label_classification":
            if targets.numel() == n:
                targets = targets.reshape(n)
            return self.classify.terms(logits.reshape(n, -1), targets)
        return self.multi_label.terms(logits, targets)

    def sample(self, logits: torch.Tensor, *, targets: Optional[torch.Tensor] = None,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Labels drawn from the predictive distribution of the batch's problem type.

        Returns:
            Gaussian ``N(f, 1/2)`` values of the labels' shape (regression; ``(n,)`` without targets
            for one label), class indices ``(n,)`` (single-label, ignored samples stay ignored) or
            Bernoulli draws ``(n, num_labels)`` (multi-label).
        """
        kind = self.resolve(logits, targets)
        n = logits.shape[0]
        if kind == "regression":
            if logits.shape[-1] == 1 and (targets is None or targets.numel() == n):
                drawn = self.regress.sample(logits.reshape(n), generator=generator)
                return drawn if targets is None else drawn.reshape(targets.shape)
            return self.regress.sample(logits, generator=generator)
        if kind == "single_label_classification":
            flat = None if targets is None else targets.reshape(n)
            drawn = self.classify.sample(logits.reshape(n, -1), targets=flat, generator=generator)
            return drawn if targets is None else drawn.reshape(targets.shape).to(targets.dtype)
        return self.multi_label.sample(logits, generator=generator)


def sequence_classification(problem_type: Optional[str] = None, ignore_index: int = -100) -> Loss:
    """The loss a Hugging Face ``...ForSequenceClassification`` model computes from ``labels=``, over the data set.

    Logits ``(n, num_labels)``; labels ``(n,)`` class indices, ``(n,)`` or ``(n, 1)`` values for
    regression (num_labels == 1), or ``(n, num_labels)`` for multi-label. With ``problem_type=None``
    the type follows Hugging Face's rule (see :class:`SequenceClassification`); set it as in the
    model's ``config.problem_type`` where that is set.
    """
    return SequenceClassification(problem_type, ignore_index)
