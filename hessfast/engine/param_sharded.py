"""The Lanczos basis sharded exactly like the parameters of an FSDP2 model.

Rank r stores, of every Lanczos vector, the c_r entries that belong to its parameter shards (the
layout of :class:`hessfast.operators.fsdp.ShardLayout`: its rows of every parameter, concatenated),
so the product of a vector is shard-local (each rank moves its own shards and FSDP's reduce-scatter
hands it its shard of the gradient) and nothing of size P is ever gathered. One step of b vectors:

    W_loc    = the local rows of A Q_j            (b FSDP products; no extra collective)
    CGS2     H = W_loc Q_loc^T, all-reduce(H) [b k numbers], W_loc -= H Q_loc, twice
    norms    sqrt(all-reduce(|w_loc|^2)); the block QR with all-reduced dots

Every inner product is the all-reduce of the ranks' local dot products, so every rank holds the
same coefficients, takes the same decisions and returns the same tridiagonal T and Ritz values.
Compared with :class:`~.sharded.ShardedBasis` (equal slices of P, an all-gather and a reduce-scatter
of b P numbers per step) the slices are uneven (c_r, possibly 0) and the step moves only the
b (k + b) coefficients. Rows may live in host memory (``where="cpu"``), streamed in tiles.
"""
from __future__ import annotations

from typing import Optional

import torch

from .basis import Basis
from .sharded import ShardedBasis
from .tiled import host_buffer


class ParameterShardedBasis(ShardedBasis):
    """This rank's parameter-shard entries (c = ``layout.c``) of every Lanczos vector; full reorthogonalisation.

    Args:
        ctx: the :class:`hessfast.distributed.DistContext` of the FSDP mesh.
        layout: maps full vectors (..., P) to this rank's entries (..., c): ``layout.local``, ``layout.P``,
            ``layout.c``.
        rows, b, dtype, device, where, tile_rows, storage_dtype: as :class:`~.sharded.ShardedBasis`.

    ``read`` returns this rank's local rows (n, c), which is what the shard-local product takes.
    """

    name = "parameter-sharded"

    def __init__(self, ctx, layout, rows: int, b: int, dtype: torch.dtype, device: torch.device,
                 where: Optional[torch.device] = None, tile_rows: Optional[int] = None,
                 storage_dtype: Optional[torch.dtype] = None):
        Basis.__init__(self, b, layout.P, dtype, device, storage_dtype or dtype, "torch")
        self.ctx, self.R, self.shard_layout = ctx, ctx.world_size, layout
        self.c = int(layout.c)
        self.where = self.device if where is None else torch.device(where)
        self.tile_rows = tile_rows
        self.Q = host_buffer(rows, self.c, self.storage_dtype, self.where, self.device)
        self.capacity = rows

    def layout(self, V):
        return self.shard_layout.local(V)

    def read(self, row, n):
        return self.Q[row:row + n].to(device=self.device, dtype=self.dtype).contiguous()


def parameter_sharded_product(op):
    """X (b, c) local rows -> the local rows (b, c) of the products: ``op.local_matmat`` (FSDP2 operators)."""
    return op.local_matmat
