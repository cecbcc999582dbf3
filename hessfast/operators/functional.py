"""The model and its loss as a pure function of the trainable parameters: the core every operator composes.

For parameters w in R^P (the model's trainable parameters, flattened in ``named_parameters`` order)
and a data set in batches b the loss is the mean over all its loss terms (``hessfast.losses``):

    R(w) = (sum_b s_b(w)) / C,    C = sum_b c_b,

with ``s_b`` the sum of batch b's loss terms and ``c_b`` their number (tokens not ignored, or the
weighted count of a class-weighted loss); for one term per sample C = N and R is eq. 2 of the paper
(eq. 3 for one batch). Writing ``l_i = (N / C) s_i`` for sample i's share, R = (1/N) sum_i l_i as in
the paper, and the operators' per-sample sums are sums of the l_i (:attr:`ModelFunction.term_scale`
is N / C). :class:`ModelFunction` evaluates the model and the per-batch sums ``s_b`` at any parameters
(``torch.func.functional_call`` on copies, so the model itself is never written), reads, splits and
checks the batches, converts between flat (P,) vectors and parameter-shaped tensors, and carries the
reduction hook of a distributed run. The curvature operators (:mod:`.base`), the per-sample products
of the Hessian variance (:mod:`.per_sample`) and the ghost-norm route (:mod:`.ghost`) are built on it.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.func import functional_call

from .. import distributed as _distributed
from ..losses import CallableLoss, as_loss
from ..utils import data as _data
from ..utils.model_state import check_bn_mode, compute_dtype, model_device, trainable_parameters


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
    """``model`` and its loss on ``data`` as functions of the trainable parameters.

    Args:
        model: any ``nn.Module``; the parameters with ``requires_grad`` are the variables w (a tied
            parameter, e.g. shared input and output embeddings, counts once).
        data: one batch or an iterable of batches (a one-shot iterator is read into a list, so every
            pass sees the same batches); a batch is an ``(inputs, targets)`` pair or, for the built-in
            losses, a dict with a ``"labels"`` entry.
        loss_fn: a :class:`hessfast.losses.Loss`, or a plain ``loss_fn(outputs, targets) -> scalar``
            with mean (default) or sum reduction (:func:`hessfast.losses.as_loss`); default
            :func:`hessfast.losses.cross_entropy`. It is cast to the compute dtype and device.
        bn_mode: ``"eval"`` or ``"train"`` (Appendix E); applied by the caller with
            :func:`hessfast.utils.model_state.curvature_mode` around every evaluation.
        dtype: compute dtype; default the model's (its first trainable parameter's), float32 for a
            bfloat16 or float16 model, which is evaluated on a float32 copy.
        distributed: as in :func:`hessfast.distributed.context`; ``False`` (default) for one process.

    Attributes:
        model, loss_fn (what the caller passed), loss (the :class:`hessfast.losses.Loss` in use),
        bn_mode, dtype, device, data, single (``data`` is one batch), names / shapes / numels (of the
        P trainable parameters, in order), P, params (tuple of detached copies in ``dtype``: the point
        w), frozen (the other parameters and the buffers, by name), dist (the
        :class:`hessfast.distributed.DistContext` or None), term_scale (N / C once the operator has
        counted the data; 1.0 before), pass_check (:class:`hessfast.utils.data.PassCheck`).
    """

    def __init__(self, model: nn.Module, data: Any, *, loss_fn: Optional[Callable] = None, bn_mode: str = "eval",
                 dtype: Optional[torch.dtype] = None, distributed: Any = False):
        self.bn_mode = check_bn_mode(bn_mode)
        self.model = model
        trainable = trainable_parameters(model)
        self.device = model_device(model)
        model_dtype = next(iter(trainable.values())).dtype
        self.dtype = compute_dtype(model_dtype, dtype)
        self.loss_fn = loss_fn
        self.loss = as_loss(loss_fn).to(dtype=self.dtype, device=self.device)
        self.names = list(trainable)
        self.shapes = [p.shape for p in trainable.values()]
        self.numels = [p.numel() for p in trainable.values()]
        self.P = int(sum(self.numels))
        self.params = tuple(p.detach().to(self.dtype).clone() for p in trainable.values())
        # an explicit dtype casts the frozen floating tensors too, so that the forward pass runs in it;
        # without one, only half-precision tensors are widened (with the parameters)
        def cast(t: torch.Tensor) -> torch.Tensor:
            t = t.detach()
            if t.is_floating_point() and (dtype is not None or t.dtype in (torch.float16, torch.bfloat16)):
                return t.to(self.dtype)
            return t

        self.frozen = {n: cast(p) for n, p in model.named_parameters() if not p.requires_grad}
        self.frozen.update({n: cast(b) for n, b in model.named_buffers()})
        self.single = _data.is_single_batch(data)
        if not self.single and isinstance(data, Iterator):
            data = list(data)
        self.data = data
        self.dist = _distributed.context(distributed)
        self.term_scale = 1.0
        self.pass_check = _data.PassCheck()

    # ------------------------------------------------------------------ evaluation
    def model_output(self, params: tuple, inputs: Any) -> Any:
        """Whatever the model returns at ``params`` (a tensor, tuple, dict or ``ModelOutput``)."""
        state = dict(zip(self.names, params))
        state.update(self.frozen)
        return _data.call_model(lambda *a, **k: functional_call(self.model, state, a, k), inputs)

    def forward(self, params: tuple, inputs: Any) -> torch.Tensor:
        """The outputs f(inputs; params) the loss acts on: the logits the loss takes from the model's
        output (the output itself when it is a tensor); ``params`` a tuple shaped like :attr:`params`."""
        return self.loss.logits(self.model_output(params, inputs))

    def output_loss(self, outputs: torch.Tensor, batch) -> torch.Tensor:
        """``s_b``: the sum of the batch's loss terms, from the outputs :meth:`forward` returns."""
        return self.loss.sum_and_count(outputs, batch[1])[0]

    def batch_loss(self, params: tuple, batch) -> torch.Tensor:
        """``s_b(params)``, a scalar (the operators divide the totals by C, via N and :attr:`term_scale`)."""
        return self.output_loss(self.forward(params, batch[0]), batch)

    def term_count(self, batch, run: bool = False) -> torch.Tensor:
        """``c_b``: the number (or weighted count) of the batch's loss terms, a float64 scalar tensor.

        One forward pass without gradients (the count never depends on the outputs' values, but a
        loss may need their shape); a plain callable loss counts the samples without one unless
        ``run`` (which also checks that the model and loss run on the batch).
        """
        if isinstance(self.loss, CallableLoss) and not run:
            return torch.tensor(float(_data.batch_size(batch)), dtype=torch.float64, device=self.device)
        with torch.no_grad():
            return self.loss.sum_and_count(self.forward(self.params, batch[0]), batch[1])[1].double()

    # ------------------------------------------------------------------ data
    def batches(self) -> Iterator:
        """The validated ``(inputs, targets)`` batches of the data, on the model's device, floating tensors
        in ``dtype``; batches that differ from the first complete pass raise (:attr:`pass_check`)."""
        check = None if self.single else self.pass_check
        count = 0
        for i, batch in enumerate(_data.iter_batches(self.data, self.loss.split)):
            batch = _data.prepare_batch(batch, self.device, self.dtype, i)
            if check is not None:
                check.see(i, batch)
            count = i + 1
            yield batch
        if check is not None:
            check.finish(count)

    def num_batches(self) -> Optional[int]:
        """Number of batches when known without a pass over the data (1 for a single batch), else None."""
        if self.single:
            return 1
        return len(self.data) if hasattr(self.data, "__len__") else None

    def is_empty(self) -> bool:
        """True for an empty data shard of a distributed run (no batch, or one batch of no samples)."""
        if self.single and isinstance(self.data, Mapping):
            targets = self.loss.split(self.data)[1]
            return isinstance(targets, torch.Tensor) and targets.dim() > 0 and targets.shape[0] == 0
        return _data.is_empty(self.data, self.single)

    def count_samples(self) -> int:
        """Samples in the data (one pass over it)."""
        return _data.count_samples(self.data, self.loss.split)

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
