"""Lanczos with a sharded and/or host-memory basis (the scale-out half of the distributed issue).

**Sharded basis.** With R ranks, P is cut into R slices of c = ceil(P / R) entries (the last one
zero-padded) and rank r stores only slice r of every Lanczos vector: (m+1) x c numbers. One step:

    q_j      all-gather of the slices                 (each rank receives (R-1) c numbers)
    w        = reduce-scatter of the local sums S_r(q_j), / N   (each rank sends (R-1) c)
    CGS2     h = Q_loc w_loc, all-reduce(h) [k numbers], w_loc -= h^T Q_loc, twice
    beta_j   sqrt(all-reduce(|w_loc|^2)),  q_{j+1} slice = w_loc / beta_j

so the step moves the same 2 (R-1)/R P numbers per rank as the all-reduce of a replicated run (a
ring all-reduce *is* a reduce-scatter followed by an all-gather), plus three all-reduces of at
most m+1 numbers, while basis memory and reorthogonalisation work per rank drop by R.

**Host-memory basis.** ``basis_device="cpu"`` keeps the stored rows (full or sharded) in host
memory (pinned when the products run on CUDA) and streams them through the device in tiles of
rows. Each CGS pass visits every tile once, projecting and subtracting while the tile is resident
(block classical Gram-Schmidt within a tile, modified between tiles), and the pass is done twice:
two host-to-device transfers of the basis per step instead of the four passes of a plain CGS2.
With a single tile this is exactly CGS2 (paper Appendix D).

**bfloat16 basis.** ``basis_dtype=torch.bfloat16`` (float32 compute) stores the rows rounded, as
the single-device basis does, which halves the memory per rank and the host-to-device traffic; each
tile is widened to float32 on the compute device (in tiles of at most ``TILE_BYTES`` when the basis
is in device memory, so the widened copy never doubles the basis).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch

from ..utils.memory import TILE_BYTES, plan_basis
from .lanczos import BasisMemoryError, TridiagonalRecorder, check_basis_dtype

# ---------------------------------------------------------------------------- tiles of the stored basis
def _tiles(Q: torch.Tensor, k: int, rows: int, device: torch.device):
    """Yield (start, tile) for rows [0, k) of Q, tiles on ``device``.

    Q on ``device``: views. Q in pinned host memory and ``device`` CUDA: double-buffered copies on a
    side stream, the next tile in flight while the current one is used.
    """
    starts = range(0, k, rows)
    if Q.device == device:
        for t0 in starts:
            yield t0, Q[t0:min(k, t0 + rows)]
        return
    if device.type != "cuda":
        for t0 in starts:
            yield t0, Q[t0:min(k, t0 + rows)].to(device)
        return
    compute = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    bufs = [torch.empty((min(rows, k), Q.shape[1]), dtype=Q.dtype, device=device) for _ in range(2)]
    released = [None, None]
    ready = [None, None]

    def issue(i):
        t0, slot = i * rows, i % 2
        n = min(k, t0 + rows) - t0
        with torch.cuda.stream(side):
            if released[slot] is not None:
                side.wait_event(released[slot])  # the tile that last used this buffer is done
            bufs[slot][:n].copy_(Q[t0:t0 + n], non_blocking=True)
            ready[slot] = torch.cuda.Event()
            ready[slot].record(side)

    count = len(starts)
    issue(0)
    for i, t0 in enumerate(starts):
        if i + 1 < count:
            issue(i + 1)
        slot = i % 2
        compute.wait_event(ready[slot])
        yield t0, bufs[slot][:min(k, t0 + rows) - t0]
        released[slot] = torch.cuda.Event()
        released[slot].record(compute)


def project_out(Q: torch.Tensor, k: int, w: torch.Tensor, *, tile_rows: Optional[int] = None,
                reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
    """Remove from ``w`` its components on the first k stored rows of Q, twice; Q may be sharded.

    Args:
        Q: (m+1, c) stored rows (this rank's slices when sharded), on any device; of w's dtype, or
            bfloat16 with a float32 w.
        k: rows in use. w: (c,) on the compute device, modified in place.
        tile_rows: rows per tile (None: all k at once, i.e. exactly CGS2).
        reduce: in-place sum over ranks of a small tensor (None: single process).

    Returns:
        (w, coeffs (k,) float64 = total projection coefficients, norm = |w| over all ranks).
    """
    rows = k if tile_rows is None else max(1, tile_rows)
    if Q.dtype != w.dtype and tile_rows is None:  # widen at most TILE_BYTES of rows at a time
        rows = max(1, min(k, TILE_BYTES // max(Q.shape[1] * w.element_size(), 1)))
    coeffs = torch.zeros(k, dtype=w.dtype, device=w.device)
    for _ in range(2):
        for t0, tile in _tiles(Q, k, rows, w.device):
            tile = tile.to(w.dtype)  # a bfloat16 basis is widened on the compute device
            h = tile @ w
            if reduce is not None:
                reduce(h)
            w.sub_(h @ tile)
            coeffs[t0:t0 + tile.shape[0]] += h
    sq = torch.dot(w, w).reshape(1)
    if reduce is not None:
        reduce(sq)
    return w, coeffs.double().cpu(), math.sqrt(max(float(sq), 0.0))


# ---------------------------------------------------------------------------- the Lanczos loop
class BasisLanczos:
    """Lanczos steps of a :class:`CurvatureOperator` with a sharded and/or host-memory basis.

    Called like :func:`hessfast.lanczos.lanczos_decomposition` without the matvec:
    ``run(q0, m, reorth="full", backend=..., step_callback=..., where=...) -> LanczosResult``;
    every rank returns the same alpha and beta. ``keep_basis=True`` returns this rank's slices
    (k, c) of the basis, rows [rank*c, (rank+1)*c) of P. With ``basis_dtype=torch.bfloat16`` each
    vector is rounded once when stored and the rounded vector is the one multiplied next.
    """

    def __init__(self, op, m: int, *, shard: bool, basis_device: Any = None, tile_rows: Optional[int] = None,
                 block_size: int = 1, announce: Optional[Callable[[str], None]] = None,
                 basis_dtype: Optional[torch.dtype] = None):
        if block_size != 1:
            raise NotImplementedError("shard_basis / basis_device support single-vector Lanczos (block_size=1) "
                                      "only; use block_size=1, or the replicated in-device basis for block Lanczos.")
        self.op = op
        self.ctx = op._dist if shard else None
        self.world_size = 1 if self.ctx is None else self.ctx.world_size
        self.rank = 0 if self.ctx is None else self.ctx.rank
        self.chunk = math.ceil(op.P / self.world_size)
        self.basis_dtype = check_basis_dtype(basis_dtype, op.dtype)
        self.plan = plan_basis(m, op.P, self.basis_dtype, op.device, world_size=self.world_size,
                               basis_device=basis_device, block_size=block_size)
        if tile_rows is not None:
            self.plan.tile_rows = tile_rows
        if announce is not None:
            announce(str(self.plan))
        if not self.plan.fits:
            raise BasisMemoryError(str(self.plan))
        self.shard, self.basis_device = self.ctx is not None, basis_device

    def _product_slice(self, q_full: torch.Tensor) -> torch.Tensor:
        op, ctx = self.op, self.ctx
        if ctx is None:
            return op.matvec(q_full)
        local = ctx.reduce_scatter_sum(lambda: op._local_sum(q_full, False), op.P, self.chunk, q_full,
                                       "computing a curvature product")
        return local.div_(op.N)

    def __call__(self, q0: torch.Tensor, m: int, *, reorth: str = "full", backend: str = "auto",
                 keep_basis: bool = False, breakdown_tol: Optional[float] = None,
                 step_callback: Optional[Callable] = None, where: str = ""):
        op, ctx, c, P = self.op, self.ctx, self.chunk, self.op.P
        lo, hi = min(self.rank * c, P), min((self.rank + 1) * c, P)
        dtype, device, qdtype = op.dtype, op.device, self.basis_dtype
        where_q = self.plan.where
        Q = None
        if where_q.type == "cpu" and device.type == "cuda":
            try:  # pinned pages make the tile copies asynchronous; pageable memory still works, slower
                Q = torch.zeros((m + 1, c), dtype=qdtype, pin_memory=True)
            except RuntimeError:
                Q = None
        if Q is None:
            Q = torch.zeros((m + 1, c), dtype=qdtype, device=where_q)
        reduce = None if ctx is None else ctx.all_reduce_small
        rounded = (lambda v: v) if qdtype == dtype else (lambda v: v.to(qdtype).to(dtype))  # noqa: E731

        q_full = rounded(q0.to(device=device, dtype=dtype) / torch.linalg.vector_norm(q0))
        Q[0, : hi - lo].copy_(q_full[lo:hi])
        rec = TridiagonalRecorder(m, dtype, breakdown_tol, step_callback, where)
        for j in range(m):
            w = self._product_slice(q_full)
            w, coeffs, b = project_out(Q, j + 1, w, tile_rows=self.plan.tile_rows, reduce=reduce)
            if not rec.step(j, float(coeffs[j]), b):
                break
            w = rounded(w.div_(b))
            Q[j + 1].copy_(w)
            q_full = w if ctx is None else ctx.all_gather_vector(w, P)
        return rec.result(Q if keep_basis else None)

    def meta(self) -> dict:
        return {"shard_basis": self.shard, "basis_device": str(self.plan.where),
                "basis_bytes_per_rank": int(self.plan.bytes_per_rank), "basis_tile_rows": self.plan.tile_rows}
