"""Hessian (or GGN) variance over the samples of a data set: Algorithm 1 of the paper (Section 8.2).

Write ``C_i`` for the curvature of sample i's loss (Hessian ``H_i`` or GGN ``G_i``), ``Cbar = (1/n) sum_i C_i``
for the curvature of the mean loss over the n samples used, and v for a unit probe (||v|| = 1). From
the per-sample products ``u_i = C_i v`` the streamed sums ``sum_i ||u_i||^2``, ``sum_i u_i`` and
``sum_i v . u_i`` give, per probe:

* ``algorithm1 = (1/n) sum_i ||C_i v||^2 - (v^T Cbar v)^2``: Algorithm 1 with the 1/n its line 6 omits
  (as printed, ``sum_i`` without 1/n, it grows with the data-set size; kept as ``algorithm1_printed``).
* ``centred = (1/n) sum_i ||(C_i - Cbar) v||^2 = (1/n) sum_i ||C_i v||^2 - ||Cbar v||^2``. Algorithm 1 subtracts
  ``(v^T Cbar v)^2 <= ||Cbar v||^2`` instead, so it over-estimates by ``||Cbar v||^2 - (v^T Cbar v)^2``, the
  squared part of ``Cbar v`` orthogonal to v.
* ``sigma2 = centred / P``, the per-element variance ``(1/n) sum_i ||C_i - Cbar||_F^2 / P^2``: for v uniform
  on the unit sphere ``E ||A v||^2 = ||A||_F^2 / P``, so ``E[centred] = (1/n) sum_i ||C_i - Cbar||_F^2 / P``, and
  a P x P matrix has P^2 elements (``docs/theory.md``, ``docs/variance.md``). With a full orthonormal
  basis of probes the mean over probes is exact.

``sigma2`` is the ``sigma2`` argument of :func:`hessfast.theory.batch_extremes` (Theorem 4).
``sigma2_unbiased = sigma2 n / (n - 1)`` is the same with the ``1/(n-1)`` normalisation under which
:func:`hessfast.theory.effective_batch` makes ``sigma2 / b`` the exact element variance of a batch of
B drawn without replacement; :func:`hessfast.predict` uses it.
"""
from __future__ import annotations

import itertools
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed as _distributed
from ._version import __version__
from .engine import probe_vectors
from .operators import ModelFunction, ghost, operator_class, per_sample
from .operators.fsdp import check_unsharded
from .operators.per_sample import PerSampleProducts, VmapUnsupported
from .utils import data as _data
from .utils.model_state import curvature_mode
from .utils.serialization import jsonable

ROUTES = ("auto", "vmap", "ghost", "loop")


