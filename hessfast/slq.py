"""``hessfast.lanczos``: the spectrum of a curvature operator by stochastic Lanczos quadrature.

Builds the operator (or takes one), draws seeded probes, runs the Lanczos engine
(:mod:`hessfast.engine`) on each with the basis placement the run needs, and collects Ritz values
and Gauss-quadrature weights (Theorem 13 of the paper) into a :class:`Spectrum`.
"""
from __future__ import annotations

import functools
import time
from typing import Any, Callable, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from . import distributed as _distributed
from ._version import __version__
from .engine import runner as _runner
from .engine.block import block_lanczos_spectrum
from .engine.lanczos import REORTH, check_basis_dtype, check_basis_memory, lanczos_decomposition, probe_vectors
from .operators import CurvatureOperator
from .spectrum import Spectrum


def lanczos(model: Any, data: Any = None, m: int = 100, *, curvature: str = "hessian",
            loss_fn: Optional[Callable] = None, num_probes: int = 1, seed: Optional[int] = None,
            bn_mode: str = "eval", dtype: Optional[torch.dtype] = None, reorth: str = "full",
            block_size: int = 1, hvp_mode: str = "auto", backend: str = "auto", cache_graph: Any = "auto",
            progress: Optional[bool] = None, distributed: Any = None, shard_basis: Optional[bool] = None,
            basis_device: Any = None, basis_dtype: Optional[torch.dtype] = None) -> Spectrum:
    """Spectrum of the Hessian or GGN of ``model`` on ``data`` by stochastic Lanczos quadrature.

    Args:
        model: an ``nn.Module`` (with ``data``), or a :class:`CurvatureOperator` (then ``data`` is None).
        data: one ``(inputs, targets)`` batch (the batch Hessian, eq. 3) or an iterable of batches such
            as a ``DataLoader`` (the empirical Hessian of the mean loss over all N samples, eq. 2).
        m: Lanczos steps per probe, 1 <= m <= P (the paper uses 100).
        curvature: ``"hessian"`` or ``"ggn"``.
        loss_fn: ``loss_fn(outputs, targets)``, mean or sum reduction; default cross-entropy.
        num_probes: independent random probes; the spectrum averages them (stochastic Lanczos quadrature).
        seed: makes the probes, hence the whole result, reproducible.
        bn_mode: ``"eval"`` or ``"train"`` batch norm (Appendix E); the model is never modified.
        dtype: compute dtype, e.g. ``torch.float64``; default the model's.
        reorth: ``"full"`` (CGS2 against the stored (m+1) x P basis) or ``"none"`` (three vectors;
            loss of orthogonality makes ghost copies of converged eigenvalues appear).
        block_size: b > 1 runs block Lanczos with b starting vectors (resolves repeated eigenvalues).
        hvp_mode: ``"auto"``, ``"reverse"`` (double backward) or ``"forward"`` (forward-over-reverse).
        backend: reorthogonalisation kernels: ``"auto"``, ``"torch"``, ``"cpu"``, ``"cuda"``, ``"triton"``.
        cache_graph: keep autograd graphs between products when they fit (``"auto"``), always, never.
        progress: tqdm progress bar; default on in a terminal; only rank 0 of a process group shows it.
        distributed: ``None`` (use the torch.distributed process group when one is initialised), ``True``,
            ``False`` or a ``ProcessGroup``: ``data`` is then this rank's shard and every rank returns the
            same Spectrum of the mean over all ranks' samples (see :mod:`hessfast.distributed`).
        shard_basis: store only this rank's 1/world_size slice of every Lanczos vector (default: when
            distributed, block_size=1 and P >= 10^6 or the replicated basis would crowd the device).
        basis_device: where the (m+1) x P basis lives, e.g. ``"cpu"`` to keep it in host memory and
            stream it through the compute device in tiles (default: the operator's device).
        basis_dtype: dtype of the stored basis: None (the compute dtype) or ``torch.bfloat16`` with
            float32 compute, which halves the basis memory and the reorthogonalisation traffic.  The
            basis then stays orthonormal to 1e-3..3e-3 after 100 steps (float32: 1e-6..2e-5) and Ritz
            values move by up to 6e-4 of lambda_max (2e-4 for P >= 1e5; bench/RESULTS.md, "bfloat16
            basis"): enough for densities and outliers, not for eigenvalues closer than that.
            Works with every basis placement (shard_basis, basis_device) and with block_size > 1.

    Returns:
        :class:`Spectrum` with ``ritz_values`` and ``weights`` of shape (num_probes, m).
    """
    start = time.perf_counter()
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)):
        raise TypeError(f"m must be an integer number of Lanczos steps, got {type(m).__name__}.")
    if isinstance(num_probes, bool) or not isinstance(num_probes, (int, np.integer)) or num_probes < 1:
        raise ValueError(f"num_probes must be a positive integer, got {num_probes!r}.")
    if reorth not in REORTH:
        raise ValueError(f"unknown reorth {reorth!r}; choose 'full' or 'none'.")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}.")
    if m < 1:
        raise ValueError(f"m must be at least 1, got {m}.")
    if isinstance(model, CurvatureOperator):
        if data is not None:
            raise ValueError("pass either (model, data) or an operator alone, not an operator and data.")
        op = model
    else:
        if data is None:
            raise TypeError("lanczos(model, data, ...) needs data: an (inputs, targets) batch or a DataLoader.")
        op = CurvatureOperator(model, data, curvature=curvature, loss_fn=loss_fn, bn_mode=bn_mode, dtype=dtype,
                               hvp_mode=hvp_mode, cache_graph=cache_graph,
                               progress=bool(progress) and _distributed.is_main(distributed), distributed=distributed)
    P = op.P
    if m > P:
        raise ValueError(f"m = {m} exceeds the number of parameters P = {P}: a Krylov space has at most P "
                         f"dimensions. Use m <= {P}.")
    if op._dist is not None and not op._dist.is_main:
        progress = False
    qdtype = check_basis_dtype(basis_dtype, op.dtype, reorth)
    runner = _runner.basis_runner(op, m, reorth=reorth, block_size=block_size, shard_basis=shard_basis,
                                       basis_device=basis_device, announce=tqdm.write if progress else None,
                                       basis_dtype=qdtype)
    if reorth == "full" and runner is None:
        check_basis_memory(m, P, qdtype, op.device, block_size)
    decompose = runner if runner is not None else functools.partial(lanczos_decomposition, op.matvec,
                                                                    basis_dtype=qdtype)

    bar = tqdm(total=num_probes * m, desc=f"hessfast: lanczos ({op.curvature})", unit="step",
               disable=None if progress is None else not progress, leave=False)
    probes = probe_vectors(num_probes, P, _runner.common_seed(op, seed), op.dtype, op.device)
    ritz = np.full((num_probes, m), np.nan)
    weights = np.zeros((num_probes, m))
    steps, breakdown = [], []
    try:
        if block_size > 1:
            ritz, weights, steps, breakdown = block_lanczos_spectrum(
                op.matmat, probes, m, block_size, reorth=reorth, backend=backend, bar=bar,
                basis_dtype=None if qdtype == op.dtype else qdtype)
        else:
            for p in range(num_probes):
                res = decompose(probes[p], m, reorth=reorth, backend=backend, step_callback=bar.update,
                                where=f" of probe {p}")
                theta, w = res.ritz()
                ritz[p, : res.steps] = theta
                weights[p, : res.steps] = w
                steps.append(res.steps)
                breakdown.append(res.breakdown)
                bar.update(m - res.steps)
    finally:
        bar.close()
    meta = {
        "P": P, "N": op.N, "m": m, "num_probes": num_probes, "curvature": op.curvature, "seed": seed,
        "bn_mode": op.bn_mode, "dtype": str(op.dtype).replace("torch.", ""), "reorth": reorth,
        "basis_dtype": str(qdtype).replace("torch.", ""),
        "block_size": block_size, "hvp_mode": op.hvp_mode, "cached_graph": op.cached, "backend": backend,
        "device": str(op.device), "single_batch": op._single, "steps": list(map(int, steps)),
        "breakdown": bool(any(breakdown)), "elapsed": time.perf_counter() - start,
        "hessfast_version": __version__, "torch_version": torch.__version__,
        **_runner.run_meta(op, runner),
    }
    return Spectrum(ritz, weights, meta)
