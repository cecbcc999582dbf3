"""The Lanczos basis sharded over the ranks of a process group.

With R ranks, P is cut into R slices of c = ceil(P / R) entries (the last one zero-padded) and
rank r stores only slice r of every Lanczos vector. One block step of b vectors:

    Q_j      all-gather of the slices                      (each rank receives (R-1) b c numbers)
    W        = reduce-scatter of the local sums S_r(Q_j), / N   (each rank sends (R-1) b c)
    CGS2     H = W_loc Q_loc^T, all-reduce(H) [b k numbers], W_loc -= H Q_loc, twice
    norms    sqrt(all-reduce(|w_loc|^2)),  Q_{j+1} slice = the block QR of W_loc (all-reduced dots)

so a step moves the same 2 (R-1)/R b P numbers per rank as the all-reduce of a replicated run (a
ring all-reduce *is* a reduce-scatter followed by an all-gather), plus a few all-reduces of at
most b (k + b) numbers, while basis memory and reorthogonalisation work per rank drop by R. The
rows may also live in host memory (``basis_device="cpu"``), streamed in tiles as in :mod:`.tiled`.

Every rank sees the same all-reduced coefficients, so every rank takes the same decisions
(breakdown, deflation) and returns the same Ritz values.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .basis import Basis
from .tiled import host_buffer, project_out

__all__ = ["ShardedBasis", "project_out", "sharded_product"]


class ShardedBasis(Basis):
    """Rows [rank c, (rank + 1) c) of every Lanczos vector on this rank; full reorthogonalisation.

    Args:
        ctx: the :class:`hessfast.distributed.DistContext` of the ranks sharing the basis.
        rows: rows to allocate. b, P, dtype, device: block size, vector length, compute dtype and device.
        where: where the slices are stored (the compute device, or host memory streamed in tiles).
        tile_rows: rows per streamed tile (None: all at once, exactly CGS2).
        storage_dtype: the stored dtype (bfloat16 with float32 compute halves the bytes per rank).
    """

    name = "sharded"

    def __init__(self, ctx, rows: int, b: int, P: int, dtype: torch.dtype, device: torch.device,
                 where: Optional[torch.device] = None, tile_rows: Optional[int] = None,
                 storage_dtype: Optional[torch.dtype] = None):
        super().__init__(b, P, dtype, device, storage_dtype or dtype, "torch")
        self.ctx, self.R = ctx, ctx.world_size
        self.c = math.ceil(P / self.R)
        self.lo, self.hi = min(ctx.rank * self.c, P), min((ctx.rank + 1) * self.c, P)
        self.where = self.device if where is None else torch.device(where)
        self.tile_rows = tile_rows
        self.Q = host_buffer(rows, self.c, self.storage_dtype, self.where, self.device)  # zeros: the padding
        self.capacity = rows

    def layout(self, V):
        out = torch.zeros(V.shape[:-1] + (self.c,), dtype=V.dtype, device=V.device)
        out[..., :self.hi - self.lo] = V[..., self.lo:self.hi]
        return out

    def reduce(self, t):
        return self.ctx.all_reduce_small(t)

    def write(self, row, X):
        self.Q[row:row + X.shape[0]].copy_(X)

    def read(self, row, n):
        local = self.Q[row:row + n].to(self.device)          # gathered in the stored dtype, widened after
        full = self.ctx.all_gather_vector(local.reshape(-1), self.R * n * self.c)
        full = full.view(self.R, n, self.c).transpose(0, 1).reshape(n, self.R * self.c)[:, :self.P]
        return full.to(self.dtype).contiguous()

    def orthogonalize(self, row, W, coupling):
        return project_out(self.Q, row + W.shape[0], W, tile_rows=self.tile_rows, reduce=self.reduce)

    def project(self, k, W):
        return project_out(self.Q, k, W.clone(), tile_rows=self.tile_rows, reduce=self.reduce)[0]

    def qr(self, W):
        """Modified Gram-Schmidt, each projection twice, with all-reduced dot products.

        A row whose norm after projection is zero comes back as a zero row with R[i, i] = 0.
        """
        b = W.shape[0]
        Qn = W.clone()
        R = torch.zeros(b, b, dtype=W.dtype, device=W.device)
        for i in range(b):
            for _ in range(2):
                if i:
                    h = self.reduce(Qn[:i] @ Qn[i])
                    Qn[i].sub_(h @ Qn[:i])
                    R[:i, i] += h
            n = self.reduce(torch.linalg.vector_norm(Qn[i]).square().reshape(1)).sqrt_()
            R[i, i] = n[0]
            if float(n) > 0:
                Qn[i].div_(n[0])
            else:
                Qn[i].zero_()
        return Qn, R

    def rows(self, k):
        return self.Q[:k]


def sharded_product(ctx, op, basis: ShardedBasis):
    """X (b, P) -> this rank's slices (b, c) of A X: the reduce-scatter of every rank's local sums, / N.

    ``op`` provides ``local_sum(V)``: the un-normalised sum over this rank's samples of the
    per-sample products for V of shape (P,) or (b, P), with no collective.
    """
    R, c, P = basis.R, basis.c, basis.P

    def product(X: torch.Tensor) -> torch.Tensor:
        b = X.shape[0]
        if b == 1:  # a vector: the reduce-scatter pads it itself
            mine = ctx.reduce_scatter_sum(lambda: op.local_sum(X[0]), P, c, X, "computing a curvature product")
            return mine.view(1, c).div_(op.N)

        def local():  # (b, P) -> rank-major (R, b, c): rank r's part is its column slice of every row
            S = op.local_sum(X)
            padded = torch.zeros(b, R * c, dtype=S.dtype, device=S.device)
            padded[:, :P] = S
            return padded.view(b, R, c).transpose(0, 1).reshape(-1)

        mine = ctx.reduce_scatter_sum(local, R * b * c, b * c, X, "computing a curvature product")
        return mine.view(b, c).div_(op.N)

    return product
