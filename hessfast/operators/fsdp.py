"""Curvature of FSDP2-sharded models: shard-local finite-difference products of FSDP's own gradients.

A model sharded with ``torch.distributed.fsdp.fully_shard`` holds on rank r only the local shard
w_r of every parameter (a ``DTensor`` placed ``Shard(0)``), and ``create_graph=True`` does not pass
through FSDP's hooks, so there is no double backward. A Hessian-vector product is the central
difference of the gradients of the mean loss R (eq. 2 of the paper; the mean over all loss terms
of all ranks' data, :mod:`hessfast.losses`):

    H v ~= (g(w + h v) - g(w - h v)) / (2 h),    g = grad R,

where every rank moves its own shards, w_r <- w_r +- h v_r, and one FSDP forward and backward over
every rank's batches leaves on rank r the shard g_r of the gradient (FSDP's reduce-scatter). So a
Lanczos vector never exists whole: rank r keeps the concatenation v_r of its parameter shards
(:class:`ShardLayout`), the product is shard-local, and every inner product is an all-reduce of the
ranks' local dot products (:mod:`hessfast.engine.param_sharded`).

Exact weighting: FSDP averages the ranks' gradients (it divides the reduce-scatter sum by the
world size R), so each rank back-propagates ``s_b * R / C`` for each of its batches b (s_b the sum of
the batch's loss terms, C their number over all ranks); the sharded gradient is then exactly
``(1 / C) sum_b grad s_b`` whatever the ranks' batch counts, empty shards included. FSDP's
collectives need every rank to run the same number of forward and backward passes, so a rank with
fewer batches runs the missing ones on a stand-in batch with weight 0.

Precision: the gradients are subtracted in float64 (one parameter at a time); the step h is
:func:`.finite_difference.fd_step`'s for the lowest precision the model computes in (bfloat16 for a
``MixedPrecisionPolicy(param_dtype=torch.bfloat16)`` or bfloat16 shards), and the first product
is also taken at 2h: the difference of the two, per unit of ||v||, is the noise floor ``meta()["fd_noise"]`` of the products (truncation
and rounding together), which :meth:`FSDPOperator.check_noise` compares with |lambda|_max.

The model is left as it was: the shards are restored from a saved copy (never by subtracting h v),
``.grad`` entries are put back as they were (the same tensors), train / eval flags restored.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from .. import distributed as _distributed
from ..losses import as_loss
from ..utils import data as _data
from ..utils.model_state import DROPOUT, check_bn_mode, curvature_mode
from .linear import SymmetricOperator

NOISE_WARN = 0.05   # warn when the noise floor exceeds this fraction of |lambda|_max
_HALF = (torch.float16, torch.bfloat16)


def unwrap_ddp(model: Any) -> Any:
    """The module inside a ``DistributedDataParallel`` wrapper (every rank holds the whole model), else ``model``."""
    ddp = getattr(nn.parallel, "DistributedDataParallel", None)
    return model.module if ddp is not None and isinstance(model, ddp) else model


def is_fsdp_model(model: Any) -> bool:
    """True when ``model`` is an ``nn.Module`` whose trainable parameters are DTensors (FSDP2 ``fully_shard``)."""
    if not isinstance(model, nn.Module):
        return False
    return any(p.requires_grad and _is_dtensor(p) for p in model.parameters())


def check_unsharded(model: Any, what: str) -> None:
    """Raise a ValueError naming ``what`` when ``model`` is FSDP2-sharded: for analyses built on per-sample
    products (``hessian_variance``), which finite differences of FSDP's batch gradients cannot give."""
    if is_fsdp_model(unwrap_ddp(model)):
        raise ValueError(f"{what}: per-sample curvature products are not supported for FSDP2-sharded models (their "
                         "products are finite differences of FSDP's whole-batch gradients). Use hessfast.lanczos for "
                         "the spectrum, or run this on an unsharded copy of the model (e.g. its full state dict "
                         "loaded into the unwrapped model on one rank).")


def _is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "to_local") and hasattr(t, "placements") and hasattr(t, "device_mesh")


