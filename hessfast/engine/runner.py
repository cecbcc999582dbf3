"""Lanczos of a curvature operator: the basis placement a run needs, planned before allocating.

:class:`BasisLanczos` connects an operator (its public members ``P``, ``N``, ``dtype``,
``device``, ``dist``, ``matvec``, ``matmat``, ``local_sum``) to the one recurrence on one of four
placements, decided once per run and recorded in ``Spectrum.meta``:

    "device"        every row in device memory, fused CGS2 kernels          (the default)
    "host"          rows in host memory, streamed in tiles (``basis_device``) (:mod:`.tiled`)
    "sharded"       1/world_size of every row per rank (``shard_basis``)     (:mod:`.sharded`)
    "parameter-sharded"  each rank's parameter-shard entries of every row: an FSDP2 operator's
                    ``shard_layout`` and ``local_matmat``                      (:mod:`.param_sharded`)
    "three-vector"  the last two blocks (``reorth="none"``)
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from ..kernels import resolve_backend
from ..utils.memory import plan_basis
from .basis import DeviceBasis, ThreeVectorBasis, check_basis_dtype
from .block import planned_steps
from .lanczos import check_reorth
from .param_sharded import ParameterShardedBasis, parameter_sharded_product
from .recurrence import Lanczos
from .result import LanczosResult
from .sharded import ShardedBasis, sharded_product
from .tiled import HostBasis

AUTO_SHARD_P = 1_000_000  # shard_basis=None shards the basis from this many parameters up


class BasisLanczos:
    """Lanczos runs of an operator on a planned basis placement; every rank returns the same result.

    Args:
        op: the operator (a :class:`hessfast.CurvatureOperator` or anything with its public members).
        m: Krylov dimension of the runs (the basis is planned for it; ``block_size`` rows per step).
        shard: store only this rank's 1/world_size slice of every row (needs ``op.dist``).
        basis_device: where the rows are stored (None: ``op.device``); another device, or an explicit
            ``tile_rows``, streams them through ``op.device`` in tiles.
        tile_rows: rows per streamed tile (default: what :func:`hessfast.utils.memory.plan_basis` says).
        block_size: probes per run (b). announce: called with the plan's text for host and sharded bases.
        basis_dtype: None or torch.bfloat16 (float32 compute). reorth: "full" or "none".
        backend: kernel backend for the device placements (recorded resolved in :meth:`meta`).

    Raises :class:`hessfast.BasisMemoryError` (on every rank) when the basis does not fit.
    """

    def __init__(self, op, m: int, *, shard: bool = False, basis_device: Any = None, tile_rows: Optional[int] = None,
                 block_size: int = 1, announce: Optional[Callable[[str], None]] = None,
                 basis_dtype: Optional[torch.dtype] = None, reorth: str = "full", backend: str = "auto"):
        self.op, self.m, self.block_size = op, int(m), int(block_size)
        self.reorth = check_reorth(reorth)
        self.basis_dtype = check_basis_dtype(basis_dtype, op.dtype, reorth)
        dist = op.dist
        self.layout = getattr(op, "shard_layout", None)      # set by operators of FSDP2-sharded models
        if self.layout is not None and reorth != "full":
            raise ValueError("reorth='none' is not available for FSDP2-sharded models: the basis is sharded like "
                             "the parameters and needs reorth='full' (its memory per rank is (m+1) P_local).")
        self.ctx = dist if (dist is not None and reorth == "full" and (shard or self.layout is not None)) else None
        world = 1 if self.ctx is None else self.ctx.world_size
        full = reorth == "full"
        extra = {} if self.layout is None else dict(shard_numel=self.layout.c, **op.resident_bytes())
        self.plan = plan_basis(m if full else 1, op.P, self.basis_dtype, op.device, world_size=world,
                               basis_device=basis_device if full else None, block_size=block_size, **extra)
        if tile_rows is not None and full:
            self.plan.tile_rows = int(tile_rows)
        if not full:
            self.placement = "three-vector"
        elif self.layout is not None:
            self.placement = "parameter-sharded"
        elif self.ctx is not None:
            self.placement = "sharded"
        else:
            self.placement = "host" if self.plan.tile_rows is not None else "device"
        device_kind = self.placement in ("device", "three-vector")
        probe = torch.empty(0, dtype=op.dtype, device=op.device)
        self.backend = resolve_backend(backend, probe) if device_kind else "torch"
        if announce is not None and not device_kind:
            announce(str(self.plan))
        if not full:  # two blocks, like the vectors the products allocate anyway
            return
        if dist is not None:  # every rank must agree that the basis fits, or all stop
            dist.guard(self.plan.check, "planning the Lanczos basis")
        else:
            self.plan.check()

    def _basis(self, b: int, s: int):
        op, rows = self.op, (s + 1) * b
        if self.placement == "three-vector":
            return ThreeVectorBasis(b, op.P, op.dtype, op.device, backend=self.backend)
        if self.placement == "device":
            return DeviceBasis(rows, b, op.P, op.dtype, op.device, storage_dtype=self.basis_dtype, backend=self.backend)
        if self.placement == "host":
            return HostBasis(rows, b, op.P, op.dtype, op.device, self.plan.where, self.plan.tile_rows,
                             storage_dtype=self.basis_dtype)
        tiles = self.plan.tile_rows
        if self.placement == "parameter-sharded":
            return ParameterShardedBasis(self.ctx, self.layout, rows, b, op.dtype, op.device, where=self.plan.where,
                                         tile_rows=tiles, storage_dtype=self.basis_dtype)
        return ShardedBasis(self.ctx, rows, b, op.P, op.dtype, op.device, where=self.plan.where, tile_rows=tiles,
                            storage_dtype=self.basis_dtype)

    def _product(self, basis, b: int):
        op = self.op
        if self.placement == "sharded":
            return sharded_product(self.ctx, op, basis)
        if self.placement == "parameter-sharded":
            return parameter_sharded_product(op)
        if b == 1:
            return lambda X: op.matvec(X[0]).view(1, -1)
        return op.matmat

    def __call__(self, q0: torch.Tensor, m: Optional[int] = None, *, keep_basis: bool = False,
                 breakdown_tol: Optional[float] = None, step_callback: Optional[Callable[[int], None]] = None,
                 where: str = "", seed: Optional[int] = 0, local: bool = False) -> LanczosResult:
        """One run from the probe q0 (P,) or the block of probes (b, P), b <= block_size.

        ``local=True``: q0 holds only this rank's entries in the basis's layout ((b, c) for a basis
        sharded like the parameters: :func:`~hessfast.engine.lanczos.probe_vectors` with ``ranges``).

        ``m`` (default the planned m, at most it) is the Krylov dimension; ``keep_basis`` returns
        the stored rows (this rank's slices (k, c) of rows [rank c, (rank+1) c) when sharded);
        ``step_callback(b)`` runs after every block step; ``seed`` seeds the deflation vectors.
        """
        V0 = q0.reshape(1, -1) if q0.dim() == 1 else q0
        b, P = V0.shape[0], (self.op.P if local else V0.shape[1])
        m = self.m if m is None else int(m)
        if b > self.block_size or m > self.m:
            raise ValueError(f"this runner was planned for blocks of <= {self.block_size} and m <= {self.m}; "
                             f"got a block of {b} and m = {m}")
        s = planned_steps(m, b, P)
        basis = self._basis(b, s)
        run = Lanczos(self._product(basis, b), basis, breakdown_tol=breakdown_tol, seed=seed,
                      step_callback=step_callback, where=where)
        run.start(V0.to(device=self.op.device, dtype=self.op.dtype), local=local)
        result = run.run(s, keep_basis=keep_basis)
        if self.placement == "parameter-sharded" and result.steps:   # finite-difference noise against |lambda|_max
            self.op.check_noise(float(max(abs(result.ritz()[0]))))
        return result

    def meta(self) -> dict:
        """What ran: placement, where the rows were, bytes per rank, tile rows, stored dtype, backend."""
        out = {"basis": self.placement, "shard_basis": self.ctx is not None, "basis_device": str(self.plan.where),
               "basis_bytes_per_rank": int(self.plan.bytes_per_rank), "basis_tile_rows": self.plan.tile_rows,
               "backend": self.backend}
        if self.placement == "parameter-sharded":
            out.update(self.op.sharding_meta())
        return out


def choose_shard(op, m: int, *, reorth: str, block_size: int, shard_basis: Optional[bool],
                 basis_dtype: Optional[torch.dtype]) -> bool:
    """Whether a run shards its basis: ``shard_basis``, or for None a rule every rank decides alike.

    ``shard_basis=None`` shards a distributed run when P >= :data:`AUTO_SHARD_P` or the replicated
    basis would take more than half the free device memory: below that, the small all-reduces a
    sharded step adds cost more latency than the reorthogonalisation it divides (bench/RESULTS.md,
    "Distributed").
    """
    ctx = op.dist
    if ctx is None or reorth != "full":
        return False
    if getattr(op, "shard_layout", None) is not None:    # FSDP2: always sharded like the parameters
        return True
    if shard_basis is not None:
        return bool(shard_basis)
    plan = plan_basis(m, op.P, basis_dtype or op.dtype, op.device, block_size=block_size)
    big = op.P >= AUTO_SHARD_P or plan.bytes_per_rank > 0.5 * plan.device_free
    return bool(ctx.all_gather_small(torch.tensor([float(big)])).max())


def operator_lanczos(op, m: int, *, reorth: str = "full", block_size: int = 1, shard_basis: Optional[bool] = None,
                     basis_device: Any = None, basis_dtype: Optional[torch.dtype] = None, backend: str = "auto",
                     announce: Optional[Callable[[str], None]] = None) -> BasisLanczos:
    """The :class:`BasisLanczos` of a :func:`hessfast.lanczos` call (the shard rule of :func:`choose_shard`)."""
    shard = choose_shard(op, m, reorth=reorth, block_size=block_size, shard_basis=shard_basis, basis_dtype=basis_dtype)
    return BasisLanczos(op, m, shard=shard, basis_device=basis_device, block_size=block_size, announce=announce,
                        basis_dtype=basis_dtype, reorth=reorth, backend=backend)


def common_seed(op, seed: Optional[int]) -> Optional[int]:
    """The probe seed every rank uses: ``seed``, or rank 0's draw when distributed with ``seed=None``."""
    return seed if op.dist is None else op.dist.common_seed(seed)


def run_meta(op, runner: BasisLanczos) -> dict:
    """Spectrum.meta entries describing the distribution of data and basis."""
    ctx = op.dist
    out = {"world_size": 1 if ctx is None else ctx.world_size}
    if ctx is not None:
        out["rank_samples"] = list(getattr(op, "rank_counts", []))
    out.update(runner.meta())
    return out
