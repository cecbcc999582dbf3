"""Fisher information operators: the empirical Fisher and the Monte-Carlo Fisher (``docs/fisher.md``).

With the data set's loss ``R(w) = (1/C) sum_i s_i(w)`` (:mod:`.functional`: ``s_i`` is the sum of
sample i's loss terms, C the number of loss terms of the whole data set; C = N for one term per
sample, and R is eq. 2 of the paper) both operators are second moments of the per-sample gradients
``g_i = grad s_i`` (P-vectors):

* empirical Fisher, ``curvature="empirical_fisher"``:   ``F = (1/C) sum_i g_i g_i^T``;
* Monte-Carlo Fisher, ``curvature="fisher"``:            ``F = (1/(C k)) sum_i sum_{s=1..k} g_is g_is^T``,
  with ``g_is`` the gradient of sample i's loss at targets drawn from the model's predictive
  distribution (:meth:`hessfast.losses.Loss.sample`; k = ``mc_samples`` draws per sample, drawn once
  with a seeded generator, so the operator is one fixed symmetric positive semi-definite matrix).

For one term per sample F is the familiar ``(1/N) sum_i g_i g_i^T``, and ``(1/C) sum_i g_i`` is the
gradient of R. A sample of a token loss is a sequence: ``g_i`` is the gradient of the sum of its token
terms and every token of the data set weighs 1/C, which makes the expectation of the Monte-Carlo
Fisher over the drawn targets equal to the GGN (:mod:`.ggn`, Section 7 of the paper) for
cross-entropy (token or not), for ``mse`` (the Gaussian of variance 1/2 whose negative
log-likelihood is the squared error) and for ``bce_with_logits``, without class weights or label
smoothing.

A product is ``F v = (1/C) G^T (G v)`` with ``G`` the (rows, P) matrix of per-sample gradients
(``torch.func.vmap`` of ``torch.func.grad`` over the samples, a Python loop for a model that branches
on its data). ``G`` is kept between products while the kept rows fit in :data:`GRADIENT_CACHE_FRACTION`
of the free memory (rows x P x itemsize bytes, rows = N for the empirical Fisher, N k for the
Monte-Carlo one); otherwise a product recomputes the per-sample gradients batch by batch (2-16
gradients' worth on the bench workloads, ``docs/fisher.md``). Only first derivatives of the model
are needed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..losses import CallableLoss, Loss
from ..utils import data as _data
from ..utils.memory import available_memory
from .base import CurvatureOperator
from .functional import ModelFunction
from .per_sample import auto_chunk, data_dependent

KINDS = ("empirical", "mc")
# Largest share of the free memory (measured once, at construction) the kept per-sample gradients
# may take; the same share the base class allows for cached autograd graphs.
GRADIENT_CACHE_FRACTION = 0.5


def check_kind(kind: str) -> str:
    """``kind`` if it is ``"empirical"`` or ``"mc"``, else a ValueError saying which to pass."""
    if kind not in KINDS:
        raise ValueError(f"unknown Fisher kind {kind!r}; choose kind='empirical' ((1/N) sum_i g_i g_i^T of the "
                         f"true targets) or kind='mc' (targets drawn from the model, mc_samples per sample).")
    return kind


# ---------------------------------------------------------------------------- per-sample gradients
def one_sample(inputs: Any, targets: torch.Tensor) -> tuple:
    """A batch of one from a sample's inputs and target without their batch dimension."""
    return _data.map_tensors(inputs, lambda t: t.unsqueeze(0)), targets.unsqueeze(0)


def sample_gradient(fn: ModelFunction, params: tuple, inputs: Any, targets: torch.Tensor) -> tuple:
    """``g_i = grad s_i`` of one sample (no batch dimension) as parameter-shaped tensors (torch.func, vmap-able)."""
    return torch.func.grad(lambda p: fn.batch_loss(p, one_sample(inputs, targets)))(params)


def _loop_gradients(fn: ModelFunction, inputs: Any, targets: torch.Tensor) -> torch.Tensor:
    """The (n, P) per-sample gradients by one backward pass per sample (models vmap cannot batch)."""
    rows = []
    for i in range(targets.shape[0]):
        params = fn.leaf_params()
        with torch.enable_grad():
            loss = fn.batch_loss(params, (_data.map_tensors(inputs, lambda t: t[i:i + 1]), targets[i:i + 1]))
            grads = torch.autograd.grad(loss, params, allow_unused=True) if loss.requires_grad else \
                (None,) * len(params)
        rows.append(fn.flatten(grads).detach())
    return torch.stack(rows)


