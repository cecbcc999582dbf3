"""Matrix-free curvature operators: the base class that owns the data loop, and the curvature registry.

For parameters w in R^P and the empirical risk R(w) = (1/N) sum_i l(f(x_i; w), y_i) (eq. 2 of the
paper; eq. 3 for one batch) a curvature operator is C = (1/N) sum_i C_i, with C_i the curvature of
sample i's loss: the Hessian (:mod:`.hessian`) or the Generalised Gauss-Newton matrix (:mod:`.ggn`).
:class:`CurvatureOperator` sums a curvature's per-batch products over the data, caches the autograd
graphs, divides by N, all-reduces over the ranks of a distributed run and checks every input; a
curvature only says how one batch's product is computed.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..utils import data as _data
from ..utils.memory import available_memory
from ..utils.model_state import curvature_mode
from .functional import ModelFunction

HVP_MODES = ("auto", "reverse", "forward")
_REGISTRY: dict = {}
_OOM = getattr(torch, "OutOfMemoryError", ())


def curvatures() -> tuple:
    """The names of the registered curvatures (each a :class:`CurvatureOperator` subclass)."""
    return tuple(_REGISTRY)


def check_curvature(curvature: str) -> str:
    """``curvature`` if it names a registered curvature, else a ValueError listing them."""
    if curvature not in _REGISTRY:
        names = " or ".join(repr(n) for n in _REGISTRY)
        raise ValueError(f"unknown curvature {curvature!r}; choose {names} (Generalised Gauss-Newton: 'ggn').")
    return curvature


def operator_class(curvature: str) -> type:
    """The :class:`CurvatureOperator` subclass registered under ``curvature`` (e.g. ``"ggn"``)."""
    return _REGISTRY[check_curvature(curvature)]


class CurvatureOperator:
    """A curvature of ``loss_fn(model(inputs), targets)`` over ``data`` as a P x P linear operator.

    ``CurvatureOperator(model, data, curvature="hessian" | "ggn", ...)`` returns an instance of the
    registered subclass (:class:`~hessfast.operators.HessianOperator`,
    :class:`~hessfast.operators.GGNOperator`); the subclasses take the same arguments without
    ``curvature``. Products are exact means over all N samples, whatever the batch sizes; the model
    is evaluated functionally (:class:`~hessfast.operators.functional.ModelFunction`) and never modified.

    Args:
        model: any ``nn.Module``; curvature is with respect to its parameters with ``requires_grad``.
        data: one ``(inputs, targets)`` batch, or an iterable of batches (the mean over all samples).
        curvature: a registered name (:func:`curvatures`); ``None`` for the class's own.
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` with mean (default) or sum reduction;
            default ``nn.CrossEntropyLoss()``.
        bn_mode: ``"eval"`` (running statistics) or ``"train"`` (batch statistics, Appendix E).
        dtype: compute dtype (e.g. ``torch.float64`` for exact work); default the model's.
        hvp_mode: ``"reverse"`` (double backward through the batch's graph), ``"forward"``
            (forward-over-reverse with ``torch.func``) or ``"auto"``: reverse whenever the curvature
            has a graph product, whether the graph is cached or not, and forward only for a curvature
            without one. The rule is fixed, so the same call gives the same digits on the same
            machine; it follows measurements on CPU (bench/RESULTS.md: a product was 1.5-2.4x a
            gradient through the cached graph, 3.2-3.5x reverse uncached and 4-6x forward-over-reverse)
            and no workload is known where forward-over-reverse wins. :attr:`hvp_mode` is what runs.
        cache_graph: keep the autograd graphs of all batches between products, so that a product is
            one backward pass (``"auto"``: when they fit in half the free memory, estimated from the
            first batch's saved tensors; only in reverse mode).
        progress: show a progress bar while the graphs are built.
        distributed: with a torch.distributed process group (``None``: when one is initialised;
            ``True``; a ``ProcessGroup``; ``False``: never) ``data`` is this rank's shard, possibly
            empty, and products are exact means over the samples of all ranks (hessfast.distributed).

    Shapes: ``op @ v`` and :meth:`matvec` take ``v`` of shape (P,) and return (P,); :meth:`matmat`
    takes and returns (b, P).

    A new curvature is one subclass that sets the class attribute ``curvature = "<name>"`` (which
    registers it for ``CurvatureOperator(..., curvature="<name>")``) and implements, on
    ``self.fn`` (the :class:`ModelFunction`):

    * ``functional_product(fn, params, batch, v, reverse=False) -> tuple`` (static): the sum over
      the batch's samples of ``C_i v``, ``v`` and the result tuples of parameter-shaped tensors,
      written with ``torch.func`` so that it composes with ``vmap`` (``reverse=True``: by reverse
      over reverse where a forward rule is missing). It serves ``hvp_mode="forward"``, batched
      forward products (vmapped over tangents) and the per-sample products of the Hessian variance.
    * ``build_graph(batch, params) -> graph`` and ``graph_product(graph, v, batched) -> tuple``
      (optional; without them only forward mode exists): an autograd graph of one batch at the
      leaf parameters ``params`` from which every product is a backward pass (entries None where a
      parameter has no curvature; ``batched``: ``v`` has a leading block dimension, for
      ``is_grads_batched``).
    * ``merge_graphs(graphs) -> list`` (optional): fewer graphs with the same summed product (one
      backward call per product instead of one per batch); the default keeps the list.

    The base class does the rest: the loop over the batches, the graph cache, the division by N, the
    all-reduce over ranks (:meth:`local_sum` is the un-normalised sum of this rank), the checks and
    the model-untouched guarantee.
    """

    curvature: Optional[str] = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("curvature")
        if isinstance(name, str):
            if name in _REGISTRY and _REGISTRY[name] is not cls:
                raise TypeError(f"curvature {name!r} is already registered by {_REGISTRY[name].__qualname__}; "
                                f"give {cls.__qualname__} another curvature name.")
            _REGISTRY[name] = cls

    def __new__(cls, *args, curvature: Optional[str] = None, **kwargs):
        if cls is CurvatureOperator:
            cls = operator_class("hessian" if curvature is None else curvature)
        return super().__new__(cls)

    def __init__(self, model: nn.Module, data: Any, *, curvature: Optional[str] = None,
                 loss_fn: Optional[Callable] = None, bn_mode: str = "eval",
                 dtype: Optional[torch.dtype] = None, hvp_mode: str = "auto",
                 cache_graph: Any = "auto", progress: bool = False, distributed: Any = None):
        if curvature is not None and check_curvature(curvature) != self.curvature:
            raise ValueError(f"{type(self).__name__} is the {self.curvature!r} curvature, not {curvature!r}; use "
                             f"CurvatureOperator(model, data, curvature={curvature!r}).")
        if hvp_mode not in HVP_MODES:
            raise ValueError(f"unknown hvp_mode {hvp_mode!r}; choose one of {HVP_MODES}.")
        if cache_graph not in ("auto", True, False):
            raise ValueError(f"cache_graph must be 'auto', True or False, got {cache_graph!r}.")
        self.fn = ModelFunction(model, data, loss_fn=loss_fn, bn_mode=bn_mode, dtype=dtype, distributed=distributed)
        self.hvp_mode = self._resolve_mode(hvp_mode)
        self.progress = progress
        self.N = self.N_local = 0
        self.rank_counts: list = []
        self.cached, self.graph_bytes_estimate = False, 0
        self._graphs: Optional[list] = None
        self._vmap_ok = True
        if self.dist is None:
            self._build(cache_graph)
            self.rank_counts = [self.N]
        else:
            self._build_distributed(cache_graph)

    # ------------------------------------------------------------------ the curvature's hooks
    @staticmethod
    def functional_product(fn: ModelFunction, params: tuple, batch, v: tuple, reverse: bool = False) -> tuple:
        """``sum_{i in batch} C_i v`` with torch.func (composable with vmap); see the class docstring."""
        raise NotImplementedError

    def build_graph(self, batch, params: tuple):
        """The batch's autograd graph at the leaves ``params`` from which products are backward passes."""
        raise NotImplementedError

    def graph_product(self, graph, v: tuple, batched: bool = False) -> tuple:
        """``sum_{i in batch} C_i v`` as backward passes through ``graph`` (None entries: zero)."""
        raise NotImplementedError

    def merge_graphs(self, graphs: list) -> list:
        """Graphs whose products sum to those of ``graphs``, fewer where possible; default: ``graphs``."""
        return graphs

    @classmethod
    def has_graph_product(cls) -> bool:
        """True when the class implements :meth:`build_graph` (reverse mode is available)."""
        return cls.build_graph is not CurvatureOperator.build_graph

    @classmethod
    def has_functional_product(cls) -> bool:
        """True when the class implements :meth:`functional_product` (forward mode is available)."""
        return cls.functional_product is not CurvatureOperator.functional_product

    def _resolve_mode(self, hvp_mode: str) -> str:
        """The product mode that runs: the documented rule for ``"auto"``, a check otherwise."""
        available = [m for m, ok in (("reverse", self.has_graph_product()), ("forward", self.has_functional_product()))
                     if ok]
        if not available:
            raise TypeError(f"{type(self).__name__} implements neither build_graph/graph_product nor "
                            "functional_product; a curvature needs at least one (see CurvatureOperator).")
        if hvp_mode == "auto":
            return available[0]
        if hvp_mode not in available:
            raise ValueError(f"{type(self).__name__} has no {hvp_mode}-mode product; use hvp_mode="
                             f"{available[0]!r} or 'auto'.")
        return hvp_mode

    # ------------------------------------------------------------------ public seams
    model = property(lambda self: self.fn.model, doc="The user's model (never modified).")
    loss_fn = property(lambda self: self.fn.loss_fn, doc="The loss, ``loss_fn(outputs, targets)``.")
    bn_mode = property(lambda self: self.fn.bn_mode, doc="``'eval'`` or ``'train'``.")
    dtype = property(lambda self: self.fn.dtype, doc="The compute dtype.")
    device = property(lambda self: self.fn.device, doc="The model's device.")
    P = property(lambda self: self.fn.P, doc="Number of trainable parameters.")
    names = property(lambda self: list(self.fn.names), doc="Trainable parameter names, in flattening order.")
    dist = property(lambda self: self.fn.dist, doc="The DistContext of a distributed run, or None.")
    single_batch = property(lambda self: self.fn.single, doc="True when ``data`` was one batch.")

    def unflatten(self, v: torch.Tensor) -> dict:
        """A ``(..., P)`` vector as ``{parameter name: view of shape (..., *shape)}``."""
        return self.fn.unflatten_dict(v)

    def parameter_vector(self) -> torch.Tensor:
        """The point w (P,) at which the curvature is evaluated."""
        return self.fn.parameter_vector()

    def meta(self) -> dict:
        """What this operator is and what ran: curvature, hvp_mode, cached, bn_mode, dtype, ...

        ``rank_samples`` lists the samples of every rank (one entry for a single process).
        """
        return {"curvature": self.curvature, "hvp_mode": self.hvp_mode, "cached": self.cached,
                "bn_mode": self.bn_mode, "dtype": str(self.dtype).replace("torch.", ""),
                "single_batch": self.single_batch, "P": self.P, "N": self.N,
                "world_size": 1 if self.dist is None else self.dist.world_size,
                "rank_samples": list(self.rank_counts)}

    # ------------------------------------------------------------------ construction
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
            graph = self.build_graph(batch, params)
        return graph, total[0]

    def _build(self, cache_graph) -> None:
        """Count the samples and, in reverse mode with a cache that fits, build the merged graphs."""
        with curvature_mode(self.model, self.bn_mode):
            batches = self.fn.batches()
            first = next(batches)
            self.N = _data.batch_size(first)
            n_batches = self.fn.num_batches()
            graphs, leaves = None, None
            if self.hvp_mode == "reverse" and cache_graph is not False:
                leaves = self.fn.leaf_params()
                graph, nbytes = self._saved_bytes(first, leaves)
                self.graph_bytes_estimate = nbytes * (n_batches or 1)
                if cache_graph is True or self.graph_bytes_estimate <= 0.5 * available_memory(self.device):
                    graphs = [graph]
                del graph
            else:  # no graph: one forward pass, so that a model or loss that cannot run fails here
                with torch.no_grad():
                    self.fn.batch_loss(self.fn.params, first)
            bar = tqdm(batches, desc="hessfast: data", total=(n_batches - 1) if n_batches else None,
                       disable=not self.progress, leave=False)
            for batch in bar:
                self.N += _data.batch_size(batch)
                if graphs is not None:
                    graphs.append(self.build_graph(batch, leaves))
            self._graphs = self.merge_graphs(graphs) if graphs is not None else None
            self.cached = self._graphs is not None
            self.N_local = self.N

    def _build_distributed(self, cache_graph) -> None:
        """Build on this rank's shard (empty allowed), then agree with the other ranks on N and the model.

        All ranks raise together if any rank's build failed, if every shard is empty, or if the
        ranks' models differ (P, or the weights' fingerprint).
        """
        ctx = self.dist
        empty = [False]

        def local():
            empty[0] = self.fn.is_empty()
            if not empty[0]:
                self._build(cache_graph)

        ctx.guard(local, "building the curvature operator on its data shard")
        w_sum, w_sq = self.fn.fingerprint()
        mine = torch.tensor([float(self.N), float(self.P), w_sum, w_sq, float(empty[0])], dtype=torch.float64,
                            device=self.device)
        rows = ctx.all_gather_small(mine)
        ctx.check_agreement(rows, P_col=1, same={(2, 4): "the model's weights (sum and sum of squares of the "
                                                         "parameters)"}, empty_col=4)
        counts = [int(c) for c in rows[:, 0].tolist()]
        self.N_local, self.N, self.rank_counts = self.N, sum(counts), counts

    # ------------------------------------------------------------------ products
    def batch_product(self, batch, v: tuple, graph=None, batched: bool = False) -> tuple:
        """Sum over the batch's samples of ``C_i v`` in the operator's mode (``v``: parameter-shaped tuple,
        with a leading block dimension when ``batched``); ``graph``: the batch's cached graph, if any."""
        if self.hvp_mode == "reverse":
            graph = graph if graph is not None else self.build_graph(batch, self.fn.leaf_params())
            return self.graph_product(graph, v, batched)
        if batched:
            return self._batched_forward(batch, v)
        return self.functional_product(self.fn, self.fn.params, batch, v)

    def _batched_forward(self, batch, v: tuple) -> tuple:
        """b forward-over-reverse products sharing the primal pass (vmap over tangents).

        Some operators' derivative formulas are not vmap-compatible (e.g. mse_loss under
        vmap(jvp(grad)) on torch 2.13); those fall back to one product per vector.
        """
        product = lambda *t: self.functional_product(self.fn, self.fn.params, batch, t)  # noqa: E731
        if self._vmap_ok:
            try:
                return torch.func.vmap(product)(*v)
            except RuntimeError:
                self._vmap_ok = False
        rows = [product(*(t[i] for t in v)) for i in range(v[0].shape[0])]
        return tuple(torch.stack(parts) for parts in zip(*rows))

    def _explained_product(self, batch, v: tuple, graph, batched: bool) -> tuple:
        """:meth:`batch_product`; a forward-mode failure (an operation without a forward-mode or vmap
        rule) names the fix."""
        try:
            return self.batch_product(batch, v, graph, batched)
        except RuntimeError as err:
            if self.hvp_mode != "forward" or not self.has_graph_product() or isinstance(err, _OOM):
                raise
            raise RuntimeError(f"forward-over-reverse failed for this model or loss ({err}); "
                               "use hvp_mode='reverse' (double backward).") from err

    def local_sum(self, V: torch.Tensor) -> torch.Tensor:
        """Un-normalised sum over this rank's samples of ``C_i v``: ``V`` (P,) -> (P,), or (b, P) -> (b, P).

        Zeros for an empty data shard; no collective (the distributed mean is the all-reduce of the
        ranks' local sums divided by :attr:`N`).
        """
        V = self._check_vector(V, None)
        if self.N_local == 0:
            return torch.zeros_like(V)
        if V.dim() == 2 and self.cached:
            # Through a cached graph there is no forward pass left to share, and a batched backward
            # was measured slower (0.6-0.85x, bench/bench_block_hvp.py): one product after another.
            return torch.stack([self._sum_over_data(v, False) for v in V])
        return self._sum_over_data(V, V.dim() == 2)

    def _sum_over_data(self, V: torch.Tensor, batched: bool) -> torch.Tensor:
        v = self.fn.unflatten(V)
        lead = tuple(V.shape[:-1])
        total = None
        with curvature_mode(self.model, self.bn_mode):
            pairs = [(None, g) for g in self._graphs] if self._graphs is not None else \
                ((b, None) for b in self.fn.batches())
            for batch, graph in pairs:
                flat = self.fn.flatten(self._explained_product(batch, v, graph, batched), lead)
                total = flat if total is None else total.add_(flat)
        return torch.zeros_like(V) if total is None else total

    def _apply(self, V: torch.Tensor) -> torch.Tensor:
        total = self.fn.all_reduce_sum(lambda: self.local_sum(V), V, "computing a curvature product")
        return total.div_(self.N)

    def _check_vector(self, v: torch.Tensor, batched: Optional[bool]) -> torch.Tensor:
        if not isinstance(v, torch.Tensor):
            v = torch.as_tensor(np.asarray(v), device=self.device)
        dims = (1, 2) if batched is None else ((2,) if batched else (1,))
        if v.dim() not in dims or v.shape[-1] != self.P:
            want = " or ".join({1: "(P,)", 2: "(b, P)"}[d] for d in dims)
            raise ValueError(f"expected a vector of shape {want} with P={self.P}, got {tuple(v.shape)}.")
        if v.device != self.device:
            raise ValueError(f"the vector is on {v.device} but the operator on {self.device}; move it with "
                             f".to('{self.device}').")
        return v.to(self.dtype)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """Curvature-vector product ``C v``, the exact mean over all samples. ``v``: (P,) -> (P,)."""
        return self._apply(self._check_vector(v, False))

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """Products with b vectors at once. ``V``: (b, P) -> (b, P).

        Without a cached graph the b products share one forward pass (vmap over tangents, or a
        batched double backward), which bench/bench_block_hvp.py measured 1.2-2.8x faster than b
        single products on CPU; through a cached graph they run one after the other.
        """
        return self._apply(self._check_vector(V, True))

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

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(curvature={self.curvature!r}, P={self.P}, N={self.N}, dtype={self.dtype}, "
                f"hvp_mode={self.hvp_mode!r}, cached={self.cached}, bn_mode={self.bn_mode!r})")
