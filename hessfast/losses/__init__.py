"""Losses for curvature over a data set: the mean over all its loss terms, exact across batches.

Every loss here reports, per batch, the sum of its loss terms and their number (see
:class:`Loss`), so the curvature is that of the data set's mean loss as torch defines it on all of
the data at once, whatever the batch sizes, padding, sequence lengths or class weights. See
``docs/losses.md``.

Built-ins: :func:`cross_entropy`, :func:`causal_lm`, :func:`masked_lm`,
:func:`sequence_classification`, :func:`mse`, :func:`bce_with_logits`. Plain ``loss_fn(outputs,
targets)`` callables go through :func:`as_loss` / :func:`from_callable`.
"""
from ._adapter import CallableLoss, as_loss, from_callable
from ._base import Loss
from ._categorical import CrossEntropy, cross_entropy
from ._elementwise import MSE, BCEWithLogits, bce_with_logits, mse
from ._tasks import SequenceClassification, causal_lm, masked_lm, sequence_classification

__all__ = [
    "Loss", "as_loss", "from_callable", "CallableLoss",
    "cross_entropy", "causal_lm", "masked_lm", "sequence_classification", "mse", "bce_with_logits",
    "CrossEntropy", "SequenceClassification", "MSE", "BCEWithLogits",
]