class GradientRows:
    """Per-sample gradient matrices of ``fn``'s loss, chunked over the samples.

    vmap over the samples by default; a model whose forward pass branches on its data (e.g. a mask
    checked with ``.all()``) switches once to a Python loop (:attr:`loop` becomes True).
    """

    def __init__(self, fn: ModelFunction):
        self.fn = fn
        self.loop = False
        self.chunk = auto_chunk(1, fn.P, fn.dtype, fn.device)

    def matrix(self, inputs: Any, targets: list) -> torch.Tensor:
        """``G`` (k n, P): row ``s n + i`` is ``grad s_i`` of sample i of the batch at the targets ``targets[s]``."""
        return torch.cat(list(self.chunks(inputs, targets)))

    def chunks(self, inputs: Any, targets: list):
        """The rows of :meth:`matrix` in consecutive blocks of at most :attr:`chunk` rows, (c, P) each.

        ``targets``: k target tensors (n, ...) of the n samples of ``inputs`` (one per draw)."""
        n, k = int(targets[0].shape[0]), len(targets)
        stacked = targets[0] if k == 1 else torch.cat(targets)
        for start in range(0, n * k, self.chunk):
            rows = torch.arange(start, min(start + self.chunk, n * k), device=stacked.device)
            if k == 1 and start == 0 and rows.numel() == n:
                yield self._block(inputs, stacked)
            else:
                yield self._block(_data.map_tensors(inputs, lambda t: t[rows % n]), stacked[rows])

    def _block(self, inputs: Any, targets: torch.Tensor) -> torch.Tensor:
        if not self.loop:
            grad = lambda x, y: sample_gradient(self.fn, self.fn.params, x, y)  # noqa: E731
            try:
                parts = torch.func.vmap(grad)(inputs, targets)
                return torch.cat([p.reshape(targets.shape[0], -1) for p in parts], dim=1)
            except RuntimeError as err:
                if not data_dependent(err):
                    raise
                self.loop = True
        return _loop_gradients(self.fn, inputs, targets)


# ---------------------------------------------------------------------------- the graph of one batch
@dataclass
class FisherGraph:
    """One batch of a Fisher operator: its inputs, the targets of every draw and the kept gradients.

    ``inputs``: the batch's inputs (n samples); ``targets``: a list with one target tensor per draw
    (the true targets for the empirical Fisher, k drawn ones for the Monte-Carlo Fisher);
    ``gradients``: the per-sample gradients of all draws, (k n, P) (:meth:`GradientRows.matrix`), when
    kept, else None (recomputed by every product).
    """

    inputs: Any
    targets: list
    gradients: Optional[torch.Tensor] = None

    @property
    def rows(self) -> int:
        return sum(int(t.shape[0]) for t in self.targets)