# ---------------------------------------------------------------------------------- result
@dataclass
class HessianVariance:
    """Result of :func:`hessian_variance`. Scalars are means over the probes; ``per_probe`` holds (R,) arrays.

    Attributes:
        algorithm1: Algorithm 1 with the 1/n fix, ``(1/n) sum_i ||C_i v||^2 - (v^T Cbar v)^2``.
        algorithm1_printed: Algorithm 1 as printed (no 1/n): ``sum_i ||C_i v||^2 - (v^T Cbar v)^2``.
        centred: ``(1/n) sum_i ||(C_i - Cbar) v||^2``; its expectation is ``(1/n) sum_i ||C_i - Cbar||_F^2 / P``.
        sigma2: per-element variance ``centred / P`` (``(1/n) sum_i ||C_i - Cbar||_F^2 / P^2``).
        sigma2_unbiased: ``sigma2 n / (n - 1)``.
        sigma2_stderr, centred_stderr, algorithm1_stderr: standard errors over the probes
            (std with ddof=1 / sqrt(R); NaN for one probe; not a sampling error for an orthonormal basis).
        quadratic: ``v^T Cbar v`` (its mean times P estimates the trace of Cbar).
        N: samples used (n); ``N_total`` samples in the data; P: parameters.
    """

    curvature: str
    N: int
    N_total: int
    P: int
    num_probes: int
    algorithm1: float
    algorithm1_printed: float
    centred: float
    sigma2: float
    sigma2_unbiased: float
    sigma2_stderr: float
    centred_stderr: float
    algorithm1_stderr: float
    quadratic: float
    per_probe: dict = field(repr=False)
    meta: dict = field(repr=False, default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["per_probe"] = {k: np.asarray(v).tolist() for k, v in self.per_probe.items()}
        return jsonable(d)

    def __repr__(self) -> str:
        sub = f" of {self.N_total:,}" if self.N != self.N_total else ""
        return "\n".join([
            f"hessfast.HessianVariance of the {self.curvature} (route={self.meta.get('route')!r})",
            f"  P = {self.P:,}   N = {self.N:,}{sub}   probes = {self.num_probes}",
            f"  sigma2 (per element)   = {self.sigma2:.6g} +- {self.sigma2_stderr:.2g}",
            f"  centred  mean ||(C_i - Cbar) v||^2 = {self.centred:.6g}",
            f"  Algorithm 1 (with 1/N) = {self.algorithm1:.6g} +- {self.algorithm1_stderr:.2g}",
            f"  time = {self.meta.get('elapsed', float('nan')):.2f} s",
        ])


# ---------------------------------------------------------------------------------- the streamed sums
class _Sums:
    """Streamed sums over samples for R probes: sum_sq (R,), sum_u (R, P), sum_vu (R,), count.

    The one place where per-sample products meet the squared-HVP accumulation of
    :class:`hessfast.kernels.SquaredHVPAccumulator` (``backend`` picks its implementation; the
    pure-PyTorch reference is ``backend="torch"``). The ghost route adds its sums directly.
    """

    def __init__(self, V: torch.Tensor, backend: str = "auto"):
        from .kernels import SquaredHVPAccumulator

        self.V = V
        self.acc = SquaredHVPAccumulator(V.shape[0], V.shape[1], dtype=V.dtype, device=V.device, backend=backend)

    def update(self, U: torch.Tensor) -> None:
        """Add c per-sample products U (c, R, P)."""
        self.acc.update(U, self.V)

    def add(self, sum_sq: torch.Tensor, sum_u: torch.Tensor, sum_vu: torch.Tensor, count: int) -> None:
        self.acc.sum_sq += sum_sq
        self.acc.sum_u += sum_u
        self.acc.sum_vu += sum_vu
        self.acc.count += count


# ---------------------------------------------------------------------------------- the route
class _Route:
    """The per-sample products of one ``hessian_variance`` call: the route that runs and its objects.

    ``fn``: the :class:`ModelFunction`; ``curvature``: the operator class; ``name``: ``"vmap"``,
    ``"ghost"`` or ``"loop"``.
    """

    def __init__(self, fn: ModelFunction, curvature: type, route: str):
        reason = ghost.unsupported_reason(fn, curvature)
        if route == "ghost" and reason is not None:
            raise ValueError(f"route='ghost' cannot be used for this model: {reason}. Use route='vmap' (any model).")
        self.fn, self.curvature, self.requested = fn, curvature, route
        self.name = route if route != "auto" else ("ghost" if reason is None else "vmap")
        self.ghost = ghost.GhostSums(fn, curvature) if self.name == "ghost" else None
        self.products = PerSampleProducts(fn, curvature)
        self.terms = 0.0   # loss terms of the samples added (float64 tensor once a chunk is added)

    def auto_chunk(self, batch, R: int) -> int:
        """Samples per call: ghost, from the layer sizes seen on ``batch``; vmap and loop, from R and P."""
        if self.ghost is not None:
            return ghost.auto_chunk(self.fn, self.curvature, batch, R)
        return per_sample.auto_chunk(R, self.fn.P, self.fn.dtype, self.fn.device)

    def add(self, sums: _Sums, part, Vs: tuple) -> None:
        """Add the samples of one chunk to ``sums``."""
        n = _data.batch_size(part)
        self.terms = self.terms + self.fn.term_count(part)
        if self.ghost is not None:
            sums.add(*self.ghost(part, sums.V), n)
            return
        if self.name == "vmap":
            try:
                sums.update(self.products.vmap_products(part, Vs))
                return
            except VmapUnsupported as err:
                if self.requested == "vmap":
                    raise ValueError(f"route='vmap' cannot batch this model over its samples: its forward pass "
                                     f"branches on the data ({err}); e.g. Hugging Face attention masks. Use "
                                     "route='loop' (one sample at a time, any model) or route='auto'.") from err
                warnings.warn("hessian_variance: the model's forward pass branches on its data (e.g. an attention "
                              "mask), so vmap cannot batch it over samples; using route='loop'.", UserWarning,
                              stacklevel=4)
                self.name = "loop"
        sums.update(self.products.loop_products(part, Vs))

    def rescale(self, sums: _Sums, n: int, terms: float) -> None:
        """Per-sample products of ``s_i`` to those of ``l_i = (n / C) s_i`` (hessfast.operators.functional)."""
        if n > 0 and not terms > 0:
            raise ValueError(f"the {n} samples hold no loss terms (every target ignored?); the mean loss of "
                             f"{self.fn.loss!r} is undefined.")
        a = n / terms if n > 0 else 1.0
        if a != 1.0:
            sums.acc.sum_sq *= a * a
            sums.acc.sum_u *= a
            sums.acc.sum_vu *= a


# ---------------------------------------------------------------------------------- data
def _subset_batches(fn: ModelFunction, max_samples: Optional[int], seed: Optional[int]):
    """(iterator of prepared batches, samples used, samples in the data)."""
    if max_samples is None:
        return fn.batches(), None, None
    total = fn.count_samples()
    if max_samples >= total:
        return fn.batches(), total, total
    return _kept_batches(fn, _subset_rows(total, max_samples, seed)), max_samples, total


def _subset_rows(total: int, max_samples: int, seed: Optional[int]) -> torch.Tensor:
    """Sorted indices of the seeded subset of ``max_samples`` of ``total`` samples (without replacement)."""
    gen = torch.Generator().manual_seed(int(seed) if seed is not None else 0)
    return torch.randperm(total, generator=gen)[:max_samples].sort().values


def _kept_batches(fn: ModelFunction, keep: torch.Tensor):
    """The prepared batches of ``fn``'s data restricted to the sorted sample indices ``keep``."""
    start = 0
    for batch in fn.batches():
        n = _data.batch_size(batch)
        lo, hi = torch.searchsorted(keep, torch.tensor([start, start + n]))
        if hi > lo:
            yield _data.select_rows(batch, keep[lo:hi] - start)
        start += n


# ---------------------------------------------------------------------------------- public function
def hessian_variance(model: nn.Module, data: Any, *, curvature: str = "hessian", num_probes: int = 4,
                     probes: Optional[torch.Tensor] = None, route: str = "auto", chunk_size: Optional[int] = None,
                     max_samples: Optional[int] = None, seed: Optional[int] = 0, loss_fn: Optional[Callable] = None,
                     bn_mode: str = "eval", dtype: Optional[torch.dtype] = None, backend: str = "auto",
                     progress: Optional[bool] = None, distributed: Any = None) -> HessianVariance:
    """Variance of the per-sample Hessian (or GGN) over the data: Algorithm 1 (Section 8.2), fixed and centred.

    For every sample i and probe v the product ``C_i v`` enters streamed sums over the samples
    (module docstring). Routes:

    * ``"vmap"``: ``C_i v`` for a chunk of samples at once with ``torch.func.vmap`` (over samples and
      probes), forward-over-reverse (reverse-over-reverse where a loss has no vmap-able rule), summed
      by the squared-HVP accumulation of ``hessfast.kernels``; any model.
    * ``"ghost"``: ``||C_i v||^2`` from per-sample-gradient-norm identities of Linear and Conv2d layers
      in one backward pass per probe, with no per-sample vector (``hessfast/operators/ghost.py``,
      ``docs/variance.md``); every trainable parameter must sit in such a layer. Hessian: a forward
      pass and a recorded backward pass shared by the probes, then per probe a second backward pass
      that also yields the layers' forward-mode tangents; GGN: ``u_i = J_i v`` (dual numbers for one
      probe, the double-vjp trick on a shared forward pass for several), then per probe one backward
      pass of the pseudo-loss ``sum_i (H_out,i u_i) . f_i``. Each probe costs about one full-data
      curvature-vector product.
    * ``"auto"`` (default): ``"ghost"`` where it covers the model, else ``"vmap"``.
    * ``"loop"``: a Python loop of per-sample products (reference and benchmark baseline; slow).

    Args:
        model: an ``nn.Module``; never modified.
        data: one ``(inputs, targets)`` batch or an iterable of batches (e.g. a ``DataLoader``).
        curvature: ``"hessian"`` or ``"ggn"``.
        num_probes: R random unit probes (Gaussian, normalised); ignored when ``probes`` is given. The
            cost grows by about one full-data product per probe; the default 4 gives a standard error
            with three degrees of freedom (one probe gives none: ``sigma2_stderr`` is NaN).
        probes: explicit probes (R, P); rows are normalised. A full orthonormal basis (R = P) makes the
            probe mean exact.
        route: ``"auto"``, ``"vmap"``, ``"ghost"`` or ``"loop"``.
        chunk_size: samples per call (every route); loader batches are merged into, or split to,
            chunks of this size. Default: vmap, the (c, R, P) products in 1/8 of free memory and on CPU
            <= 16 MiB; ghost, an estimate from the layer sizes (1/8 of free memory, on CPU ~128 MiB).
        max_samples: use a random subset of this many samples, drawn without replacement with ``seed``.
        seed: seeds the probes and the subset.
        loss_fn: ``loss_fn(outputs, targets)``, mean or sum reduction, a sum of per-sample terms;
            default cross-entropy.
        bn_mode: ``"eval"`` only for models with batch norm. With batch statistics (``"train"``) a
            sample's loss depends on the other samples of its batch, so a per-sample curvature is not
            defined; a ``ValueError`` says so. For models without batch norm both are the same.
        dtype: compute dtype (e.g. ``torch.float64``); default the model's.
        backend: implementation of the streamed accumulation (vmap and loop routes): ``"auto"``,
            ``"torch"`` (pure-PyTorch reference), ``"cpu"``, ``"cuda"``, ``"triton"`` (``hessfast.kernels``).
        progress: tqdm bar over the samples; default on in a terminal (rank 0 only when distributed).
        distributed: ``None`` (use the torch.distributed process group when one is initialised), ``True``,
            ``False`` or a ``ProcessGroup``, as in :func:`hessfast.lanczos`. Each rank's ``data`` is then its
            shard (any sizes, an empty shard included); the streamed sums are all-reduced, so every rank
            returns the same result, equal (up to the order of floating-point additions) to a single
            process on the concatenation of the shards in rank order. Every rank must pass the same
            model, arguments and seed (with ``seed=None`` rank 0 draws the probe seed); ``max_samples``
            draws the single-process subset of that concatenation (the shard sizes are gathered first).
            Automatic chunk sizes are the smallest over the ranks. ``meta`` gains ``world_size`` and
            ``rank_samples`` (samples used per rank).

    Returns:
        :class:`HessianVariance`.
    """
    start = time.perf_counter()
    _check_arguments(model, route, bn_mode, max_samples, chunk_size)
    ctx = _distributed.context(distributed)
    # the model function holds no process group: the collectives below go through ctx
    fn = ModelFunction(model, data, loss_fn=loss_fn, bn_mode="eval" if bn_mode == "train" else bn_mode, dtype=dtype)
    curv = operator_class(curvature)
    if not curv.has_functional_product():
        raise ValueError(f"curvature={curvature!r} has no per-sample product C_i v, which the Hessian variance needs "
                         "(the Monte-Carlo Fisher's drawn targets belong to its operator). Use curvature='ggn' (the "
                         "exact Fisher of cross-entropy and MSE) or 'empirical_fisher'.")
    V = unit_probes(fn.P, num_probes, probes, seed if ctx is None else ctx.common_seed(seed), fn.dtype, fn.device)
    R = V.shape[0]
    plan = _Route(fn, curv, route)
    chunk = chunk_size or (None if plan.name == "ghost" or ctx is not None else plan.auto_chunk(None, R))

    sums = _Sums(V, backend)
    Vs = fn.unflatten(sums.V)
    desc = f"hessfast: variance ({curv.curvature})"
    hide = None if progress is None else not progress
    with curvature_mode(fn.model, fn.bn_mode, math_attention=True):
        if ctx is None:
            batches, n_used, n_total = _subset_batches(fn, max_samples, seed)
            if chunk is None:  # ghost: from the layer sizes seen on the first batch
                batches = iter(batches)
                first = next(batches, None)
                chunk = plan.auto_chunk(first, R) if first is not None else 1
                batches = itertools.chain([] if first is None else [first], batches)
            _stream(plan, sums, Vs, batches, chunk, n_used, desc, hide)
            dist_meta = {}
        else:
            batches, n_used, n_total, chunk, bar_total, dist_meta = _shard_plan(
                plan, ctx, sums.V, max_samples, seed, chunk, R)
            ctx.guard(lambda: _stream(plan, sums, Vs, batches, chunk, bar_total, desc,
                                      True if not ctx.is_main else hide),
                      "streaming its samples for the Hessian variance")
            dist_meta["rank_samples"] = [int(c) for c in ctx.all_gather_small(
                torch.tensor([float(sums.acc.count)], dtype=torch.float64))[:, 0].tolist()]
            _distributed.all_reduce_state(sums.acc, ctx)
            plan.terms = float(ctx.all_gather_small(torch.tensor([float(plan.terms)], dtype=torch.float64))[:, 0].sum())
            if sums.acc.count == 0:
                raise ValueError(f"every rank's data shard is empty (world size {ctx.world_size}); "
                                 "there are no samples to average over.")
    n = sums.acc.count
    plan.rescale(sums, n, float(plan.terms))
    if n_total is None:
        n_total = n
    if not all(torch.isfinite(t).all() for t in (sums.acc.sum_sq, sums.acc.sum_vu, sums.acc.sum_u)):
        raise FloatingPointError("a per-sample curvature product returned NaN or Inf; check the loss and the data "
                                 "at these weights, or use dtype=torch.float64.")
    res = _summarise(fn, curv.curvature, sums, n, n_total, plan.name, chunk, seed, start)
    res.meta.update(world_size=1 if ctx is None else ctx.world_size, loss=repr(fn.loss), loss_terms=float(plan.terms),
                    dropout="off")
    res.meta.update(dist_meta)
    return res


def _check_arguments(model, route: str, bn_mode: str, max_samples, chunk_size) -> None:
    check_unsharded(model, "hessian_variance")
    if route not in ROUTES:
        raise ValueError(f"unknown route {route!r}; choose one of {ROUTES}.")
    if bn_mode == "train" and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise ValueError(
            "hessian_variance needs bn_mode='eval' for a model with batch norm: with batch statistics "
            "(bn_mode='train') a sample's loss, hence its Hessian, depends on the other samples of its batch, so "
            "the per-sample curvature C_i is not defined. Use bn_mode='eval' (running statistics).")
    for name, value in (("max_samples", max_samples), ("chunk_size", chunk_size)):
        if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
            raise ValueError(f"{name} must be a positive integer or None, got {value!r}.")


def _stream(route: _Route, sums: _Sums, Vs: tuple, batches, chunk: int, total: Optional[int], desc: str,
            hide: Optional[bool]) -> None:
    """Add every sample of ``batches`` (regrouped into chunks of ``chunk``) to ``sums``."""
    bar = tqdm(total=total, desc=desc, unit="sample", disable=hide, leave=False)
    try:
        for part in _data.rechunk(batches, chunk):
            route.add(sums, part, Vs)
            bar.update(_data.batch_size(part))
    finally:
        bar.close()


def _shard_plan(route: _Route, ctx, V: torch.Tensor, max_samples: Optional[int], seed: Optional[int],
                chunk: Optional[int], R: int):
    """This rank's part of a distributed variance run, agreed with the other ranks.

    Every rank reads its shard (guarded: a failure stops all ranks), then one all-gather of a few
    numbers per rank checks that the ranks hold the same model and probes, gives the shard sizes
    (for ``max_samples``: the global offset of this rank's shard) and makes the automatic chunk size
    the smallest over the ranks, so every rank reports the same result.

    Returns (batches, samples used or None, samples in the data or None, chunk, local bar total, meta).
    """
    fn = route.fn
    state = {}

    def local():
        empty = fn.is_empty()
        state["empty"] = empty
        n_local = fn.count_samples() if max_samples is not None and not empty else 0
        local_chunk = chunk
        if local_chunk is None and route.name == "ghost" and not empty:
            it = fn.batches()
            first = next(it)
            local_chunk = route.auto_chunk(first, R)
            if max_samples is None:  # reuse the batch already read
                state["batches"] = itertools.chain([first], it)
        elif local_chunk is None and route.name != "ghost":
            local_chunk = route.auto_chunk(None, R)
        return n_local, local_chunk

    n_local, local_chunk = ctx.guard(local, "reading its data shard for the Hessian variance")
    w_sum, w_sq = fn.fingerprint()
    Vd = V.double()
    mix = torch.linspace(-1.0, 1.0, Vd.shape[1], dtype=torch.float64, device=Vd.device)
    mine = torch.tensor([float(n_local), float(fn.P), w_sum, w_sq, float(Vd.sum()),
                         float((Vd * mix).sum()), float(local_chunk or 0), float(state["empty"])],
                        dtype=torch.float64)
    rows = ctx.all_gather_small(mine)
    ctx.check_agreement(rows, P_col=1, empty_col=7, same={
        (2, 4): "the model's weights (sum and sum of squares of the parameters)",
        (4, 6): "the probes (pass the same probes, or the same seed, on every rank)"})
    if chunk is None:  # the smallest automatic chunk of the ranks that have data
        chunks = [int(c) for c, e in zip(rows[:, 6].tolist(), rows[:, 7].tolist()) if not e and c > 0]
        chunk = min(chunks) if chunks else 1
    if max_samples is None:
        batches = iter(()) if state["empty"] else (state.get("batches") or fn.batches())
        return batches, None, None, chunk, None, {}
    counts = [int(c) for c in rows[:, 0].tolist()]
    total, offset = sum(counts), sum(counts[:ctx.rank])
    if max_samples >= total:
        return iter(()) if state["empty"] else fn.batches(), total, total, chunk, n_local, {}
    keep = _subset_rows(total, max_samples, seed)  # the single-process subset of the concatenated shards
    mine_rows = keep[(keep >= offset) & (keep < offset + n_local)] - offset
    batches = _kept_batches(fn, mine_rows) if len(mine_rows) else iter(())
    return batches, max_samples, total, chunk, len(mine_rows), {}


def unit_probes(P: int, num_probes: int, probes: Optional[torch.Tensor], seed: Optional[int],
                dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The (R, P) unit probes of :func:`hessian_variance` in ``dtype``: ``probes`` normalised row by row,
    or ``num_probes`` seeded Gaussian directions (:func:`hessfast.engine.probe_vectors`, drawn in float64)."""
    if probes is None:
        if isinstance(num_probes, bool) or not isinstance(num_probes, (int, np.integer)) or num_probes < 1:
            raise ValueError(f"num_probes must be a positive integer, got {num_probes!r}.")
        V = probe_vectors(int(num_probes), P, seed, torch.float64, device)
    else:
        V = torch.as_tensor(probes).to(device=device, dtype=torch.float64)
        if V.dim() == 1:
            V = V[None]
        if V.dim() != 2 or V.shape[1] != P or V.shape[0] < 1:
            raise ValueError(f"probes must have shape (R, P) with P={P}, got {tuple(V.shape)}.")
    norms = torch.linalg.vector_norm(V, dim=1, keepdim=True)
    if not bool((norms > 0).all()):
        raise ValueError("a probe vector is zero; probes must be non-zero (they are normalised to unit length).")
    return (V / norms).to(dtype)


def _summarise(fn: ModelFunction, curvature: str, sums: _Sums, n: int, n_total: int, route: str, chunk: int, seed,
               start: float) -> HessianVariance:
    P, R = fn.P, sums.V.shape[0]
    mean_sq = (sums.acc.sum_sq / n).cpu().numpy()
    quad = (sums.acc.sum_vu / n).cpu().numpy()
    mean_u = sums.acc.sum_u.double() / n
    hbar_sq = (mean_u * mean_u).sum(1).cpu().numpy()
    alg1 = mean_sq - quad ** 2
    centred = mean_sq - hbar_sq
    sigma2 = centred / P

    def se(x):
        return float(np.std(x, ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")

    per_probe = {"mean_sq": mean_sq, "quadratic": quad, "mean_product_sq": hbar_sq, "algorithm1": alg1,
                 "centred": centred, "sigma2": sigma2}
    s2 = float(sigma2.mean())
    meta = {"route": route, "chunk_size": chunk, "seed": seed,
            "dtype": str(fn.dtype).replace("torch.", ""), "device": str(fn.device), "bn_mode": fn.bn_mode,
            "elapsed": time.perf_counter() - start, "hessfast_version": __version__,
            "torch_version": torch.__version__}
    return HessianVariance(
        curvature=curvature, N=int(n), N_total=int(n_total), P=int(P), num_probes=int(R),
        algorithm1=float(alg1.mean()), algorithm1_printed=float((sums.acc.sum_sq.cpu().numpy() - quad ** 2).mean()),
        centred=float(centred.mean()), sigma2=s2, sigma2_unbiased=s2 * n / (n - 1) if n > 1 else float("nan"),
        sigma2_stderr=se(sigma2), centred_stderr=se(centred), algorithm1_stderr=se(alg1),
        quadratic=float(quad.mean()), per_probe=per_probe, meta=meta)