class ShardLayout:
    """Where each rank's local vector sits in the global flat vector of P parameters.

    The global vector concatenates the trainable parameters in ``named_parameters`` order (the
    order of a single-process run). A parameter of shape (d0, ...) placed ``Shard(0)`` over R ranks
    keeps rows [r k, min((r + 1) k, d0)) on rank r, k = ceil(d0 / R) (``torch.chunk``); rank r's
    local vector is the concatenation of those row blocks, c_r = :attr:`sizes` [r] entries.

    Args:
        shapes: the global shapes of the parameters. rank, world: this rank and the mesh size.
    """

    def __init__(self, shapes: list, rank: int, world: int):
        self.rank, self.world = int(rank), int(world)
        self.P = int(sum(math.prod(s) for s in shapes))
        self.ranges = [[] for _ in range(world)]   # per rank: (global start, global stop) per parameter
        self.rows = []                             # this rank's rows per parameter
        offset = 0
        for shape in shapes:
            d0 = int(shape[0])
            rest = math.prod(shape[1:])
            k = -(-d0 // world)
            for r in range(world):
                lo, hi = min(r * k, d0), min((r + 1) * k, d0)
                self.ranges[r].append((offset + lo * rest, offset + hi * rest))
                if r == rank:
                    self.rows.append(hi - lo)
            offset += d0 * rest
        self.sizes = [sum(b - a for a, b in rr) for rr in self.ranges]
        self.c = self.sizes[rank]

    def local(self, V: torch.Tensor) -> torch.Tensor:
        """This rank's entries (..., c) of full vectors V (..., P)."""
        parts = [V[..., a:b] for a, b in self.ranges[self.rank]]
        return torch.cat(parts, -1) if parts else V[..., :0]

    def full(self, X: torch.Tensor, ctx) -> torch.Tensor:
        """Full vectors (n, P) from every rank's local rows X (n, c_r): one all-gather (padded to max c_r)."""
        n, cmax = X.shape[0], max(self.sizes)
        padded = torch.zeros(n, cmax, dtype=X.dtype, device=X.device)
        padded[:, :X.shape[1]] = X
        gathered = ctx.all_gather_small(padded).to(X.device)          # (R, n, cmax)
        out = torch.zeros(n, self.P, dtype=X.dtype, device=X.device)
        for r in range(self.world):
            pos = 0
            for a, b in self.ranges[r]:
                out[:, a:b] = gathered[r, :, pos:pos + b - a]
                pos += b - a
        return out


def _context(model_params: list, distributed: Any):
    """The DistContext of the FSDP mesh (world size 1 included), checked against ``distributed``."""
    mesh = model_params[0].device_mesh
    if mesh.ndim != 1:
        raise ValueError(f"hessfast supports FSDP2 models sharded over a 1-D device mesh; this model's mesh has "
                         f"{mesh.ndim} dimensions (HSDP). Shard with fully_shard(module, mesh=init_device_mesh("
                         f"device, (world_size,))).")
    for p in model_params:
        if any(type(pl).__name__ != "Shard" or getattr(pl, "dim", 0) != 0 for pl in p.placements):
            raise ValueError(f"hessfast needs every FSDP2 parameter placed Shard(0) (fully_shard's default); got "
                             f"{p.placements}. Use fully_shard without a custom shard_placement_fn.")
    group = mesh.get_group()
    ctx = _distributed.context(distributed if distributed not in (None, True) else group)
    if ctx is None:                                 # one rank: still a process group, for NCCL and CUDA paths
        ctx = _distributed.DistContext(group, dist.get_rank(group), dist.get_world_size(group),
                                       str(dist.get_backend(group)).lower())
    if ctx.world_size != mesh.size():
        raise ValueError(f"the process group has {ctx.world_size} ranks but the model is sharded over {mesh.size()}; "
                         "pass distributed=None (the model's own mesh) or the mesh's process group.")
    return ctx


class FSDPOperator(SymmetricOperator):
    """The Hessian of an FSDP2-sharded model's mean loss over all ranks' data, by shard-local finite differences.

    Built by :func:`hessfast.lanczos` for a model with DTensor parameters; arguments as
    :class:`~hessfast.operators.CurvatureOperator` (``data`` is this rank's shard, possibly empty).
    Only ``curvature="hessian"``, ``hvp_mode="fd"`` (or ``"auto"``) and ``bn_mode="eval"`` exist
    here. ``dtype`` is the dtype of the Lanczos vectors (default the shards' dtype, float32 for
    half-precision shards); the forward passes run at the model's own precision.

    Shapes: :meth:`local_matmat` maps this rank's local rows (b, c) to the local rows of the
    products (b, c) (c = :attr:`shard_layout` .c); :meth:`matvec` (P,) -> (P,) and :meth:`matmat`
    (b, P) -> (b, P) take and return full vectors (all-gathered; for tests and small models).
    """

    curvature = "hessian"

    def __init__(self, model: nn.Module, data: Any, *, curvature: Optional[str] = None,
                 loss_fn: Optional[Callable] = None, bn_mode: str = "eval", dtype: Optional[torch.dtype] = None,
                 hvp_mode: str = "auto", cache_graph: Any = "auto", progress: bool = False, distributed: Any = None,
                 compile: Any = False):
        self._check_options(curvature, bn_mode, hvp_mode, cache_graph)
        if compile not in (False, None, "auto"):
            raise ValueError("compile=True is not available for FSDP2-sharded models (the products are FSDP's own "
                             "forward and backward passes); compile the model's blocks before fully_shard instead.")
        self.model, self.loss_fn = model, loss_fn
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters (none has requires_grad=True).")
        plain = [n for n, p in named if not _is_dtensor(p)]
        if plain:
            raise ValueError(f"parameters {plain[:3]} are not sharded while the others are: call fully_shard on "
                             "the root module too (fully_shard(model)) so that every parameter is a DTensor.")
        scalars = [n for n, p in named if p.dim() == 0]
        if scalars:
            raise ValueError(f"parameters {scalars[:3]} are 0-dimensional; FSDP2 shards parameters on dim 0, so give "
                             "them shape (1,) (e.g. nn.Parameter(torch.ones(1))) or freeze them.")
        self.names, self.params = [n for n, _ in named], [p for _, p in named]
        self.dist = _context(self.params, distributed)
        self.shard_layout = ShardLayout([tuple(p.shape) for p in self.params], self.dist.rank, self.dist.world_size)
        own = [p.to_local().shape[0] for p in self.params]
        if own != self.shard_layout.rows:
            raise ValueError(f"the local shards' rows {own} are not torch.chunk's {self.shard_layout.rows}; "
                             "hessfast supports fully_shard's default even sharding on dim 0.")
        self.shard_dtype = self.params[0].dtype
        self.device = self.params[0].to_local().device
        self.dtype = dtype or (torch.float32 if self.shard_dtype in _HALF else self.shard_dtype)
        self.loss = as_loss(loss_fn).to(dtype=torch.float32 if self.shard_dtype in _HALF else self.shard_dtype,
                                        device=self.device)
        self.data, self.bn_mode, self.hvp_mode, self.cached = data, "eval", "fd", False
        self.single_batch = _data.is_single_batch(data)
        self.fd_noise: Optional[float] = None
        self.fd_relative_step: Optional[float] = None
        self.products = 0
        self.saved = [p.to_local().detach().clone() for p in self.params]     # the exact restore copy
        self._count()

    P = property(lambda self: self.shard_layout.P, doc="Number of trainable parameters (all ranks).")

    @staticmethod
    def _check_options(curvature, bn_mode, hvp_mode, cache_graph) -> None:
        if curvature not in (None, "hessian"):
            raise ValueError(f"curvature={curvature!r} is not supported for FSDP2-sharded models: products are finite "
                             "differences of FSDP's gradients, which give the Hessian. Use curvature='hessian'.")
        if hvp_mode not in ("auto", "fd"):
            raise ValueError(f"hvp_mode={hvp_mode!r} needs double backward or forward mode, which FSDP2 does not "
                             "support (create_graph=True fails through its hooks); use hvp_mode='fd' or 'auto'.")
        if check_bn_mode(bn_mode) != "eval":
            raise ValueError("bn_mode='train' is not supported for FSDP2-sharded models; use bn_mode='eval'.")
        if cache_graph not in ("auto", False):
            raise ValueError("cache_graph=True is not possible for FSDP2-sharded models (no graph survives FSDP's "
                             "resharding); use cache_graph='auto'.")

    # ------------------------------------------------------------------ data
    def _count(self) -> None:
        """Guarded passes over this rank's shard: batches and samples per rank, a stand-in batch, the loss
        terms C over all ranks (one forward pass without gradients) and the lowest forward dtype."""
        ctx = self.dist
        seen = {"batches": 0, "samples": 0, "first": None}

        def read():
            if _data.is_empty(self.data, self.single_batch):
                return
            for i, batch in enumerate(_data.iter_batches(self.data, self.loss.split)):
                seen["batches"] += 1
                seen["samples"] += _data.batch_size(batch)
                if i == 0:
                    seen["first"] = _data.prepare_batch(batch, self.device, self.shard_dtype, 0)

        ctx.guard(read, "reading its data shard")
        rows = ctx.all_gather_small(torch.tensor([float(seen["samples"]), float(seen["batches"])], dtype=torch.float64))
        self.rank_counts = [int(x) for x in rows[:, 0].tolist()]
        self.N_local, self.N = seen["samples"], sum(self.rank_counts)
        self.own_slots, self.num_slots = seen["batches"], int(rows[:, 1].max())
        if self.N == 0:
            raise ValueError(f"every rank's data shard is empty (world size {ctx.world_size}); there are no samples "
                             "to average over.")
        self.stand_in = self._stand_in(seen["first"], [int(x) for x in rows[:, 1].tolist()])
        terms, out_dtypes = [0.0], []

        def count(batch, weight):
            with torch.no_grad():
                out = self._logits(batch)
            out_dtypes.append(out.dtype)
            if weight:
                terms[0] += float(self.loss.sum_and_count(out.to(self.loss_dtype), batch[1])[1])

        try:
            with curvature_mode(self.model, "eval"):
                for batch, weight in self._slots():
                    ctx.guard(lambda: count(batch, weight), "counting the loss terms of its data shard")
        finally:
            self._reshard()
        self.loss_terms = float(ctx.all_reduce_small(torch.tensor([terms[0]], dtype=torch.float64))[0])
        if not self.loss_terms > 0:
            raise ValueError(f"the data have no loss terms (all {self.N} samples' targets are ignored); the mean loss "
                             f"{self.loss!r} is undefined. Check the labels (padding = -100) and the loss.")
        lowest = [d for d in out_dtypes + [self.shard_dtype] if d in _HALF]
        flags = ctx.all_gather_small(torch.tensor([float(bool(lowest))]))
        self.noise_dtype = (lowest[0] if lowest else torch.bfloat16) if bool(flags.max()) else self.shard_dtype

    loss_dtype = property(lambda self: torch.float32 if self.shard_dtype in _HALF else self.shard_dtype)

    def _stand_in(self, first, counts: list):
        """The batch of the passes a rank runs beyond its own (weight 0): its first, or the first non-empty rank's."""
        if all(c > 0 for c in counts):
            return first
        src = next(r for r, c in enumerate(counts) if c > 0)
        box = [first if self.dist.rank == src else None]
        group_src = src if self.dist.group is None else dist.get_global_rank(self.dist.group, src)
        dist.broadcast_object_list(box, src=group_src, group=self.dist.group)
        if first is not None:
            return first
        inputs, targets = box[0]
        return _data.map_tensors(inputs, lambda t: t.to(self.device)), targets.to(self.device)

    def _slots(self):
        """(batch, weight) for the passes every rank runs in step: its own batches (each read under a guard,
        so a failing loader stops every rank), then the stand-in with weight 0."""
        batches = iter(_data.iter_batches(self.data, self.loss.split)) if self.own_slots else iter(())

        def fetch(i):
            batch = next(batches, None)
            if batch is None:
                raise ValueError(f"the data shard yielded {i} batches, {self.own_slots} in the first pass; "
                                 "hessfast reads the data once per gradient, so every pass must see the same batches.")
            return _data.prepare_batch(batch, self.device, self.shard_dtype, i)

        for i in range(self.num_slots):
            if i < self.own_slots:
                yield self.dist.guard(lambda: fetch(i), f"reading batch {i} of its data shard"), 1.0
            else:
                self.dist.guard(lambda: None, "reading its data shard")   # the owners' guard, matched
                yield self.stand_in, 0.0

    def _reshard(self) -> None:
        """Put every FSDP module back to its sharded parameters: a forward without a backward (no_grad, or
        one stopped by an error) leaves the root's parameters unsharded."""
        from torch.distributed.fsdp import FSDPModule

        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def _logits(self, batch) -> torch.Tensor:
        return self.loss.logits(_data.call_model(self.model, batch[0]))

    # ------------------------------------------------------------------ gradients at shifted shards
    def _set_shards(self, v: Optional[list], h: float) -> None:
        """Shards <- saved + h v (in float32 at least, rounded once to the shards' dtype), or the saved copy."""
        with torch.no_grad():
            for k, (p, w0) in enumerate(zip(self.params, self.saved)):
                t = p.to_local()
                if v is None:
                    t.copy_(w0)
                else:
                    work = torch.promote_types(w0.dtype, torch.float32)
                    t.copy_((w0.to(work) + h * v[k].to(work)).to(t.dtype))

    def _gradient(self) -> list:
        """This rank's shards of grad R at the current shards (one FSDP forward and backward per slot), in
        FSDP's gradient dtype; None for a parameter the loss does not reach."""
        ctx, scale = self.dist, self.dist.world_size / self.loss_terms
        for p in self.params:
            p.grad = None
        for batch, weight in self._slots():
            out = self._logits(batch)
            loss = ctx.guard(lambda: self.loss.sum_and_count(out.to(self.loss_dtype), batch[1])[0],
                             "computing the loss of a batch")
            (loss * (weight * scale)).backward()
        grads = [None if p.grad is None else p.grad.to_local() for p in self.params]
        for p in self.params:
            p.grad = None
        return grads

    def _difference(self, v: list, h: float, out: torch.Tensor) -> torch.Tensor:
        """out (c,) <- (g(w + h v) - g(w - h v)) / 2h on this rank's shards, subtracted in float64 one
        parameter at a time (so no float64 copy of a whole gradient is held)."""
        self._set_shards(v, h)
        plus = self._gradient()
        self._set_shards(v, -h)
        minus = self._gradient()
        self._set_shards(None, 0.0)
        pos = 0
        for a, b, w in zip(plus, minus, self.saved):
            n = w.numel()
            a64 = torch.zeros(n, dtype=torch.float64, device=self.device) if a is None else a.reshape(-1).double()
            diff = a64 if b is None else a64.sub_(b.reshape(-1).double())
            out[pos:pos + n].copy_(diff.div_(2.0 * h))
            pos += n
        return out

    def _step(self, v: list) -> float:
        """The step for this rank's shards v of the direction: :func:`.finite_difference.fd_step`'s rule,
        ``eps^(1/3) max(1, ||w v|| / ||v||) / ||v||``, the two norms summed one parameter at a time in
        float64 and all-reduced over the ranks."""
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        for w0, t in zip(self.saved, v):
            t64 = t.double()
            sums[0] += t64.square().sum()
            sums[1] += (t64 * w0.double()).square().sum()
        sums = self.dist.all_reduce_small(sums)
        norm = float(sums[0].sqrt())
        if norm == 0.0:
            return 0.0
        h = torch.finfo(self.noise_dtype).eps ** (1.0 / 3.0) * max(1.0, float(sums[1].sqrt()) / norm) / norm
        self.fd_relative_step = h * norm
        return h

    def _split(self, x: torch.Tensor) -> list:
        sizes = [w.numel() for w in self.saved]
        return [t.view(w.shape) for t, w in zip(x.split(sizes), self.saved)]

    def local_matmat(self, X: torch.Tensor) -> torch.Tensor:
        """Local rows (b, c) of the products H x for this rank's local rows X (b, c) of b vectors."""
        if X.dim() != 2 or X.shape[1] != self.shard_layout.c:
            raise ValueError(f"expected this rank's local rows of shape (b, {self.shard_layout.c}), "
                             f"got {tuple(X.shape)}.")
        grads = [p.grad for p in self.params]
        out = torch.zeros(X.shape, dtype=X.dtype, device=self.device)
        try:
            with curvature_mode(self.model, "eval"):
                for i in range(X.shape[0]):
                    v = self._split(X[i])
                    h = self._step(v)
                    if h == 0.0:
                        continue
                    self._difference(v, h, out[i])
                    if self.fd_noise is None:
                        self._estimate_noise(out[i], v, h, X[i])
                    self.products += 1
        finally:
            self._reshard()
            self._set_shards(None, 0.0)
            for p, g in zip(self.params, grads):
                p.grad = g
        return out

    def _estimate_noise(self, product: torch.Tensor, v: list, h: float, x: torch.Tensor) -> None:
        """fd_noise = ||p(h) - p(2h)|| / ||v||: the product's error floor in eigenvalue units."""
        other = self._difference(v, 2 * h, torch.empty_like(product))
        sums = torch.stack([(product.double() - other.double()).square().sum(), x.double().square().sum()])
        sums = self.dist.all_reduce_small(sums)
        self.fd_noise = float(sums[0].sqrt() / sums[1].sqrt())

    def check_noise(self, lambda_abs_max: float) -> None:
        """Warn when the noise floor exceeds :data:`NOISE_WARN` of |lambda|_max (on rank 0; every rank
        holds the same numbers)."""
        if self.fd_noise is not None and self.fd_noise > NOISE_WARN * abs(lambda_abs_max) and self.dist.is_main:
            warnings.warn(f"hessfast: the finite-difference noise floor {self.fd_noise:.3g} exceeds "
                          f"{NOISE_WARN:.0%} of |lambda|_max = {abs(lambda_abs_max):.3g} (forward passes in "
                          f"{str(self.noise_dtype).replace('torch.', '')}); the small eigenvalues are noise. Keep "
                          "float32 master weights (MixedPrecisionPolicy) or compute in float32.", stacklevel=3)

    # ------------------------------------------------------------------ full vectors (tests, small models)
    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """H V for full vectors V (b, P) -> (b, P) on every rank (V must be the same on every rank)."""
        if V.dim() != 2 or V.shape[1] != self.P:
            raise ValueError(f"expected vectors of shape (b, P) with P={self.P}, got {tuple(V.shape)}.")
        local = self.dist.guard(lambda: self.shard_layout.local(V.to(device=self.device, dtype=self.dtype)),
                                "taking its shard of the vectors")
        return self.shard_layout.full(self.local_matmat(local), self.dist)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """H v for a full vector v (P,) -> (P,)."""
        return self.matmat(v.reshape(1, -1))[0]

    def resident_bytes(self) -> dict:
        """Bytes per rank besides the basis: held now (model shard, restore copy) and allocated per product."""
        shard = sum(w.numel() * w.element_size() for w in self.saved)
        grad = sum(w.numel() * torch.finfo(w.dtype).bits // 8 for w in self.saved)
        c, item = self.shard_layout.c, torch.finfo(self.dtype).bits // 8
        big = max((w.numel() for w in self.saved), default=0)
        return {"held": {"model shard": shard, "restore copy": shard},
                "pending": {"two gradient shards (w + h v, w - h v)": 2 * grad, "products": 2 * c * item,
                            "float64 difference of one parameter": 16 * big}}

    shares_products = False    # one pair of FSDP gradients per vector (see CurvatureOperator.shares_products)

    def meta(self) -> dict:
        """What ran: as :meth:`CurvatureOperator.meta`, plus the sharding, local size and fd noise floor."""
        return {"curvature": self.curvature, "hvp_mode": "fd", "cached": False, "bn_mode": "eval", "dropout": DROPOUT,
                "dtype": str(self.dtype).replace("torch.", ""), "single_batch": self.single_batch, "P": self.P,
                "N": self.N, "loss": repr(self.loss), "loss_terms": self.loss_terms, "attention": "default",
                "world_size": self.dist.world_size, "rank_samples": list(self.rank_counts)} | self.sharding_meta()

    def sharding_meta(self) -> dict:
        """Spectrum.meta entries of the sharded run: layout, local sizes, fd step and noise floor."""
        return {"sharding": "fsdp2", "P_local": list(self.shard_layout.sizes), "fd_noise": self.fd_noise,
                "fd_relative_step": self.fd_relative_step,
                "fd_precision": str(self.noise_dtype).replace("torch.", ""), "fd_products": self.products}

    def __repr__(self) -> str:
        return (f"FSDPOperator(P={self.P}, P_local={self.shard_layout.c}, N={self.N}, "
                f"world_size={self.dist.world_size}, "
                f"dtype={self.dtype}, hvp_mode='fd')")