class FisherOperator(CurvatureOperator):
    """The Fisher information as a P x P operator: ``kind="empirical"`` or ``kind="mc"`` (module docstring).

    ``FisherOperator(model, data, kind=...)`` returns an :class:`EmpiricalFisherOperator` (registered as
    ``curvature="empirical_fisher"``) or a :class:`MonteCarloFisherOperator` (``curvature="fisher"``).

    Args:
        model, data: as :class:`CurvatureOperator`; every sample's loss must be its own (no batch-norm
            batch statistics: ``bn_mode="train"`` is refused).
        kind: ``"empirical"`` (the true targets) or ``"mc"`` (targets drawn from the model).
        mc_samples: draws per sample k >= 1 (``"mc"`` only).
        seed: seed of the draws (``"mc"`` only); the same seed and data give the same matrix.
        cache_graph: keep the per-sample gradients between products while they fit in
            :data:`GRADIENT_CACHE_FRACTION` of the free memory (``"auto"``), always (True), or never
            (False: every product recomputes them; the Monte-Carlo Fisher then keeps the batches and
            their drawn targets, so that every product sees the same draws).
        **kwargs: ``loss_fn``, ``dtype``, ``hvp_mode``, ``progress``, ... as :class:`CurvatureOperator`;
            ``hvp_mode="auto"`` or ``"reverse"`` is the per-sample-gradient product (first derivatives
            only), ``"forward"`` (empirical only) recomputes the gradients in every product.

    Shapes: ``matvec`` (P,) -> (P,), ``matmat`` (b, P) -> (b, P), as every operator.
    """

    kind: Optional[str] = None

    def __new__(cls, *args, kind: Optional[str] = None, **kwargs):
        if cls is FisherOperator:
            cls = EmpiricalFisherOperator if check_kind(kind or "empirical") == "empirical" else \
                MonteCarloFisherOperator
        return super().__new__(cls)

    def __init__(self, model, data, *, kind: Optional[str] = None, mc_samples: int = 1, seed: int = 0,
                 bn_mode: str = "eval", cache_graph: Any = "auto", **kwargs):
        if kind is not None and check_kind(kind) != self.kind:
            raise ValueError(f"{type(self).__name__} is the {self.kind!r} Fisher, not {kind!r}; use "
                             f"FisherOperator(model, data, kind={kind!r}).")
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"mc_samples must be an integer >= 1 (targets drawn per sample), got {mc_samples!r}.")
        if self.kind == "empirical" and mc_samples != 1:
            raise ValueError(f"mc_samples={mc_samples} draws targets, which the empirical Fisher does not; use "
                             "kind='mc' (curvature='fisher') for the Monte-Carlo Fisher.")
        if bn_mode == "train":
            raise ValueError("the Fisher needs each sample's own gradient, which batch-norm batch statistics "
                             "(bn_mode='train') tie to the other samples of its batch; use bn_mode='eval'.")
        if cache_graph not in ("auto", True, False):
            raise ValueError(f"cache_graph must be 'auto', True or False, got {cache_graph!r}.")
        self.mc_samples, self.seed = mc_samples, seed
        self.keep_gradients = cache_graph
        self._rows: Optional[GradientRows] = None
        self._generator: Optional[torch.Generator] = None
        self._budget: Optional[float] = None
        self._kept_bytes = 0
        super().__init__(model, data, bn_mode=bn_mode, cache_graph=self._base_cache(cache_graph), **kwargs)
        self._finish()

    def _base_cache(self, cache_graph: Any) -> Any:
        """The ``cache_graph`` the base class gets: the batch records are small, so they are always kept
        except for an empirical Fisher without a cache, which then reads the data in every product."""
        return cache_graph if (self.kind == "empirical" and cache_graph is False) else True

    def _finish(self) -> None:
        graphs = self._graphs or []
        self.cached = bool(graphs) and all(g.gradients is not None for g in graphs)
        self.graph_bytes_estimate = sum(g.rows for g in graphs) * self.P * self._itemsize()

    def _itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def sample_gradients(self) -> GradientRows:
        """The per-sample gradient engine on :attr:`fn`."""
        if self._rows is None:
            self._rows = GradientRows(self.fn)
        return self._rows

    # ------------------------------------------------------------------ the curvature's hooks
    def draw_targets(self, inputs: Any, targets: torch.Tensor) -> list:
        """The target tensors of the batch's draws (empirical: the true targets)."""
        return [targets]

    def build_graph(self, batch, params: tuple) -> FisherGraph:
        """The batch's record; its gradients are computed later (:meth:`merge_graphs`, or per product)."""
        inputs, targets = batch
        return FisherGraph(inputs, self.draw_targets(inputs, targets))

    def merge_graphs(self, graphs: list) -> list:
        """Keep the per-sample gradients of the batches, in order, while they fit (class docstring)."""
        for g in graphs:
            self._keep(g)
        return graphs

    def _keep(self, graph: FisherGraph) -> None:
        if self.keep_gradients is False:
            return
        need = graph.rows * self.P * self._itemsize()
        if self.keep_gradients == "auto":
            if self._budget is None:
                self._budget = GRADIENT_CACHE_FRACTION * available_memory(self.device)
            if self._kept_bytes + need > self._budget:
                return
        graph.gradients = self.sample_gradients.matrix(graph.inputs, graph.targets)
        self._kept_bytes += need

    def graph_product(self, graph: FisherGraph, v: tuple, batched: bool = False) -> tuple:
        """``(1/k) sum_s G_s^T (G_s v)`` over the batch's draws s (k = 1 for the empirical Fisher)."""
        lead = (v[0].shape[0],) if batched else ()
        V = self.fn.flatten(v, lead)
        V2 = V.reshape(-1, self.P)
        total = torch.zeros_like(V2)
        if graph.gradients is not None:
            blocks = [graph.gradients]
        else:
            blocks = self.sample_gradients.chunks(graph.inputs, graph.targets)
        for G in blocks:
            total.addmm_((V2 @ G.T), G)
        if len(graph.targets) > 1:
            total.div_(len(graph.targets))
        return self.fn.unflatten(total.reshape(V.shape))

    def meta(self) -> dict:
        """The base class's meta plus ``fisher`` (the kind), ``gradient_rows`` (N, or N k; None when the
        data are read in every product), ``gradients_kept`` (rows kept between products),
        ``per_sample_loop`` (per-sample gradients by a loop, not vmap) and, for ``"mc"``, ``mc_samples``
        and ``seed``."""
        meta = super().meta()
        graphs = self._graphs or []
        meta.update(fisher=self.kind, gradients_kept=sum(g.rows for g in graphs if g.gradients is not None),
                    gradient_rows=sum(g.rows for g in graphs) if graphs else None,
                    per_sample_loop=self.sample_gradients.loop)
        if self.kind == "mc":
            meta.update(mc_samples=self.mc_samples, seed=self.seed)
        return meta


