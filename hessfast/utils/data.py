"""Data handling shared by every curvature computation.

hessfast accepts either one ``(inputs, targets)`` batch (the *batch* Hessian, eq. 3 of the paper) or
any iterable of such batches, e.g. a ``DataLoader`` (the *empirical* Hessian of the mean loss over all
N samples, eq. 2). ``inputs`` may be a tensor (``model(x)``), a tuple/list of tensors
(``model(*x)``) or a dict of tensors (``model(**x)``); ``targets`` is a tensor whose first dimension
counts the samples.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Iterator, Tuple

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
    """True if ``data`` is one ``(inputs, targets)`` pair rather than an iterable of batches."""
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[1], torch.Tensor)
        and _is_tensor_tree(data[0])
    )


def check_batch(batch: Any, index: int) -> Batch:
    """Validate one batch and return it as a tuple ``(inputs, targets)``."""
    where = f"batch {index} of the data"
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        kind = type(batch).__name__
        size = f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""
        raise TypeError(
            f"{where} is a {kind}{size}; hessfast expects (inputs, targets) pairs. Wrap your data so that "
            "each batch is a 2-tuple, e.g. DataLoader(TensorDataset(x, y)) or (x, y) for a single batch."
        )
    inputs, targets = batch
    if not _is_tensor_tree(inputs):
        raise TypeError(
            f"{where}: inputs must be a tensor, a tuple/list of tensors or a dict of tensors, "
            f"got {type(inputs).__name__}."
        )
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"{where}: targets must be a tensor, got {type(targets).__name__}.")
    if targets.dim() == 0 or targets.shape[0] == 0:
        raise ValueError(f"{where} holds no samples (targets of shape {tuple(targets.shape)}).")
    return inputs, targets


def iter_batches(data: Any) -> Iterator[Batch]:
    """Yield validated batches of ``data`` (one batch or an iterable of batches)."""
    if is_single_batch(data):
        yield check_batch(data, 0)
        return
    if isinstance(data, torch.Tensor) or not isinstance(data, Iterable):
        raise TypeError(
            f"data must be an (inputs, targets) batch or an iterable of such batches (e.g. a DataLoader), "
            f"got {type(data).__name__}."
        )
    count = 0
    for count, batch in enumerate(data, start=1):
        yield check_batch(batch, count - 1)
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


_map_tensors = map_tensors  # alias: hessfast.prediction reads this name


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


def count_samples(data: Any) -> int:
    """Number of samples in ``data`` (one batch or an iterable of batches); one pass over the batches."""
    return sum(batch_size(b) for b in iter_batches(data))


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
