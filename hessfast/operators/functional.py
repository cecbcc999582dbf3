"""The model and its loss as a pure function of the trainable parameters: the core every operator composes.

For parameters w in R^P (the model's trainable parameters, flattened in ``named_parameters`` order)
and data of N samples the empirical risk is R(w) = (1/N) sum_i l(f(x_i; w), y_i) (eq. 2 of the paper;
eq. 3 for one batch). :class:`ModelFunction` evaluates f and the per-batch *sum* of the l_i at any
parameters (``torch.func.functional_call`` on copies, so the model itself is never written), reads
and checks the batches, converts between flat (P,) vectors and parameter-shaped tensors, and carries
the reduction hook of a distributed run. The curvature operators (:mod:`.base`), the per-sample
products of the Hessian variance (:mod:`.per_sample`) and the ghost-norm route (:mod:`.ghost`) are all
built on it.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.func import functional_call

from .. import distributed as _distributed
from ..utils import data as _data
from ..utils.model_state import check_bn_mode, model_device, trainable_parameters


def sum_scale(loss_fn: Callable, batch_size: int) -> float:
    """Factor turning ``loss_fn``'s value on a batch into the batch's *sum* of per-sample losses."""
    reduction = getattr(loss_fn, "reduction", "mean")
    if reduction == "mean":
        return float(batch_size)
    if reduction == "sum":
        return 1.0
    raise ValueError(f"loss_fn has reduction={reduction!r}; hessfast needs a scalar loss: use reduction='mean' "
                     "(the default) or 'sum'.")


def add_parts(a: tuple, b: tuple) -> tuple:
    """Entry-wise sum of two tuples of parameter-shaped tensors, None standing for zero."""
    return tuple(x if y is None else (y if x is None else x + y) for x, y in zip(a, b))


class ModelFunction:
    """``model`` and ``loss_fn`` on ``data`` as functions of the trainable parameters.

    Args:
        model: any ``nn.Module``; the parameters with ``requires_grad`` are the variables w.
        data: one ``(inputs, targets)`` batch or an iterable of batches (a one-shot iterator is
            read into a list, so every pass sees the same batches).
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` with mean (default) or sum reduction;
            default ``nn.CrossEntropyLoss()``.
        bn_mode: ``"eval"`` or ``"train"`` (Appendix E); applied by the caller with
            :func:`hessfast.utils.model_state.curvature_mode` around every evaluation.
        dtype: compute dtype; default the dtype of the first trainable parameter.
        distributed: as in :func:`hessfast.distributed.context`; ``False`` (default) for one process.

    Attributes:
        model, loss_fn, bn_mode, dtype, device, data, single (``data`` is one batch),
        names / shapes / numels (of the P trainable parameters, in order), P,
        params (tuple of detached copies in ``dtype``: the point w), frozen (the other parameters
        and the buffers, by name), dist (:class:`hessfast.distributed.DistContext` or None).
    """

    def __init__(self, model: nn.Module, data: Any, *, loss_fn: Optional[Callable] = None, bn_mode: str = "eval",
                 dtype: Optional[torch.dtype] = None, distributed: Any = False):
        self.bn_mode = check_bn_mode(bn_mode)
        self.model = model
        self.loss_fn = nn.CrossEntropyLoss() if loss_fn is None else loss_fn
        if not callable(self.loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(outputs, targets), got {type(loss_fn).__name__}.")
        trainable = trainable_parameters(model)
        self.device = model_device(model)
        self.dtype = dtype if dtype is not None else next(iter(trainable.values())).dtype
        if not self.dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point dtype, got {self.dtype}.")
        self.names = list(trainable)
        self.shapes = [p.shape for p in trainable.values()]
        self.numels = [p.numel() for p in trainable.values()]
        self.P = int(sum(self.numels))
        self.params = tuple(p.detach().to(self.dtype).clone() for p in trainable.values())
        # an explicit dtype casts the frozen floating tensors too, so that the forward pass runs in it
        cast = (lambda t: t.detach().to(self.dtype)) if dtype is not None else (lambda t: t.detach())
        self.frozen = {n: cast(p) if p.is_floating_point() else p.detach()
                       for n, p in model.named_parameters() if not p.requires_grad}
        self.frozen.update({n: cast(b) if b.is_floating_point() else b for n, b in model.named_buffers()})
        self.single = _data.is_single_batch(data)
        if not self.single and isinstance(data, Iterator):
            data = list(data)
        self.data = data
        self.dist = _distributed.context(distributed)

    # ------------------------------------------------------------------ evaluation
    def forward(self, params: tuple, inputs: Any) -> torch.Tensor:
        """The model's outputs f(inputs; params); ``params`` a tuple shaped like :attr:`params`."""
        state = dict(zip(self.names, params))
        state.update(self.frozen)
        return _data.call_model(lambda *a, **k: functional_call(self.model, state, a, k), inputs)

    def output_loss(self, outputs: torch.Tensor, batch) -> torch.Tensor:
        """The sum over the batch's samples of the per-sample losses, from the model's outputs."""
        return self.loss_fn(outputs, batch[1]) * sum_scale(self.loss_fn, _data.batch_size(batch))

    def batch_loss(self, params: tuple, batch) -> torch.Tensor:
        """``sum_{i in batch} l(f(x_i; params), y_i)``, a scalar (the caller divides totals by N)."""
        return self.output_loss(self.forward(params, batch[0]), batch)

    # ------------------------------------------------------------------ data
    def batches(self) -> Iterator:
        """The validated batches of the data, on the model's device, floating tensors in ``dtype``."""
        for i, batch in enumerate(_data.iter_batches(self.data)):
            yield _data.prepare_batch(batch, self.device, self.dtype, i)

    def num_batches(self) -> Optional[int]:
        """Number of batches when known without a pass over the data (1 for a single batch), else None."""
        if self.single:
            return 1
        return len(self.data) if hasattr(self.data, "__len__") else None

    def is_empty(self) -> bool:
        """True for an empty data shard of a distributed run (no batch, or one batch of no samples)."""
        return _data.is_empty(self.data, self.single)

    def count_samples(self) -> int:
        """Samples in the data (one pass over it)."""
        return _data.count_samples(self.data)

    # ------------------------------------------------------------------ parameter layout
    def flatten(self, parts, lead: tuple = ()) -> torch.Tensor:
        """Parameter-shaped tensors (``lead + shape`` each; None for zeros) as one ``lead + (P,)`` tensor."""
        lead = tuple(lead)
        return torch.cat([(torch.zeros(lead + tuple(s), dtype=self.dtype, device=self.device) if p is None else p)
                          .reshape(*lead, -1) for p, s in zip(parts, self.shapes)], dim=-1)

    def unflatten(self, v: torch.Tensor) -> tuple:
        """A ``(..., P)`` tensor as a tuple of views of shape ``(..., *shape)``, one per parameter."""
        return tuple(t.view(*v.shape[:-1], *s) for t, s in zip(v.split(self.numels, dim=-1), self.shapes))

    def unflatten_dict(self, v: torch.Tensor) -> dict:
        """:meth:`unflatten` keyed by parameter name: ``{name: view of shape (..., *shape)}``."""
        return dict(zip(self.names, self.unflatten(v)))

    def leaf_params(self) -> tuple:
        """Fresh autograd leaves (``requires_grad=True``) sharing storage with :attr:`params`."""
        return tuple(p.detach().requires_grad_(True) for p in self.params)

    def parameter_vector(self) -> torch.Tensor:
        """The point w, shape (P,)."""
        return self.flatten(self.params)

    def fingerprint(self) -> tuple:
        """``(sum w, sum w^2)`` in float64: cheap evidence that two processes hold the same weights."""
        w = self.parameter_vector().double()
        return float(w.sum()), float(w.square().sum())

    # ------------------------------------------------------------------ distributed reduction
    def all_reduce_sum(self, local: Callable[[], torch.Tensor], like: torch.Tensor, what: str) -> torch.Tensor:
        """``local()`` summed over the ranks of :attr:`dist` (one flagged all-reduce), or ``local()`` alone.

        ``like`` gives the shape and dtype of the result; ``what`` names the work in the error that
        every rank raises when one rank's ``local()`` raised.
        """
        if self.dist is None:
            return local()
        return self.dist.all_reduce_sum(local, like, what)