class EmpiricalFisherOperator(FisherOperator):
    """The empirical Fisher ``F = (1/C) sum_i g_i g_i^T`` of the true targets; see :class:`FisherOperator`."""

    curvature = "empirical_fisher"
    kind = "empirical"

    @staticmethod
    def functional_product(fn: ModelFunction, params: tuple, batch, v: tuple, reverse: bool = False) -> tuple:
        """``sum_{i in batch} g_i (g_i . v)`` with torch.func (vmap over the samples; composable with vmap)."""
        inputs, targets = batch
        if _data.batch_size(batch) == 1:   # one sample (the Hessian variance's products): no inner vmap
            grads = torch.func.grad(lambda p: fn.batch_loss(p, batch))(params)
            dot = sum((g * t).sum() for g, t in zip(grads, v))
            return tuple(dot * g for g in grads)
        grads = torch.func.vmap(lambda x, y: sample_gradient(fn, params, x, y))(inputs, targets)
        dots = sum((g * t).reshape(g.shape[0], -1).sum(1) for g, t in zip(grads, v))
        return tuple((dots.view(-1, *[1] * (g.dim() - 1)) * g).sum(0) for g in grads)


class MonteCarloFisherOperator(FisherOperator):
    """The Monte-Carlo Fisher ``F = (1/(C k)) sum_i sum_s g_is g_is^T`` of targets drawn from the model.

    The k = ``mc_samples`` draws of every sample are made once, at construction, by
    :meth:`hessfast.losses.Loss.sample` with a generator seeded by ``seed`` (plus the rank in a
    distributed run), batch after batch in the order of the data; targets a loss ignores
    (``ignore_index``) stay ignored. See :class:`FisherOperator`.
    """

    curvature = "fisher"
    kind = "mc"

    def __init__(self, model, data, **kwargs):
        if kwargs.get("hvp_mode", "auto") == "forward":
            raise ValueError("the Monte-Carlo Fisher keeps its drawn targets with the batches, which forward mode "
                             "does not read; use hvp_mode='auto' (per-sample gradients).")
        super().__init__(model, data, **kwargs)

    def drawn_targets(self) -> list:
        """The drawn targets, one list of k tensors (n, ...) per batch, in the order of the data."""
        return [list(g.targets) for g in (self._graphs or [])]

    def draw_targets(self, inputs: Any, targets: torch.Tensor) -> list:
        """k targets drawn from the model's predictive distribution at the point w, (n, ...) each."""
        loss = self.fn.loss
        if isinstance(loss, CallableLoss) or type(loss).sample is Loss.sample:
            raise ValueError(f"kind='mc' draws targets from the model's predictive distribution, which the loss "
                             f"{loss!r} cannot sample (it has no sample()). Pass a hessfast.losses built-in "
                             "(cross_entropy(), mse(), bce_with_logits(), causal_lm(), ...), implement "
                             "Loss.sample, or use kind='empirical'.")
        if self._generator is None:
            rank = 0 if self.dist is None else int(self.dist.rank)
            self._generator = torch.Generator(device=self.device).manual_seed(int(self.seed) + 1_000_003 * rank)
        with torch.no_grad():
            logits = self.fn.forward(self.fn.params, inputs)
        return [loss.sample(logits, targets=targets, generator=self._generator).to(targets.device)
                for _ in range(self.mc_samples)]
