"""``hessfast.lanczos``: the spectrum of a curvature operator by stochastic Lanczos quadrature.

Builds the operator (or takes one), draws seeded probes, runs the Lanczos engine
(:mod:`hessfast.engine`) on each with the basis placement the run needs, and collects Ritz values
and Gauss-quadrature weights (Theorem 13 of the paper) into a :class:`Spectrum`.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from . import distributed as _distributed
from ._version import __version__
from .engine import runner as _runner
from .engine.block import planned_steps, spectrum_rows
from .engine.lanczos import check_reorth, probe_vectors
from .engine.lockstep import Lockstep, lockstep_fits, use_lockstep
from .operators import CurvatureOperator
from .operators.fsdp import FSDPOperator, is_fsdp_model, unwrap_ddp
from .operators.compiled import resolve_compile
from .spectrum import Spectrum
from .utils.data import is_single_batch
from .utils.model_state import model_device


def lanczos(model: Any, data: Any = None, m: int = 100, *, curvature: str = "hessian",
            loss_fn: Optional[Callable] = None, num_probes: int = 1, seed: Optional[int] = None,
            bn_mode: str = "eval", dtype: Optional[torch.dtype] = None, reorth: str = "full",
            block_size: int = 1, hvp_mode: str = "auto", backend: str = "auto", cache_graph: Any = "auto",
            progress: Optional[bool] = None, distributed: Any = None, shard_basis: Optional[bool] = None,
            basis_device: Any = None, basis_dtype: Optional[torch.dtype] = None, compile: Any = False,
            lockstep: Optional[bool] = None) -> Spectrum:
    """Spectrum of the Hessian or GGN of ``model`` on ``data`` by stochastic Lanczos quadrature.

    Args:
        model: an ``nn.Module`` (with ``data``), or a :class:`CurvatureOperator` (then ``data`` is None).
        data: one ``(inputs, targets)`` batch (the batch Hessian, eq. 3) or an iterable of batches such
            as a ``DataLoader`` (the empirical Hessian of the mean loss over all N samples, eq. 2).
        m: Lanczos steps per probe, 1 <= m <= P (the paper uses 100).
        curvature: ``"hessian"``, ``"ggn"``, ``"empirical_fisher"`` or ``"fisher"`` (Monte-Carlo; see
            :class:`~hessfast.operators.FisherOperator`), or any registered curvature.
        loss_fn: a :class:`hessfast.losses.Loss` (e.g. ``hessfast.losses.causal_lm()``: the mean over all
            tokens of the data set) or a plain ``loss_fn(outputs, targets)``, mean or sum reduction;
            default ``hessfast.losses.cross_entropy()``.
        num_probes: independent random probes; the spectrum averages them (stochastic Lanczos quadrature).
        seed: makes the probes, hence the whole result, reproducible.
        bn_mode: ``"eval"`` or ``"train"`` batch norm (Appendix E); the model is never modified.
        dtype: compute dtype, e.g. ``torch.float64``; default the model's.
        reorth: ``"full"`` (CGS2 against the stored (m+1) x P basis) or ``"none"`` (three vectors;
            loss of orthogonality makes ghost copies of converged eigenvalues appear).
        block_size: b > 1 runs block Lanczos with b starting vectors (resolves repeated eigenvalues).
        hvp_mode: ``"auto"``, ``"reverse"`` (double backward), ``"forward"`` (forward-over-reverse) or
            ``"fd"`` (finite differences of gradients); ``"auto"`` falls back to fd with a warning when an
            operation lacks a second derivative (:class:`CurvatureOperator`). Dropout is always off;
            ``meta`` records ``hvp_mode``, ``dropout`` and any ``hvp_fallback``.
        backend: reorthogonalisation kernels: ``"auto"``, ``"torch"``, ``"cpu"``, ``"cuda"``, ``"triton"``
            (``meta["backend"]`` records the one that ran, ``meta["backend_requested"]`` this argument;
            the host-memory and sharded bases run plain PyTorch).
        cache_graph: keep autograd graphs between products when they fit (``"auto"``), always, never.
        progress: tqdm progress bar; default on in a terminal; only rank 0 of a process group shows it.
        distributed: ``None`` (use the torch.distributed process group when one is initialised), ``True``,
            ``False`` or a ``ProcessGroup``: ``data`` is then this rank's shard and every rank returns the
            same Spectrum of the mean over all ranks' samples (see :mod:`hessfast.distributed`).
        shard_basis: store only this rank's 1/world_size slice of every Lanczos vector (default: when
            distributed and P >= 10^6 or the replicated basis would crowd the device).
        basis_device: where the (m+1) x P basis lives, e.g. ``"cpu"`` to keep it in host memory and
            stream it through the compute device in tiles (default: the operator's device).
        basis_dtype: dtype of the stored basis: None (the compute dtype) or ``torch.bfloat16`` with
            float32 compute, which halves the basis memory and the reorthogonalisation traffic.  The
            basis then stays orthonormal to 1e-3..3e-3 after 100 steps (float32: 1e-6..2e-5) and Ritz
            values move by up to 6e-4 of lambda_max (2e-4 for P >= 1e5; bench/RESULTS.md, "bfloat16
            basis"): enough for densities and outliers, not for eigenvalues closer than that.
            Works with every basis placement (shard_basis, basis_device) and with block_size > 1.
        compile: ``True`` compiles the curvature product with ``torch.compile`` (forward mode; compiled
            once per model and batch shape and reused by later calls; falls back to the eager product
            with a warning if compilation fails), ``"auto"`` the fixed rule of
            :func:`hessfast.operators.compiled.auto_compile` for m x num_probes x batches products (CUDA
            and long runs only: never on CPU), ``False`` (default) eager. ``meta["compile_s"]`` is the
            compilation time, apart from ``elapsed``'s Lanczos work. Ignored when ``model`` is an operator.
        lockstep: run the ``num_probes`` recurrences side by side with one batched product per step
            (:mod:`hessfast.engine.lockstep`; the estimator and its digits are those of sequential
            runs, to rounding). None (default): the rule of :func:`hessfast.engine.lockstep.use_lockstep`
            (num_probes > 1, block_size 1, one process, basis on the device, memory for the k bases).

    Returns:
        :class:`Spectrum` with ``ritz_values`` and ``weights`` of shape (num_probes, m) (block Lanczos:
        (num_probes, ceil(m / b) b)); ``meta`` records what ran: the basis placement (``"device"``,
        ``"host"``, ``"sharded"`` or ``"three-vector"``), the backend, the product mode and more.
    """
    start = time.perf_counter()
    _check_counts(m, num_probes, block_size)
    check_reorth(reorth)
    op = _operator(model, data, curvature=curvature, loss_fn=loss_fn, bn_mode=bn_mode, dtype=dtype, hvp_mode=hvp_mode,
                   cache_graph=cache_graph, progress=progress, distributed=distributed,
                   compile=_compile_choice(compile, model, data, hvp_mode, m * num_probes))
    P = op.P
    if m > P:
        raise ValueError(f"m = {m} exceeds the number of parameters P = {P}: a Krylov space has at most P "
                         f"dimensions. Use m <= {P}.")
    if op.dist is not None and not op.dist.is_main:
        progress = False
    runner = _runner.operator_lanczos(op, m, reorth=reorth, block_size=block_size, shard_basis=shard_basis,
                                      basis_device=basis_device, basis_dtype=basis_dtype, backend=backend,
                                      announce=tqdm.write if progress else None)
    bar = tqdm(total=num_probes * m, desc=f"hessfast: lanczos ({op.curvature})", unit="step",
               disable=None if progress is None else not progress, leave=False)
    # a basis sharded like the parameters: each rank draws only its entries of the probes (never a full vector)
    local = runner.placement == "parameter-sharded"
    ranges = op.shard_layout.ranges[op.shard_layout.rank] if local else None
    probes = probe_vectors(num_probes, P, _runner.common_seed(op, seed), op.dtype, op.device, ranges=ranges)
    results, width = [], 0
    steps_each = planned_steps(m, 1, P)
    together = use_lockstep(lockstep, num_probes=num_probes, block_size=block_size, placement=runner.placement,
                            distributed=op.dist is not None,
                            fits=num_probes > 1 and lockstep_fits(num_probes, steps_each, P, runner.basis_dtype,
                                                                  op.device),
                            shared_products=op.shares_products)
    try:
        if together:
            results, width = _lockstep(op, runner, probes, steps_each, bar), steps_each
        else:
            for first in range(0, num_probes, block_size):
                V = probes[first:first + block_size]
                b = V.shape[0]
                label = f" of probe {first}" if b == 1 else f" of probes {first}-{first + b - 1}"
                res = runner(V, m, step_callback=lambda n, b=b: bar.update(n * b), where=label, seed=first,
                             local=local)
                results.append((first, res))
                width = max(width, planned_steps(m, b, P) * b)
                bar.update(max(m - res.size, 0) * b)   # a run that broke down: its remaining steps
    finally:
        bar.close()
    ritz, weights, steps, breakdown = spectrum_rows(results, width)
    meta = _meta(op, runner, m=m, num_probes=num_probes, seed=seed, reorth=reorth, block_size=block_size,
                 backend=backend, steps=steps, breakdown=breakdown, start=start)
    meta["lockstep"] = together
    meta.update(compile=compile if isinstance(model, torch.nn.Module) else op.meta().get("compile", False),
                compiled=meta.get("compiled", False), compile_s=meta.get("compile_s", 0.0))
    return Spectrum(ritz, weights, meta)


def _lockstep(op, runner, probes: torch.Tensor, steps: int, bar) -> list:
    """The probes' runs side by side (:class:`~hessfast.engine.lockstep.Lockstep`) as (first probe, result) pairs."""
    run = Lockstep(op.matmat, probes.shape[0], steps, op.P, op.dtype, op.device, storage_dtype=runner.basis_dtype,
                   backend=runner.backend, step_callback=bar.update,
                   fixed_block=bool(op.meta().get("compiled")))   # a compiled product keeps its one shape
    results = run.run(probes)
    bar.update(sum(max(steps - res.size, 0) for res in results))   # runs that broke down: their remaining steps
    return list(enumerate(results))


def _compile_choice(compile, model, data, hvp_mode, products) -> Any:
    """``compile`` with ``"auto"`` settled for the whole run (products x batches; :func:`resolve_compile`)."""
    if not isinstance(model, torch.nn.Module) or compile != "auto":   # an operator: built with its own choice
        return compile
    batches = 1 if is_single_batch(data) else (len(data) if hasattr(data, "__len__") else 1)
    return resolve_compile(compile, device=model_device(model), hvp_mode=hvp_mode, batch_products=products * batches)


def _meta(op, runner, *, m, num_probes, seed, reorth, block_size, backend, steps, breakdown, start) -> dict:
    """Spectrum.meta: the call's arguments and what actually ran (product mode, backend, basis placement)."""
    op_meta = op.meta()
    return {
        "P": op.P, "N": op.N, "m": m, "num_probes": num_probes, "curvature": op.curvature, "seed": seed,
        "bn_mode": op.bn_mode, "dtype": str(op.dtype).replace("torch.", ""), "reorth": reorth,
        "basis_dtype": str(runner.basis_dtype).replace("torch.", ""), "block_size": block_size,
        "hvp_mode": op_meta["hvp_mode"], "cached_graph": op_meta["cached"], "backend_requested": backend,
        **{k: op_meta[k] for k in ("compile", "compiled", "compile_s", "compile_graphs", "compile_fallback")
           if k in op_meta},
        **{k: op_meta[k] for k in ("dropout", "loss", "loss_terms", "attention", "hvp_fallback", "batched_backward")
           if k in op_meta},
        "device": str(op.device), "single_batch": op_meta["single_batch"], "steps": list(map(int, steps)),
        "breakdown": bool(any(breakdown)), "elapsed": time.perf_counter() - start,
        "hessfast_version": __version__, "torch_version": torch.__version__,
        **_runner.run_meta(op, runner),
    }


def _check_counts(m, num_probes, block_size) -> None:
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)):
        raise TypeError(f"m must be an integer number of Lanczos steps, got {type(m).__name__}.")
    if isinstance(num_probes, bool) or not isinstance(num_probes, (int, np.integer)) or num_probes < 1:
        raise ValueError(f"num_probes must be a positive integer, got {num_probes!r}.")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}.")
    if m < 1:
        raise ValueError(f"m must be at least 1, got {m}.")


def _operator(model, data, *, progress, distributed, **kwargs) -> CurvatureOperator:
    """The operator of a call: ``model`` itself when it is one, else built from (model, data)."""
    if isinstance(model, (CurvatureOperator, FSDPOperator)):
        if data is not None:
            raise ValueError("pass either (model, data) or an operator alone, not an operator and data.")
        return model
    if data is None:
        raise TypeError("lanczos(model, data, ...) needs data: an (inputs, targets) batch or a DataLoader.")
    model = unwrap_ddp(model)     # DDP: every rank holds the whole model; the data-parallel path applies
    if is_fsdp_model(model):      # FSDP2: shard-local finite differences, a basis sharded like the parameters
        return FSDPOperator(model, data, distributed=distributed, **kwargs)
    return CurvatureOperator(model, data, progress=bool(progress) and _distributed.is_main(distributed),
                             distributed=distributed, **kwargs)
