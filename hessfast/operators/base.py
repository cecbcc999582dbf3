"""Matrix-free curvature operators: the base class that owns the data loop, and the curvature registry.

For parameters w in R^P and the empirical risk R(w) = (1/N) sum_i l(f(x_i; w), y_i) (eq. 2 of the
paper; eq. 3 for one batch) a curvature operator is C = (1/N) sum_i C_i, with C_i the curvature of
sample i's loss: the Hessian (:mod:`.hessian`) or the Generalised Gauss-Newton matrix (:mod:`.ggn`).
With a token or weighted loss R is the mean over all loss terms of the data set, (sum_b s_b) / C
(:mod:`.functional`). :class:`CurvatureOperator` sums a curvature's per-batch products over the
data, caches the autograd graphs, normalises, all-reduces over the ranks of a distributed run,
picks the product mode and checks every input; a curvature only says how one batch's product is
computed.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..utils import data as _data
from ..utils.memory import available_memory, saved_tensor_bytes
from ..utils.model_state import DROPOUT, curvature_mode
from .compiled import DEFAULT_RUN_PRODUCTS, ProductCompiler
from .finite_difference import fd_step
from .functional import ModelFunction
from .linear import SymmetricOperator
from .modes import ProductMode, first_line
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


class CurvatureOperator(SymmetricOperator):
    """A curvature of ``loss_fn(model(inputs), targets)`` over ``data`` as a P x P linear operator.

    ``CurvatureOperator(model, data, curvature="hessian" | "ggn", ...)`` returns an instance of the
    registered subclass (:class:`~hessfast.operators.HessianOperator`,
    :class:`~hessfast.operators.GGNOperator`); the subclasses take the same arguments without
    ``curvature``. Products are exact means over all N samples, whatever the batch sizes; the model
    is evaluated functionally (:class:`~hessfast.operators.functional.ModelFunction`) and never modified.

    Args:
        model: any ``nn.Module``; curvature is with respect to its parameters with ``requires_grad``.
        data: one batch (an ``(inputs, targets)`` pair, or a dict with ``"labels"`` for the built-in
            losses), or an iterable of batches (the mean over all loss terms of the data set).
        curvature: a registered name (:func:`curvatures`); ``None`` for the class's own.
        loss_fn: a :class:`hessfast.losses.Loss` (e.g. ``hessfast.losses.causal_lm()``), or a plain
            ``loss_fn(outputs, targets) -> scalar`` with mean (default) or sum reduction; default
            ``hessfast.losses.cross_entropy()``, which is ``nn.CrossEntropyLoss()`` on (n, C) logits and
            also takes a dict or ``ModelOutput``'s ``"logits"``.
        bn_mode: ``"eval"`` (running statistics) or ``"train"`` (batch statistics, Appendix E).
            Dropout is always off.
        dtype: compute dtype (e.g. ``torch.float64`` for exact work); default the model's, float32 for
            a bfloat16 / float16 model (evaluated on a float32 copy). The loss's tensors are cast too.
        hvp_mode: ``"reverse"`` (double backward through the batch's graph), ``"forward"``
            (forward-over-reverse with ``torch.func``), ``"fd"`` (central differences of gradients,
            :mod:`.finite_difference`: first derivatives only, relative error ~eps^(2/3)) or ``"auto"``:
            reverse whenever the curvature has a graph product, whether the graph is cached or not,
            forward for a curvature without one; then one product on the first batch, and if it
            raises PyTorch's error for an operation without a second or forward-mode derivative
            (:func:`~hessfast.operators.finite_difference.missing_derivative`), fd with a one-line
            warning and ``meta()["hvp_fallback"]`` saying why. The rule never depends on timings, so
            the same call gives the same digits on the same machine; reverse follows measurements on
            CPU (bench/RESULTS.md: a product was 1.5-2.4x a gradient through the cached graph,
            3.2-3.5x reverse uncached and 4-6x forward-over-reverse). The exact modes evaluate
            ``scaled_dot_product_attention`` with PyTorch's math kernel (the fused kernels have no
            second derivative); fd keeps the default kernels. :attr:`hvp_mode` is what runs.
        cache_graph: keep the autograd graphs of all batches between products, so that a product is
            one backward pass (``"auto"``: when they fit in half the free memory, estimated from the
            first batch's saved tensors; only in reverse mode). In reverse mode the first batch's graph is
            built at construction even without a cache, to check it (:mod:`.modes`). Without a cache
            every product reads the data again, and batches that change between passes raise
            (:class:`hessfast.utils.data.PassCheck`).
        progress: show a progress bar while the graphs are built.
        compile: ``True`` runs the functional product (forward mode) through ``torch.compile``, compiled
            once per model and batch shape and cached across operators, compiling at construction;
            if compilation fails or the product graph-breaks, the eager product runs with a warning
            (:mod:`.compiled`). ``"auto"``: the fixed rule :func:`~.compiled.auto_compile` (CUDA only,
            for long runs; an operator assumes 100 products). ``False`` (default): eager.
        distributed: with a torch.distributed process group (``None``: when one is initialised;
            ``True``; a ``ProcessGroup``; ``False``: never) ``data`` is this rank's shard, possibly
            empty, and products are exact means over the samples of all ranks (hessfast.distributed).

    Shapes: ``op @ v`` and :meth:`matvec` take ``v`` of shape (P,) and return (P,); :meth:`matmat`
    takes and returns (b, P).

    Attributes:
        batched_backward: whether :meth:`matmat` through a cached graph runs its b products as one
            batched backward (``is_grads_batched``) rather than one backward after another. Default:
            on CUDA, where one vector leaves the device idle on small models; not on the CPU, where
            it measured 0.65-1.57x the speed of b single backward passes, not reliably faster
            (bench/bench_block_hvp.py).
            Set it to force either way; a batched backward that fails (an operation in the graph
            without a batching rule, or out of memory with b vectors at once) falls back to one
            product after another with a warning, and stays off for this operator.

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
    * ``fd_product(batch, v, h) -> tuple`` (optional; serves ``hvp_mode="fd"``): the batch's sum of
      ``C_i v`` by finite differences with step h, float64 entries.

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
                 cache_graph: Any = "auto", progress: bool = False, distributed: Any = None,
                 compile: Any = False):
        if curvature is not None and check_curvature(curvature) != self.curvature:
            raise ValueError(f"{type(self).__name__} is the {self.curvature!r} curvature, not {curvature!r}; use "
                             f"CurvatureOperator(model, data, curvature={curvature!r}).")
        if cache_graph not in ("auto", True, False):
            raise ValueError(f"cache_graph must be 'auto', True or False, got {cache_graph!r}.")
        self.fn = ModelFunction(model, data, loss_fn=loss_fn, bn_mode=bn_mode, dtype=dtype, distributed=distributed)
        self.compiler = ProductCompiler(type(self), compile, device=self.fn.device, hvp_mode=hvp_mode,
                                        batch_products=DEFAULT_RUN_PRODUCTS * (self.fn.num_batches() or 1))
        self.mode = ProductMode(type(self), hvp_mode, compiled=self.compiler.active)
        self.progress = progress
        self.N = self.N_local = 0
        self.loss_terms = 0.0
        self.rank_counts: list = []
        self.cached, self.graph_bytes_estimate = False, 0
        self._graphs: Optional[list] = None
        self._vmap_ok = True
        self._w: Optional[torch.Tensor] = None
        self.batched_backward = self.fn.device.type == "cuda"
        if self.dist is None:
            self._build(cache_graph)
            self.rank_counts = [self.N]
            self._set_scale()
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

    def fd_product(self, batch, v: tuple, h: float) -> tuple:
        """``sum_{i in batch} C_i v`` by finite differences with step ``h`` (float64 entries)."""
        raise NotImplementedError

    @classmethod
    def has_graph_product(cls) -> bool:
        """True when the class implements :meth:`build_graph` (reverse mode is available)."""
        return cls.build_graph is not CurvatureOperator.build_graph

    @classmethod
    def has_functional_product(cls) -> bool:
        """True when the class implements :meth:`functional_product` (forward mode is available)."""
        return cls.functional_product is not CurvatureOperator.functional_product

    @classmethod
    def has_fd_product(cls) -> bool:
        """True when the class implements :meth:`fd_product` (``hvp_mode="fd"`` is available)."""
        return cls.fd_product is not CurvatureOperator.fd_product

    # ------------------------------------------------------------------ public seams
    model = property(lambda self: self.fn.model, doc="The user's model (never modified).")
    loss_fn = property(lambda self: self.fn.loss_fn, doc="The ``loss_fn`` argument as passed (None: the default).")
    loss = property(lambda self: self.fn.loss, doc="The :class:`hessfast.losses.Loss` in use.")
    hvp_mode = property(lambda self: self.mode.name, doc="The product mode that runs (:mod:`.modes`).")
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
        meta = {"curvature": self.curvature, "hvp_mode": self.hvp_mode, "cached": self.cached,
                "bn_mode": self.bn_mode, "dropout": DROPOUT, "dtype": str(self.dtype).replace("torch.", ""),
                "single_batch": self.single_batch, "P": self.P, "N": self.N, "loss": repr(self.loss),
                "loss_terms": self.loss_terms, "attention": "math" if self.mode.exact else "default",
                "world_size": 1 if self.dist is None else self.dist.world_size,
                "rank_samples": list(self.rank_counts)}
        if self.cached:
            meta["batched_backward"] = self.batched_backward
        if self.mode.fallback is not None:
            meta["hvp_fallback"] = self.mode.fallback
        meta.update(self.compiler.meta())
        return meta

    # ------------------------------------------------------------------ construction
    def _build(self, cache_graph) -> None:
        """One pass over the data: count the samples and the loss terms, settle ``"auto"`` by a probe
        product on the first batch, and in reverse mode with a cache that fits, build the merged graphs."""
        with curvature_mode(self.model, self.bn_mode, math_attention=self.mode.exact):
            batches = self.fn.batches()
            first = next(batches)
            self.N = _data.batch_size(first)
            terms = self.fn.term_count(first, run=True)
            n_batches = self.fn.num_batches()
            graphs, leaves, graph = None, None, None
            self._prepare_compiled(first)
            if self.hvp_mode == "reverse":   # the first graph: checked, probed, cached if it fits
                leaves = self.fn.leaf_params()
                graph, nbytes = saved_tensor_bytes(lambda: self.build_graph(first, leaves))
                self.graph_bytes_estimate = nbytes * (n_batches or 1)
                self.mode.check_graph(graph, self._dtype_name())
            if self.mode.probing:
                self.mode.probe(lambda: self._probe_product(first, graph), self._dtype_name())
            if graph is not None and self.hvp_mode == "reverse" and cache_graph is not False and (
                    cache_graph is True or self.graph_bytes_estimate <= 0.5 * available_memory(self.device)):
                graphs = [graph]
            del graph
            bar = tqdm(batches, desc="hessfast: data", total=(n_batches - 1) if n_batches else None,
                       disable=not self.progress, leave=False)
            for batch in bar:
                self.N += _data.batch_size(batch)
                terms = terms + self.fn.term_count(batch)
                self._prepare_compiled(batch)
                if graphs is not None:
                    graphs.append(self.build_graph(batch, leaves))
            self._graphs = self.merge_graphs(graphs) if graphs is not None else None
            self.cached = self._graphs is not None
            self.N_local, self.loss_terms = self.N, float(terms)

    def _prepare_compiled(self, batch) -> None:
        """Compile the product for this batch's shape now (its time is reported apart); after a failed
        compilation the mode returns to its eager pick, so the graphs are then built as without compile."""
        if self.compiler.active and not self.compiler.prepare(self.fn, batch):
            self.mode.uncompile()

    def _probe_product(self, first, graph) -> None:
        """One product on the first batch in the current mode (its value is not used)."""
        v = tuple(torch.ones_like(p) for p in self.fn.params)
        if graph is not None:
            self.graph_product(graph, v)
        else:
            self.functional_product(self.fn, self.fn.params, first, v)

    def _dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    def _build_distributed(self, cache_graph) -> None:
        """Build on this rank's shard (empty allowed), then agree with the other ranks on N, the number of
        loss terms (summed in float64), the product mode and the model.

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
        mine = torch.tensor([float(self.N), float(self.P), w_sum, w_sq, float(empty[0]), self.loss_terms,
                             float(self.hvp_mode == "fd")], dtype=torch.float64, device=self.device)
        rows = ctx.all_gather_small(mine)
        ctx.check_agreement(rows, P_col=1, same={(2, 4): "the model's weights (sum and sum of squares of the "
                                                         "parameters)"}, empty_col=4)
        counts = [int(c) for c in rows[:, 0].tolist()]
        self.N_local, self.N, self.rank_counts = self.N, sum(counts), counts
        self.loss_terms = float(rows[:, 5].sum())
        if self.hvp_mode != "fd" and bool(rows[:, 6].any()):    # another rank's probe fell back
            self._graphs, self.cached = None, False
            self.mode.fall_back("another rank's probe found a derivative this model lacks", self._dtype_name())
        self._set_scale()

    def _set_scale(self) -> None:
        """``term_scale = N / C``: the products' per-sample sums are then sums of ``l_i = (N / C) s_i``."""
        if self.N > 0 and not self.loss_terms > 0:
            raise ValueError(f"the data have no loss terms: all {self.N} samples' targets are ignored (e.g. every "
                             f"label is the loss's ignore_index, or the class weights are zero), so the mean loss "
                             f"{self.loss!r} is undefined. Check the labels (padding = -100) and the loss.")
        self.fn.term_scale = self.N / self.loss_terms if self.N > 0 else 1.0

    # ------------------------------------------------------------------ products
    def batch_product(self, batch, v: tuple, graph=None, batched: bool = False, h: float = 0.0) -> tuple:
        """Sum over the batch's samples of ``C_i v`` in the operator's mode (``v``: parameter-shaped tuple,
        with a leading block dimension when ``batched``); ``graph``: the batch's cached graph, if any;
        ``h``: the finite-difference step (fd mode, one vector at a time)."""
        if self.hvp_mode == "fd":
            return self.fd_product(batch, v, h)
        if self.hvp_mode == "reverse":
            graph = graph if graph is not None else self.build_graph(batch, self.fn.leaf_params())
            return self.graph_product(graph, v, batched)
        if self.compiler.active:
            return self.compiler.product(self.fn, batch, v, batched, lambda: self._eager_forward(batch, v, batched))
        return self._eager_forward(batch, v, batched)

    def _eager_forward(self, batch, v: tuple, batched: bool) -> tuple:
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

    def _explained_product(self, batch, v: tuple, graph, batched: bool, h: float) -> tuple:
        """:meth:`batch_product`; a failure for want of a derivative names the mode that works."""
        try:
            return self.batch_product(batch, v, graph, batched, h)
        except (RuntimeError, NotImplementedError) as err:
            better = None if isinstance(err, _OOM) else self.mode.explain(err)
            if better is None:
                raise
            raise better from err

    def local_sum(self, V: torch.Tensor) -> torch.Tensor:
        """Sum over this rank's samples of ``C_i v`` (C_i: the curvature of ``l_i = (N / C) s_i``, module
        :mod:`.functional`): ``V`` (P,) -> (P,), or (b, P) -> (b, P).

        Zeros for an empty data shard; no collective (the distributed mean is the all-reduce of the
        ranks' local sums divided by :attr:`N`).
        """
        V = self._check_vector(V, None)
        if self.N_local == 0:
            return torch.zeros_like(V)
        if V.dim() == 2 and self.cached and self.batched_backward:
            try:
                return self._sum_over_data(V, True)
            except RuntimeError as err:   # no batching rule, or out of memory with b vectors at once
                self.batched_backward = False
                if isinstance(err, _OOM) and self.device.type == "cuda":
                    torch.cuda.empty_cache()
                warnings.warn(f"hessfast: a batched backward through the cached graph failed, so the {V.shape[0]} "
                              f"products run one after another (same numbers): {first_line(err)[:300]}",
                              UserWarning, stacklevel=3)
        if V.dim() == 2 and (self.cached or self.hvp_mode == "fd"):
            # Through a cached graph there is no forward pass left to share (see batched_backward);
            # finite differences take a step per vector.
            return torch.stack([self._sum_over_data(v, False) for v in V])
        return self._sum_over_data(V, V.dim() == 2)

    @property
    def shares_products(self) -> bool:
        """Whether the b products of :meth:`matmat` share work, so that probes in lockstep pay: forward
        mode (vmapped products share the primal pass) and a cached graph with :attr:`batched_backward`;
        not products through a cached graph one after another, nor finite differences."""
        if self.hvp_mode == "fd":
            return False
        return self.batched_backward if self.cached else True

    def _sum_over_data(self, V: torch.Tensor, batched: bool) -> torch.Tensor:
        fd = self.hvp_mode == "fd"
        h = fd_step(self._point(), V, self.dtype) if fd else 0.0
        if fd and h == 0.0:
            return torch.zeros_like(V)
        v = self.fn.unflatten(V)
        lead = tuple(V.shape[:-1])
        total = None
        # A product through the cached graphs is a backward pass alone: no module runs, so the
        # modes that curvature_mode sets for forward passes are not needed (nor their cost per product).
        cached = self._graphs is not None
        with contextlib.nullcontext() if cached else curvature_mode(self.model, self.bn_mode, math_attention=not fd):
            pairs = [(None, g) for g in self._graphs] if cached else ((b, None) for b in self.fn.batches())
            for batch, graph in pairs:
                parts = self._explained_product(batch, v, graph, batched, h)
                flat = torch.cat([p.reshape(*lead, -1) for p in parts], -1) if fd else self.fn.flatten(parts, lead)
                total = flat if total is None else total.add_(flat)
        if total is None:
            return torch.zeros_like(V)
        if self.fn.term_scale != 1.0:
            total = total.mul_(self.fn.term_scale)
        return total.to(V.dtype)

    def _point(self) -> torch.Tensor:
        """The flat point w, kept for the finite-difference step rule."""
        if self._w is None:
            self._w = self.fn.parameter_vector()
        return self._w

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
        single products on CPU; through a cached graph they are one batched backward where
        :attr:`batched_backward` says so (CUDA), else one backward after another.
        """
        return self._apply(self._check_vector(V, True))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(curvature={self.curvature!r}, P={self.P}, N={self.N}, dtype={self.dtype}, "
                f"hvp_mode={self.hvp_mode!r}, cached={self.cached}, bn_mode={self.bn_mode!r})")

