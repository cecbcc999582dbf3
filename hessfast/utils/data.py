"""Data handling shared by every curvature computation.

hessfast accepts either one batch (the *batch* Hessian, eq. 3 of the paper) or any iterable of
batches, e.g. a ``DataLoader`` (the *empirical* Hessian of the mean loss over all samples, eq. 2). A
batch is an ``(inputs, targets)`` pair or, for the built-in losses of :mod:`hessfast.losses`, a Hugging
Face style dict ``{"input_ids": ..., "attention_mask": ..., "labels": ...}``; the loss's ``split``
turns it into ``(inputs, targets)``. ``inputs`` may be a tensor (``model(x)``), a tuple/list of
tensors (``model(*x)``) or a dict of tensors (``model(**x)``); ``targets`` is a tensor whose first
dimension counts the samples.

Products without a cached graph read the data once each, so the batches must not change between
passes: :class:`PassCheck` fingerprints every batch of the first pass and compares later passes.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Callable, Iterator, Optional, Tuple

import torch

Batch = Tuple[Any, torch.Tensor]


def _is_tensor_tree(x: Any) -> bool:
    if isinstance(x, torch.Tensor):
        return True
    if isinstance(x, (tuple, list)):
        return len(x) > 0 and all(isinstance(t, torch.Tensor) for t in x)
    if isinstance(x, Mapping):
        return len(x) > 0 and all(isinstance(t, torch.Tensor) for t in x.values())
    return False


def is_single_batch(data: Any) -> bool:
    """True if ``data`` is one batch rather than an iterable of batches: an ``(inputs, targets)`` pair, or
    one dict of tensors (a Hugging Face batch, e.g. a ``BatchEncoding``)."""
    if isinstance(data, Mapping):
        return _is_tensor_tree(data)
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[1], torch.Tensor)
        and _is_tensor_tree(data[0])
    )


Split = Callable[[Any], Tuple[Any, Any]]


def check_batch(batch: Any, index: int, split: Optional[Split] = None) -> Batch:
    """Validate one batch and return it as a tuple ``(inputs, targets)``.

    Args:
        batch: what the data yielded.
        index: its position, for the error messages.
        split: the loss's ``split`` (e.g. :meth:`hessfast.losses.Loss.split`, which also takes dict
            batches); None accepts ``(inputs, targets)`` pairs only.
    """
    where = f"batch {index} of the data"
    if split is not None:
        try:
            batch = split(batch)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{where}: {err}") from err
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        kind = type(batch).__name__
        size = f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""
        raise TypeError(
            f"{where} is a {kind}{size}; hessfast expects (inputs, targets) pairs. Wrap your data so that "
            "each batch is a 2-tuple, e.g. DataLoader(TensorDataset(x, y)) or (x, y) for a single batch."
        )
    inputs, targets = batch
    if not _is_tensor_tree(inputs):
        odd = ""
        if isinstance(inputs, Mapping):
            odd = "; not tensors: " + ", ".join(f"{k!r} ({type(v).__name__})" for k, v in inputs.items()
                                                if not isinstance(v, torch.Tensor))
        raise TypeError(
            f"{where}: inputs must be a tensor, a tuple/list of tensors or a dict of tensors, "
            f"got {type(inputs).__name__}{odd}."
        )
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"{where}: targets must be a tensor, got {type(targets).__name__}.")
    if targets.dim() == 0 or targets.shape[0] == 0:
        raise ValueError(f"{where} holds no samples (targets of shape {tuple(targets.shape)}).")
    return inputs, targets


def iter_batches(data: Any, split: Optional[Split] = None) -> Iterator[Batch]:
    """Yield validated ``(inputs, targets)`` batches of ``data`` (one batch or an iterable of batches);
    ``split`` as in :func:`check_batch`."""
    if is_single_batch(data):
        yield check_batch(data, 0, split)
        return
    if isinstance(data, torch.Tensor) or not isinstance(data, Iterable):
        raise TypeError(
            f"data must be an (inputs, targets) batch or an iterable of such batches (e.g. a DataLoader), "
            f"got {type(data).__name__}."
        )
    count = 0
    for count, batch in enumerate(data, start=1):
        yield check_batch(batch, count - 1, split)
    if count == 0:
        raise ValueError("the data loader is empty: it yielded no batches. Check its dataset and drop_last.")


def batch_size(batch: Batch) -> int:
    """Number of samples in a batch (first dimension of the targets)."""
    return int(batch[1].shape[0])


def map_tensors(x: Any, fn) -> Any:
    """``fn`` applied to every tensor of ``x`` (a tensor, a tuple/list or a dict of tensors), same structure."""
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, Mapping):
        return {k: fn(v) for k, v in x.items()}
    return type(x)(fn(v) for v in x)



def tensors_of(x: Any) -> list:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, Mapping):
        return list(x.values())
    return list(x)


def prepare_batch(batch: Batch, device: torch.device, dtype: torch.dtype | None, index: int) -> Batch:
    """Check the batch is on the model's device; cast floating tensors to ``dtype`` when given."""
    inputs, targets = batch
    for t in tensors_of(inputs) + [targets]:
        if t.device != device:
            raise ValueError(
                f"batch {index} is on {t.device} but the model's parameters are on {device}; "
                f"move the data (or the model) so that both are on the same device."
            )

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    return map_tensors(inputs, cast), cast(targets)


