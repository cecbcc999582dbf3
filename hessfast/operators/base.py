"""Matrix-free curvature operators: the Hessian and the Generalised Gauss-Newton matrix.

For parameters w in R^P (the model's trainable parameters, flattened in ``named_parameters`` order)
and the empirical risk R(w) = (1/N) sum_i l(f(x_i; w), y_i) (eq. 2 of the paper; eq. 3 for one batch)

    H v = nabla^2 R(w) v                      (Pearlmutter's trick, Section 8)
    G v = (1/N) sum_i J_i^T H_out,i J_i v     (J_i = df(x_i)/dw, H_out,i = d^2 l / df^2)

Products are exact means over all N samples, whatever the batch sizes. Two ways to compute ``H v``:

* ``hvp_mode="reverse"``: double backward. When the autograd graph of the gradient fits in memory
  (``cache_graph``), it is built once and every product is one backward pass through it.
* ``hvp_mode="forward"``: forward-over-reverse, ``torch.func.jvp`` of ``torch.func.grad``.

``hvp_mode="auto"`` times one product of each on the first batch and keeps the faster.
The model is evaluated functionally on copies of its parameters and never modified.
"""
from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from .. import distributed as _distributed
from ..utils import data as _data
from ..utils.memory import available_memory
from ..utils.model_state import check_bn_mode, curvature_mode, model_device, trainable_parameters

CURVATURES = ("hessian", "ggn")
HVP_MODES = ("auto", "reverse", "forward")


def check_curvature(curvature: str) -> str:
    if curvature not in CURVATURES:
        raise ValueError(f"unknown curvature {curvature!r}; choose 'hessian' or 'ggn' (Generalised Gauss-Newton).")
    return curvature


def sum_scale(loss_fn: Callable, batch_size: int) -> float:
    """Factor turning ``loss_fn``'s value on a batch into the batch's *sum* of per-sample losses."""
    reduction = getattr(loss_fn, "reduction", "mean")
    if reduction == "mean":
        return float(batch_size)
    if reduction == "sum":
        return 1.0
    raise ValueError(f"loss_fn has reduction={reduction!r}; hessfast needs a scalar loss: use reduction='mean' "
                     "(the default) or 'sum'.")


