"""The loss protocol: how a batch, a model's output and a loss meet.

A curvature over a data set needs more from a loss than its value on one batch. To get the
curvature of the mean over **all loss terms of the data set**, whatever the batch sizes, padding or
sequence lengths, each batch b reports the sum ``s_b`` of its loss terms and their number ``c_b``
(a weighted count where torch weights the mean). The data set's loss is then

    L = (sum_b s_b) / (sum_b c_b),

which is exactly the value torch's own mean-reduced loss takes on the concatenated data set, and its
Hessian is ``(sum_b Hess s_b) / (sum_b c_b)``: the counts never depend on the model's output.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Optional, Tuple

import torch

_HALF = (torch.float16, torch.bfloat16)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a built-in loss computes in: at least float32 (as Hugging Face's losses upcast)."""
    return torch.float32 if x.dtype in _HALF else x.dtype


def describe(x: Any) -> str:
    """A short description of an object for error messages: its type and, for tensors, shape and dtype."""
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    if isinstance(x, Mapping):
        return f"a {type(x).__name__} with keys {list(x.keys())}"
    if isinstance(x, (tuple, list)):
        return f"a {type(x).__name__} of length {len(x)}"
    return f"a {type(x).__name__}"


class Loss:
    """Base class of hessfast's losses: the data set's loss is the mean over all its loss terms.

    A subclass implements :meth:`terms` (or :meth:`sum_and_count` and :meth:`per_sample` directly);
    everything else has a default that suits the built-ins.

    Attributes:
        target_key: key of the targets in a dict batch (Hugging Face style), ``"labels"`` by default.
        logits_key: key of the logits in a dict or ``ModelOutput`` returned by the model, ``"logits"``.
        linear_in_logits: True if the loss is linear in the logits, so that its Hessian with respect
            to the logits is zero and the GGN vanishes (e.g. a KL divergence on log-probabilities).
            False for every built-in.
    """

    target_key: str = "labels"
    logits_key: str = "logits"
    linear_in_logits: bool = False

    # -- batch and output handling -------------------------------------------------------------

    def split(self, batch: Any) -> Tuple[Any, Any]:
        """Split a batch, as a data loader yields it, into the model's inputs and the targets.

        Args:
            batch: an ``(inputs, targets)`` tuple or list, or a dict (e.g. a Hugging Face
                ``BatchEncoding``) holding ``self.target_key``; the inputs are then the dict without
                that key, to be passed as ``model(**inputs)``.

        Returns:
            ``(inputs, targets)``.

        Raises:
            TypeError: for anything else; ValueError for a dict without the target key.
        """
        if isinstance(batch, Mapping):
            if self.target_key not in batch:
                raise ValueError(
                    f"the batch is a dict with keys {list(batch.keys())} but no {self.target_key!r} entry for the "
                    f"targets. Add it to the batch (for a causal LM: labels = input_ids with padding set to -100) "
                    f"or pass target_key= to the loss.")
            inputs = {k: v for k, v in batch.items() if k != self.target_key}
            return inputs, batch[self.target_key]
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            return batch[0], batch[1]
        raise TypeError(
            f"the batch is {describe(batch)}; hessfast expects an (inputs, targets) pair or a dict with a "
            f"{self.target_key!r} entry (Hugging Face style).")

    def logits(self, output: Any) -> torch.Tensor:
        """The tensor the loss acts on, taken from whatever the model returned.

        Args:
            output: a tensor (returned as is); a dict or Hugging Face ``ModelOutput`` (its
                ``self.logits_key`` entry); a tuple or list (its first element).

        Returns:
            The logits, a tensor.

        Raises:
            TypeError: if no tensor can be found; it says what to pass.
        """
        found = output
        if isinstance(output, Mapping):
            if self.logits_key not in output:
                raise TypeError(
                    f"the model returned {describe(output)} without a {self.logits_key!r} entry; pass "
                    f"logits_key= to the loss to name the entry that holds the logits.")
            found = output[self.logits_key]
        elif isinstance(output, (tuple, list)) and len(output) > 0:
            found = output[0]
        if not isinstance(found, torch.Tensor):
            raise TypeError(
                f"the model returned {describe(output)}, from which no logits tensor can be taken (found "
                f"{describe(found)}). Return a tensor, a tuple whose first element is the logits, or a dict / "
                f"ModelOutput with a {self.logits_key!r} entry (or pass logits_key=).")
        return found

    def num_samples(self, targets: Any) -> int:
        """Number of samples (sequences for token losses) in a batch: the first dimension of the targets."""
        if not isinstance(targets, torch.Tensor) or targets.dim() == 0:
            raise TypeError(f"the targets must be a tensor whose first dimension counts the samples, got "
                            f"{describe(targets)}.")
        return int(targets.shape[0])

    # -- the loss itself -----------------------------------------------------------------------

    def terms(self, logits: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The batch's loss terms and their counts, of one shape ``(n, ...)`` with n = num_samples.

        The data set's loss is ``sum(values) / sum(counts)`` over all its batches. ``counts`` depends
        only on the targets (and the loss's own constants), never on the logits.

        Args:
            logits: the model's output, as :meth:`logits` returns it.
            targets: the batch's targets.

        Returns:
            ``(values, counts)``, both of shape ``(n, ...)`` and the compute dtype.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement terms() or sum_and_count() and "
                                  "per_sample().")

    def sum_and_count(self, logits: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Sum of the batch's loss terms and their number.

        Args:
            logits: the model's output, as :meth:`logits` returns it, e.g. ``(n, C)``.
            targets: the batch's targets, e.g. ``(n,)``.

        Returns:
            ``(sum, count)``: two scalar tensors; ``count`` is a floating tensor of the same dtype and
            device as ``sum`` that does not depend on the logits (no gradient flows through it). For a
            data set in batches the mean loss is ``(Σ_b sum_b) / (Σ_b count_b)``.
        """
        values, counts = self.terms(logits, targets)
        return values.sum(), counts.sum().detach()

    def per_sample(self, logits: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The split of :meth:`sum_and_count` per sample (per sequence for token losses).

        Args:
            logits: the model's output for n samples.
            targets: their targets.

        Returns:
            ``(sums, counts)``, both of shape ``(n,)``; ``sums.sum()`` is the batch's sum and
            ``counts.sum()`` its count.
        """
        values, counts = self.terms(logits, targets)
        n = values.shape[0]
        return values.reshape(n, -1).sum(1), counts.reshape(n, -1).sum(1).detach()

    def __call__(self, output: Any, targets: Any) -> torch.Tensor:
        """The batch's mean loss ``sum / count`` on the model's raw output (a scalar tensor)."""
        total, count = self.sum_and_count(self.logits(output), targets)
        return total / count

    def sample(self, logits: torch.Tensor, *, targets: Optional[torch.Tensor] = None,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Targets drawn from the model's predictive distribution, for the Monte-Carlo Fisher.

        Args:
            logits: the model's output, as :meth:`logits` returns it.
            targets: the batch's true targets, if known: positions they ignore stay ignored.
            generator: the random generator to draw with (on the logits' device).

        Returns:
            Targets of the shape and kind the loss takes (detached).
        """
        raise NotImplementedError(f"{type(self).__name__} cannot draw targets from its predictive distribution; "
                                  "use a hessfast.losses built-in or implement sample().")

    # -- dtype and device ----------------------------------------------------------------------

    def to(self, dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None) -> "Loss":
        """A copy whose floating tensors (class weights, ...) have ``dtype`` and whose tensors are on ``device``.

        Args:
            dtype: a floating dtype, or None to keep the dtypes.
            device: a device, or None to keep the devices.

        Returns:
            A new loss; ``self`` is unchanged.
        """
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"Loss.to: dtype must be a floating dtype, got {dtype}.")
        clone = copy.copy(self)
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                cast = dtype if (dtype is not None and value.is_floating_point()) else value.dtype
                setattr(clone, name, value.to(device=device if device is not None else value.device, dtype=cast))
            elif isinstance(value, Loss):
                setattr(clone, name, value.to(dtype=dtype, device=device))
        return clone

    def _options(self) -> str:
        return ""

    def __repr__(self) -> str:
        return f"{getattr(self, 'name', type(self).__name__)}({self._options()})"