def call_model(forward, inputs: Any) -> torch.Tensor:
    """Call ``forward`` on inputs that may be a tensor, a tuple/list or a dict."""
    if isinstance(inputs, torch.Tensor):
        return forward(inputs)
    if isinstance(inputs, Mapping):
        return forward(**inputs)
    return forward(*inputs)


def is_empty(data: Any, single: bool) -> bool:
    """True if ``data`` yields no batch, or is one batch of zero samples."""
    if single:  # e.g. shard_tensors(x, y) with fewer samples than ranks
        targets = data[1]
        return targets.dim() > 0 and targets.shape[0] == 0
    try:
        return len(data) == 0
    except TypeError:
        pass
    for _ in data:
        return False
    return True


def count_samples(data: Any, split: Optional[Split] = None) -> int:
    """Number of samples in ``data`` (one batch or an iterable of batches); one pass over the batches."""
    return sum(batch_size(b) for b in iter_batches(data, split))


# ---------------------------------------------------------------------------- regrouping batches
def split_batch(batch: Batch, size: int) -> Iterator[Batch]:
    """The batch in consecutive pieces of at most ``size`` samples (the batch itself if it is small enough)."""
    inputs, targets = batch
    n = batch_size(batch)
    if n <= size:
        yield batch
        return
    for s in range(0, n, size):
        yield map_tensors(inputs, lambda t: t[s:s + size]), targets[s:s + size]


