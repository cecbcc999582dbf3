"""Plain ``loss_fn(outputs, targets)`` callables and ``nn.Module`` losses, as hessfast has always taken them."""
from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Callable, Optional, Tuple

import torch

from ._base import Loss, describe
from ._categorical import cross_entropy

REDUCTIONS = ("mean", "sum")
_BUILTINS = ("hessfast.losses.cross_entropy(), causal_lm(), masked_lm(), sequence_classification(), mse() or "
             "bce_with_logits()")


class CallableLoss(Loss):
    """A plain callable ``fn(outputs, targets) -> scalar`` seen through the loss protocol.

    Each of the n samples of a batch (n = ``targets.shape[0]``) is one loss term:

    * ``reduction="mean"``: the batch's sum is ``fn(...) * n``, its count n;
    * ``reduction="sum"``: the batch's sum is ``fn(...)``, its count n.

    So the data set's loss is ``(1/N) sum_b (n_b fn_b)`` for a mean and ``(1/N) sum_b fn_b`` for a sum:
    for a sum-reduced loss, 1/N times the curvature of the summed loss. A mean that is not over
    samples (token padding, class weights) is weighted per batch, not per term: use a built-in for
    those. ``fn`` receives the model's output unchanged when it is a tensor; other outputs (dict,
    ``ModelOutput``, tuple) are refused unless ``raw_output=True`` declares that ``fn`` takes them.

    Args:
        fn: the callable or ``nn.Module`` loss.
        reduction: ``"mean"`` or ``"sum"``.
        raw_output: pass any model output to ``fn`` as is.
        linear_in_logits: ``fn`` is linear in the outputs (its Hessian there is zero).
    """

    name = "from_callable"

    def __init__(self, fn: Callable, reduction: str, raw_output: bool = False, linear_in_logits: bool = False):
        self.fn = fn
        self.reduction = reduction
        self.raw_output = bool(raw_output)
        self.linear_in_logits = bool(linear_in_logits)

    def _options(self) -> str:
        return f"{self.fn!r}, reduction={self.reduction!r}, raw_output={self.raw_output}"

    def split(self, batch: Any) -> Tuple[Any, Any]:
        """``(inputs, targets)`` of a 2-tuple or list batch; dict batches need a built-in loss."""
        if isinstance(batch, Mapping):
            raise TypeError(
                f"the batch is {describe(batch)}, and loss_fn is a plain callable, which takes (inputs, targets) "
                f"batches only. For Hugging Face dict batches pass loss_fn={_BUILTINS}: they take the targets "
                f"from batch['labels'] and give the rest to the model.")
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            return batch[0], batch[1]
        raise TypeError(f"the batch is {describe(batch)}; hessfast expects (inputs, targets) pairs, e.g. "
                        "DataLoader(TensorDataset(x, y)) or (x, y) for a single batch.")

    def logits(self, output: Any) -> Any:
        """The model's output unchanged: a tensor, or anything with ``raw_output=True``."""
        if isinstance(output, torch.Tensor) or self.raw_output:
            return output
        raise TypeError(
            f"the model returned {describe(output)}, and loss_fn is a plain callable, which hessfast gives "
            f"tensors only. Pass loss_fn={_BUILTINS} (they take the 'logits' of a dict / ModelOutput and the "
            f"first element of a tuple), or hessfast.losses.from_callable(fn, raw_output=True) if fn takes "
            f"the model's output as it is.")

    def _value(self, logits: Any, targets: Any) -> torch.Tensor:
        value = self.fn(logits, targets)
        if not isinstance(value, torch.Tensor) or value.dim() != 0:
            raise ValueError(f"loss_fn returned {describe(value)}; hessfast needs a scalar loss: use "
                             f"reduction='mean' (the default) or 'sum', or a {_BUILTINS}.")
        return value

    def sum_and_count(self, logits: Any, targets: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(fn * n, n)`` for a mean, ``(fn, n)`` for a sum; n = ``targets.shape[0]``, count in fn's dtype."""
        value = self._value(logits, targets)
        n = self.num_samples(targets)
        total = value * float(n) if self.reduction == "mean" else value
        return total, torch.tensor(float(n), dtype=value.dtype, device=value.device)

    def per_sample(self, logits: Any, targets: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        """``fn`` on each sample alone, ``(n,)``, and counts 1: the batch's split if fn is a sum of per-sample terms."""
        n = self.num_samples(targets)
        sums = torch.stack([self._value(_rows(logits, i), targets[i:i + 1]) for i in range(n)])
        return sums, torch.ones(n, dtype=sums.dtype, device=sums.device)

    def sample(self, logits: Any, *, targets: Optional[torch.Tensor] = None,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        raise NotImplementedError(f"a plain callable loss has no predictive distribution to sample from; pass "
                                  f"loss_fn={_BUILTINS} or a hessfast.losses.Loss subclass with sample().")

    def to(self, dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None) -> "Loss":
        """A copy; an ``nn.Module`` fn is deep-copied and moved with ``Module.to`` (floating buffers cast)."""
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"Loss.to: dtype must be a floating dtype, got {dtype}.")
        clone = copy.copy(self)
        if isinstance(self.fn, torch.nn.Module):
            clone.fn = copy.deepcopy(self.fn).to(device=device, dtype=dtype)
        return clone


def _rows(x: Any, i: int) -> Any:
    """Sample i of a batched output (a tensor, or a dict / tuple of them), keeping the batch dimension."""
    if isinstance(x, torch.Tensor):
        return x[i:i + 1]
    if isinstance(x, Mapping):
        return {k: _rows(v, i) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_rows(v, i) for v in x)
    return x


def from_callable(fn: Callable, reduction: Optional[str] = None, raw_output: bool = False,
                  linear_in_logits: bool = False) -> Loss:
    """Declare how a plain ``fn(outputs, targets) -> scalar`` reduces over the samples of a batch.

    Args:
        fn: a callable or ``nn.Module`` loss.
        reduction: ``"mean"`` (over the samples) or ``"sum"``; None reads ``fn.reduction``, and takes a
            mean where ``fn`` has none. ``"batchmean"`` (``nn.KLDivLoss``: the batch's sum over its
            samples) is a mean over the samples.
        raw_output: give ``fn`` whatever the model returns (dict, ``ModelOutput``, tuple), unchanged.
        linear_in_logits: ``fn`` is linear in the outputs.

    Returns:
        A :class:`CallableLoss` (see it for the convention).

    Raises:
        ValueError: for ``reduction="none"`` or any other reduction.
    """
    if isinstance(fn, Loss):
        raise TypeError(f"{fn!r} is already a hessfast.losses.Loss; pass it as it is.")
    if not callable(fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(outputs, targets), got {type(fn).__name__}.")
    if reduction is None:
        reduction = getattr(fn, "reduction", "mean")
    if reduction == "batchmean":   # nn.KLDivLoss: the sum over a batch divided by its samples
        reduction = "mean"
    if reduction not in REDUCTIONS:
        raise ValueError(f"loss_fn has reduction={reduction!r}; hessfast needs a scalar loss: use reduction='mean' "
                         f"(the default) or 'sum', or a built-in {_BUILTINS}, which keep the per-term losses.")
    return CallableLoss(fn, reduction, raw_output, linear_in_logits)


def as_loss(obj: Any) -> Loss:
    """The :class:`Loss` for what a user passed as ``loss_fn``.

    Args:
        obj: None (the default: :func:`cross_entropy`, which on logits ``(n, C)`` and class indices
            ``(n,)`` is ``nn.CrossEntropyLoss()``), a :class:`Loss` (returned as is) or a plain
            callable / ``nn.Module`` loss (:func:`from_callable` with its ``reduction``).

    Returns:
        The loss.
    """
    if obj is None:
        return cross_entropy()
    if isinstance(obj, Loss):
        return obj
    return from_callable(obj)
