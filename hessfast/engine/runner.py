"""Where a Lanczos run keeps its basis, decided per operator: in place, host memory, or sharded.

These hooks connect :func:`hessfast.lanczos` to the basis placements of :mod:`.sharded`: which
runner to use for an operator, the probe seed every rank shares, and the ``Spectrum.meta`` entries
that describe the distribution of data and basis.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from ..utils.memory import plan_basis
from .lanczos import check_basis_memory
from .sharded import BasisLanczos

AUTO_SHARD_P = 1_000_000  # shard_basis=None shards the basis from this many parameters up


def basis_runner(op, m: int, *, reorth: str, block_size: int, shard_basis: Optional[bool], basis_device: Any,
                 announce: Optional[Callable[[str], None]] = None, basis_dtype: Optional[torch.dtype] = None):
    """The Lanczos runner for a sharded or host-memory basis, or None for the single-device basis.

    ``shard_basis=None`` shards a distributed single-vector run when P >= :data:`AUTO_SHARD_P` or the
    replicated basis would take more than half the free device memory: below that, the three small
    all-reduces a sharded step adds cost more latency than the reorthogonalisation it divides
    (bench/RESULTS.md, "Distributed"). ``basis_device`` other than the operator's device streams
    the basis through it in tiles.
    """
    if reorth != "full":
        return None
    ctx = getattr(op, "_dist", None)
    if shard_basis is None and ctx is not None and block_size == 1:
        plan = plan_basis(m, op.P, basis_dtype or op.dtype, op.device)
        big = op.P >= AUTO_SHARD_P or plan.bytes_per_rank > 0.5 * plan.device_free
        shard = bool(ctx.all_gather_small(torch.tensor([float(big)])).max())  # every rank decides alike
    else:
        shard = bool(shard_basis) and ctx is not None
    moved = basis_device is not None and torch.device(basis_device) != op.device
    if not shard and not moved:
        if ctx is not None:  # a replicated basis: every rank must agree that it fits, or all stop
            ctx.guard(lambda: check_basis_memory(m, op.P, basis_dtype or op.dtype, op.device, block_size),
                      "checking basis memory")
        return None
    make = lambda: BasisLanczos(op, m, shard=shard, basis_device=basis_device, block_size=block_size,  # noqa: E731
                                announce=announce, basis_dtype=basis_dtype)
    return make() if ctx is None else ctx.guard(make, "planning the Lanczos basis")


def common_seed(op, seed: Optional[int]) -> Optional[int]:
    """The probe seed every rank uses: ``seed``, or rank 0's draw when distributed with ``seed=None``."""
    ctx = getattr(op, "_dist", None)
    return seed if ctx is None else ctx.common_seed(seed)


def run_meta(op, runner) -> dict:
    """Spectrum.meta entries describing the distribution of data and basis."""
    ctx = getattr(op, "_dist", None)
    out = {"world_size": 1 if ctx is None else ctx.world_size}
    if ctx is not None:
        out["rank_samples"] = list(getattr(op, "rank_counts", []))
    out.update(runner.meta() if runner is not None else {"shard_basis": False})
    return out