class CurvatureOperator:
    """The Hessian or GGN of ``loss_fn(model(inputs), targets)`` as a P x P linear operator.

    Args:
        model: any ``nn.Module``; curvature is with respect to its parameters with ``requires_grad``.
        data: one ``(inputs, targets)`` batch, or an iterable of batches (the mean over all samples).
        curvature: ``"hessian"`` or ``"ggn"``.
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` with mean (default) or sum reduction;
            default ``nn.CrossEntropyLoss()``.
        bn_mode: ``"eval"`` (running statistics) or ``"train"`` (batch statistics, Appendix E).
        dtype: compute dtype (e.g. ``torch.float64`` for exact work); default the model's.
        hvp_mode: ``"auto"``, ``"reverse"`` (double backward) or ``"forward"`` (forward-over-reverse).
        cache_graph: keep the autograd graphs of all batches between products (``"auto"``: when they
            fit in half the free memory, measured from the first batch's saved tensors).
        progress: show a progress bar while the graphs are built.
        distributed: with a torch.distributed process group (``None``: when one is initialised;
            ``True``; a ``ProcessGroup``; ``False``: never) ``data`` is this rank's shard, possibly
            empty, and products are exact means over the samples of all ranks (hessfast.distributed).

    Shapes: ``op @ v`` takes ``v`` of shape (P,) and returns (P,); ``op.matmat(V)`` takes (b, P).
    """

    def __init__(self, model: nn.Module, data: Any, *, curvature: str = "hessian",
                 loss_fn: Optional[Callable] = None, bn_mode: str = "eval",
                 dtype: Optional[torch.dtype] = None, hvp_mode: str = "auto",
                 cache_graph: Any = "auto", progress: bool = False, distributed: Any = None):
        self.curvature = check_curvature(curvature)
        self.bn_mode = check_bn_mode(bn_mode)
        if hvp_mode not in HVP_MODES:
            raise ValueError(f"unknown hvp_mode {hvp_mode!r}; choose one of {HVP_MODES}.")
        if cache_graph not in ("auto", True, False):
            raise ValueError(f"cache_graph must be 'auto', True or False, got {cache_graph!r}.")
        self.model = model
        self.loss_fn = nn.CrossEntropyLoss() if loss_fn is None else loss_fn
        if not callable(self.loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(outputs, targets), got {type(loss_fn).__name__}.")
        trainable = trainable_parameters(model)
        self.device = model_device(model)
        first = next(iter(trainable.values()))
        self.dtype = dtype if dtype is not None else first.dtype
        if not self.dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point dtype, got {self.dtype}.")
        self.progress = progress

        self._names = list(trainable)
        self._shapes = [p.shape for p in trainable.values()]
        self._numels = [p.numel() for p in trainable.values()]
        self.P = int(sum(self._numels))
        self._params = tuple(p.detach().to(self.dtype).clone() for p in trainable.values())
        cast = (lambda t: t.detach().to(self.dtype)) if dtype is not None else (lambda t: t.detach())
        self._frozen = {n: cast(p) if p.is_floating_point() else p.detach()
                        for n, p in model.named_parameters() if not p.requires_grad}
        self._frozen.update({n: cast(b) if b.is_floating_point() else b for n, b in model.named_buffers()})

        self._single = _data.is_single_batch(data)
        if not self._single and isinstance(data, Iterator):
            data = list(data)  # a one-shot iterator: keep its batches so every product sees the same data
        self._data = data
        self._cache = None
        self._vmap_ok = True
        self.N = 0
        self._dist = _distributed.context(distributed)
        if self._dist is None:
            self._build(cache_graph, hvp_mode)
        else:
            self._dist.build_operator(self, cache_graph, hvp_mode)

    # ------------------------------------------------------------------ functional model and loss
    def _forward(self, params: tuple, inputs: Any) -> torch.Tensor:
        state = dict(zip(self._names, params))
        state.update(self._frozen)
        return _data.call_model(lambda *a, **k: functional_call(self.model, state, a, k), inputs)

    def _batch_loss(self, params: tuple, batch) -> torch.Tensor:
        """Sum of the per-sample losses of one batch (the caller divides the total by N)."""
        inputs, targets = batch
        out = self._forward(params, inputs)
        return self.loss_fn(out, targets) * sum_scale(self.loss_fn, _data.batch_size(batch))

    def _batches(self):
        for i, batch in enumerate(_data.iter_batches(self._data)):
            yield _data.prepare_batch(batch, self.device, self.dtype, i)

    # ------------------------------------------------------------------ construction
    def _leaf_params(self) -> tuple:
        return tuple(p.detach().requires_grad_(True) for p in self._params)

    def _graph(self, batch, params: Optional[tuple] = None) -> dict:
        """Autograd graph of one batch from which every product is a backward pass."""
        params = self._leaf_params() if params is None else params
        if self.curvature == "hessian":
            loss = self._batch_loss(params, batch)
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            return {"params": params, "grads": grads}
        inputs, targets = batch
        out = self._forward(params, inputs)
        out_d = out.detach().requires_grad_(True)
        loss = self.loss_fn(out_d, targets) * sum_scale(self.loss_fn, _data.batch_size(batch))
        (grad_out,) = torch.autograd.grad(loss, out_d, create_graph=True)
        # Double-vjp trick: jtu = J^T u is linear in u, so d(jtu)/du^T v = J v without forward mode.
        u = torch.zeros_like(out, requires_grad=True)
        jtu = torch.autograd.grad(out, params, u, create_graph=True, allow_unused=True)
        return {"params": params, "out": [out], "out_d": [out_d], "grad_out": [grad_out], "u": [u], "jtu": jtu}

    @staticmethod
    def _merge(graphs: list) -> dict:
        """One graph for all batches (sharing leaf parameters): a product is then a single backward
        call instead of one per batch. Gradients add up; the GGN's per-batch pieces are listed."""

        def add(a, b):
            return tuple(x if y is None else (y if x is None else x + y) for x, y in zip(a, b))

        merged = dict(graphs[0])
        key = "grads" if "grads" in merged else "jtu"
        for g in graphs[1:]:
            merged[key] = add(merged[key], g[key])
            if key == "jtu":
                for name in ("out", "out_d", "grad_out", "u"):
                    merged[name] = merged[name] + g[name]
        return merged

    def _saved_bytes(self, batch, params: tuple) -> tuple:
        """Build one batch's graph while counting the bytes autograd saves for it."""
        total = [0]
        seen = set()

        def pack(t):
            key = (t.untyped_storage().data_ptr(), t.dtype)
            if key not in seen:
                seen.add(key)
                total[0] += t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            graph = self._graph(batch, params)
        return graph, total[0]

    def _build(self, cache_graph, hvp_mode: str) -> None:
        from tqdm.auto import tqdm

        with curvature_mode(self.model, self.bn_mode):
            batches = self._batches()
            first = next(batches)
            self.N = _data.batch_size(first)
            leaves = self._leaf_params()
            graph, nbytes = self._saved_bytes(first, leaves)
            n_batches = 1 if self._single else (len(self._data) if hasattr(self._data, "__len__") else None)
            estimate = nbytes * (n_batches or 1)
            fits = estimate <= 0.5 * available_memory(self.device)
            self.graph_bytes_estimate = estimate
            self.cached = hvp_mode != "forward" and (cache_graph is True or (cache_graph == "auto" and fits))
            graphs = [graph] if self.cached else None
            bar = tqdm(batches, desc="hessfast: data", total=(n_batches - 1) if n_batches else None,
                       disable=not self.progress, leave=False)
            for batch in bar:
                self.N += _data.batch_size(batch)
                if graphs is not None:
                    graphs.append(self._graph(batch, leaves))
            self.hvp_mode = hvp_mode if hvp_mode != "auto" else self._fastest_mode(first, graph if self.cached else None)
            del graph
            self._cache = self._merge(graphs) if graphs is not None and self.hvp_mode == "reverse" else None
            self.cached = self._cache is not None
            self.N_local = self.N  # samples of this process (distributed runs sum N over processes)

    def _fastest_mode(self, batch, graph: Optional[dict]) -> str:
        """Time one product per mode on the first batch (best of three) and return the faster mode.

        Reverse mode with a cached graph is kept unless forward-over-reverse is clearly (20%) faster:
        timings on a busy machine are noisy, and dropping the cache costs a forward pass per product.
        """
        v = tuple(torch.randn_like(p) for p in self._params)
        times = {}
        for mode in ("reverse", "forward"):
            best = math.inf
            for _ in range(3):
                start = time.perf_counter()
                try:
                    self._batch_product(batch, v, mode, graph if mode == "reverse" else None)
                except RuntimeError:  # e.g. a derivative formula without forward-mode support
                    break
                best = min(best, time.perf_counter() - start)
            times[mode] = best
        self.mode_timings = times
        return "forward" if times["forward"] < 0.8 * times["reverse"] else "reverse"

    # ------------------------------------------------------------------ products
    def _split(self, v: torch.Tensor) -> tuple:
        return tuple(t.view(*v.shape[:-1], *s) for t, s in zip(v.split(self._numels, dim=-1), self._shapes))

    def _flat(self, parts, batched: bool = False) -> torch.Tensor:
        if batched:
            return torch.cat([p.reshape(p.shape[0], -1) for p in parts], dim=1)
        return torch.cat([p.reshape(-1) for p in parts])

    def _batch_product(self, batch, v: tuple, mode: str, graph: Optional[dict], batched: bool = False) -> tuple:
        """Sum over the batch's samples of the per-sample curvature times v (tuple of parameter shapes)."""
        if mode == "reverse":
            graph = graph if graph is not None else self._graph(batch)
            if self.curvature == "hessian":
                keep = [i for i, g in enumerate(graph["grads"]) if g is not None and g.requires_grad]
                if not keep:  # the loss is linear in the parameters
                    return tuple(None for _ in v)
                return torch.autograd.grad([graph["grads"][i] for i in keep], graph["params"],
                                           [v[i] for i in keep], retain_graph=True, allow_unused=True,
                                           is_grads_batched=batched)
            keep = [i for i, g in enumerate(graph["jtu"]) if g is not None]
            jv = torch.autograd.grad([graph["jtu"][i] for i in keep], graph["u"], [v[i] for i in keep],
                                     retain_graph=True, is_grads_batched=batched)
            hjv = torch.autograd.grad(graph["grad_out"], graph["out_d"], jv, retain_graph=True,
                                      is_grads_batched=batched)
            return torch.autograd.grad(graph["out"], graph["params"], hjv, retain_graph=True,
                                       allow_unused=True, is_grads_batched=batched)
        # forward-over-reverse with torch.func
        if batched:
            return self._batched_forward(batch, v)
        params = tuple(p.detach() for p in self._params)
        if self.curvature == "hessian":
            grad_fn = torch.func.grad(lambda p: self._batch_loss(p, batch))
            return torch.func.jvp(grad_fn, (params,), (v,))[1]
        inputs, targets = batch
        scale = sum_scale(self.loss_fn, _data.batch_size(batch))
        out, jv = torch.func.jvp(lambda p: self._forward(p, inputs), (params,), (v,))
        grad_out = torch.func.grad(lambda o: self.loss_fn(o, targets) * scale)
        _, hjv = torch.func.jvp(grad_out, (out.detach(),), (jv,))
        _, vjp_fn = torch.func.vjp(lambda p: self._forward(p, inputs), params)
        return vjp_fn(hjv)[0]

    def _batched_forward(self, batch, v: tuple) -> tuple:
        """b forward-over-reverse products sharing the primal pass (vmap over tangents).

        Some operators' derivative formulas are not vmap-compatible (e.g. mse_loss under
        vmap(jvp(grad)) on torch 2.13); those fall back to one product per vector.
        """
        if self._vmap_ok:
            try:
                return torch.func.vmap(lambda *t: self._batch_product(batch, t, "forward", None))(*v)
            except RuntimeError:
                self._vmap_ok = False
        rows = [self._batch_product(batch, tuple(t[i] for t in v), "forward", None) for i in range(v[0].shape[0])]
        return tuple(torch.stack(parts) for parts in zip(*rows))

    def _apply(self, V: torch.Tensor, batched: bool) -> torch.Tensor:
        if self._dist is None:
            return self._local_sum(V, batched).div_(self.N)
        total = self._dist.all_reduce_sum(lambda: self._local_sum(V, batched), V, "computing a curvature product")
        return total.div_(self.N)

    def _local_sum(self, V: torch.Tensor, batched: bool) -> torch.Tensor:
        """Sum over this process's samples of the per-sample products (zeros for an empty shard)."""
        if self.N_local == 0:  # an empty data shard of a distributed run
            return torch.zeros_like(V)
        v = self._split(V)
        total = None
        with curvature_mode(self.model, self.bn_mode):
            pairs = [(None, self._cache)] if self._cache is not None else ((b, None) for b in self._batches())
            for batch, graph in pairs:
                try:
                    parts = self._batch_product(batch, v, self.hvp_mode, graph, batched)
                except RuntimeError as err:
                    if self.hvp_mode != "forward":
                        raise
                    raise RuntimeError(f"forward-over-reverse failed for this model or loss ({err}); "
                                       "use hvp_mode='reverse' (double backward).") from err
                parts = [torch.zeros_like(vi) if p is None else p for vi, p in zip(v, parts)]
                flat = self._flat(parts, batched)
                total = flat if total is None else total.add_(flat)
        return torch.zeros_like(V) if total is None else total

    def _check_vector(self, v: torch.Tensor, batched: bool) -> torch.Tensor:
        if not isinstance(v, torch.Tensor):
            v = torch.as_tensor(np.asarray(v), device=self.device)
        want = "(b, P)" if batched else "(P,)"
        if v.dim() != (2 if batched else 1) or v.shape[-1] != self.P:
            raise ValueError(f"expected a vector of shape {want} with P={self.P}, got {tuple(v.shape)}.")
        if v.device != self.device:
            raise ValueError(f"the vector is on {v.device} but the operator on {self.device}.")
        return v.to(self.dtype)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """Curvature-vector product. ``v``: (P,) -> (P,)."""
        return self._apply(self._check_vector(v, False), batched=False)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """Products with b vectors at once. ``V``: (b, P) -> (b, P).

        Without a cached graph the b products share one forward pass (vmap over tangents), which
        bench/bench_block_hvp.py measured 1.2-2.8x faster than b single products on CPU. Through a
        cached graph there is no forward pass left to share and the batched backward was slower
        (0.6-0.85x), so there the products run one after the other.
        """
        V = self._check_vector(V, True)
        if self.cached:
            return torch.stack([self._apply(v, batched=False) for v in V])
        return self._apply(V, batched=True)

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        return self.matvec(v) if v.dim() == 1 else self.matmat(v.T).T

    @property
    def shape(self) -> tuple:
        return (self.P, self.P)

    def to_dense(self, chunk: int = 64) -> torch.Tensor:
        """The full P x P matrix (for small models and tests)."""
        eye = torch.eye(self.P, dtype=self.dtype, device=self.device)
        return torch.cat([self.matmat(eye[i:i + chunk]) for i in range(0, self.P, chunk)])

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 numpy in and out), e.g. for ``eigsh``."""
        from scipy.sparse.linalg import LinearOperator

        def mv(x):
            x = torch.as_tensor(np.asarray(x).reshape(-1), dtype=self.dtype, device=self.device)
            return self.matvec(x).detach().cpu().double().numpy()

        def mm(X):
            X = torch.as_tensor(np.asarray(X), dtype=self.dtype, device=self.device)
            return self.matmat(X.T.contiguous()).T.detach().cpu().double().numpy()

        return LinearOperator(self.shape, matvec=mv, rmatvec=mv, matmat=mm, dtype=np.float64)

    def parameter_vector(self) -> torch.Tensor:
        """The point w (P,) at which the curvature is evaluated."""
        return self._flat(self._params)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(curvature={self.curvature!r}, P={self.P}, N={self.N}, dtype={self.dtype}, "
                f"hvp_mode={self.hvp_mode!r}, cached={self.cached}, bn_mode={self.bn_mode!r})")


class HessianOperator(CurvatureOperator):
    """The Hessian of the mean loss; see :class:`CurvatureOperator`."""

    def __init__(self, model: nn.Module, data: Any, **kwargs):
        super().__init__(model, data, curvature="hessian", **kwargs)


class GGNOperator(CurvatureOperator):
    """The Generalised Gauss-Newton matrix G = (1/N) sum_i J_i^T H_out,i J_i; see :class:`CurvatureOperator`."""

    def __init__(self, model: nn.Module, data: Any, **kwargs):
        super().__init__(model, data, curvature="ggn", **kwargs)