def concat_batches(parts: list) -> Batch | None:
    """One batch from a list of batches of the same structure, or None where they cannot be concatenated
    (inputs whose shapes, dtypes or keys differ, e.g. sequences of different lengths)."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0][0]
    try:
        if isinstance(first, torch.Tensor):
            inputs = torch.cat([p[0] for p in parts])
        elif isinstance(first, Mapping):
            inputs = {k: torch.cat([p[0][k] for p in parts]) for k in first}
        else:
            inputs = type(first)(torch.cat(ts) for ts in zip(*(p[0] for p in parts)))
        return inputs, torch.cat([p[1] for p in parts])
    except (RuntimeError, TypeError, KeyError, ValueError):
        return None


def rechunk(batches, size: int) -> Iterator[Batch]:
    """Batches regrouped into chunks of ``size`` samples (the last may be smaller), samples in order.

    Small batches are merged (fewer, larger calls: per-call Python and autograd overhead is paid once
    per chunk) and large ones split. Batches that cannot be concatenated (:func:`concat_batches`) are
    passed on as they come, split where larger than ``size``.
    """
    buf, count = [], 0

    def flush():
        merged = concat_batches(buf)
        return list(buf) if merged is None else [merged]

    for batch in batches:
        n = batch_size(batch)
        if buf and count + n > size:
            yield from flush()
            buf, count = [], 0
        for part in split_batch(batch, size):
            m = batch_size(part)
            if m == size:
                yield part
            else:
                buf.append(part)
                count += m
    if buf:
        yield from flush()


def select_rows(batch: Batch, rows: torch.Tensor) -> Batch:
    """The samples ``rows`` (an index tensor) of a batch."""
    inputs, targets = batch
    return map_tensors(inputs, lambda t: t[rows.to(t.device)]), targets[rows.to(targets.device)]


# ---------------------------------------------------------------------------- data that must not change
FINGERPRINT_VALUES = 512


def fingerprint(batch: Batch) -> tuple:
    """A cheap summary of a batch that changes when its samples change.

    Per tensor (inputs, then targets): its shape and dtype, and a float64 tensor of two numbers: the
    sum of all its elements and a position-weighted sum of at most :data:`FINGERPRINT_VALUES` evenly
    spaced elements (every element for targets of up to that size). A reshuffled batch has other
    targets or other inputs; random augmentation changes the inputs' sums. Costs one reduction per
    tensor, no copy.
    """
    shapes, sums = [], []
    for t in tensors_of(batch[0]) + [batch[1]]:
        shapes.append((tuple(t.shape), t.dtype))
        flat = t.reshape(-1)
        picked = flat[::max(1, flat.numel() // FINGERPRINT_VALUES)][:FINGERPRINT_VALUES].double()
        ramp = torch.arange(1, picked.numel() + 1, dtype=torch.float64, device=t.device)
        sums.append(torch.stack([flat.sum(dtype=torch.float64), (picked * ramp).sum()]))
    return tuple(shapes), torch.cat(sums)


class PassCheck:
    """Refuses data whose batches change from one pass to the next.

    The first complete pass over the data records each batch's :func:`fingerprint`; every later pass
    compares batch i with the record (bit for bit: a deterministic loader yields identical tensors)
    and its number of batches with the first pass's. A shuffled ``DataLoader``, random augmentation
    or a sampler that draws anew every epoch fails the comparison with a ``ValueError`` that says
    what to do, instead of giving a different matrix at every product.
    """

    def __init__(self):
        self.record: list = []
        self.complete = False

    def see(self, index: int, batch: Batch) -> None:
        """Record (first pass) or compare (later passes) batch ``index``."""
        if not self.complete:
            if index == len(self.record):
                self.record.append(fingerprint(batch))
            return
        if index >= len(self.record):
            raise ValueError(f"the data yielded more batches on this pass than the {len(self.record)} of the first "
                             f"pass. {_CHANGED_FIX}")
        shapes, sums = fingerprint(batch)
        first_shapes, first_sums = self.record[index]
        if shapes != first_shapes or not torch.equal(sums, first_sums):
            raise ValueError(f"batch {index} of the data changed between passes over the data (its inputs or "
                             f"targets differ from the first pass). {_CHANGED_FIX}")

    def finish(self, count: int) -> None:
        """End of a pass of ``count`` batches: the first one completes the record, later ones must match it."""
        if not self.complete:
            self.complete = count == len(self.record)
        elif count != len(self.record):
            raise ValueError(f"the data yielded {count} batches on this pass but {len(self.record)} on the first "
                             f"pass. {_CHANGED_FIX}")


_CHANGED_FIX = ("hessfast reads the data once per product when the graph is not cached, so every pass must "
                "yield the same batches: a shuffled DataLoader (use shuffle=False), random augmentation "
                "(use deterministic transforms) or a sampler that draws anew each epoch gives a different "
                "matrix at every product. Pass a list of fixed batches, or cache_graph=True (one pass).")
