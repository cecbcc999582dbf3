"""The host-memory Lanczos basis streamed through the compute device in tiles of rows.

``basis_device="cpu"`` keeps the stored rows in host memory (pinned when the products run on
CUDA) and streams them through the device in tiles. Each CGS pass visits every tile once,
projecting and subtracting while the tile is resident (block classical Gram-Schmidt within a tile,
modified between tiles), and the pass is done twice: two host-to-device transfers of the basis per
step instead of the four passes of a plain CGS2. With a single tile this is exactly CGS2 (paper
Appendix D). :func:`project_out` is that projection; the sharded basis (:mod:`.sharded`) runs it
on each rank's slices with the coefficients all-reduced.

A bfloat16 basis (float32 compute) is widened to float32 tile by tile on the compute device (in
tiles of at most ``TILE_BYTES`` when the rows are in device memory, so the widened copy never
doubles the basis).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..kernels import orthonormalize
from ..utils.memory import TILE_BYTES
from .basis import Basis


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
    if count:
        issue(0)
    for i, t0 in enumerate(starts):
        if i + 1 < count:
            issue(i + 1)
        slot = i % 2
        compute.wait_event(ready[slot])
        yield t0, bufs[slot][:min(k, t0 + rows) - t0]
        released[slot] = torch.cuda.Event()
        released[slot].record(compute)


def project_out(Q: torch.Tensor, k: int, W: torch.Tensor, *, tile_rows: Optional[int] = None,
                reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
    """Remove from ``W`` its components on the first k stored rows of Q, twice; Q may be sharded.

    Args:
        Q: (rows, c) stored rows (this rank's slices when sharded), on any device; of W's dtype, or
            bfloat16 with a float32 W.
        k: rows in use. W: (b, c) block or (c,) vector on the compute device, modified in place.
        tile_rows: rows per tile (None: all k at once, i.e. exactly CGS2).
        reduce: in-place sum over ranks of a small tensor (None: single process).

    Returns:
        (W, coeffs, norms): coeffs (b, k) the total projection coefficients and norms (b,) the row
        norms of W over all ranks, in W's dtype on W's device; (k,) and () for a vector W.
    """
    vector = W.dim() == 1
    W2 = W.view(1, -1) if vector else W
    rows = k if tile_rows is None else max(1, tile_rows)
    if Q.dtype != W.dtype and tile_rows is None:  # widen at most TILE_BYTES of rows at a time
        rows = max(1, min(k, TILE_BYTES // max(Q.shape[1] * W.element_size(), 1)))
    coeffs = torch.zeros(W2.shape[0], k, dtype=W.dtype, device=W.device)
    for _ in range(2):
        for t0, tile in _tiles(Q, k, max(rows, 1), W.device):
            tile = tile.to(W.dtype)  # a bfloat16 basis is widened on the compute device
            h = W2 @ tile.T
            if reduce is not None:
                reduce(h)
            W2.addmm_(h, tile, alpha=-1)
            coeffs[:, t0:t0 + tile.shape[0]] += h
    norms = torch.linalg.vector_norm(W2, dim=1)
    if reduce is not None:  # the norm over all ranks: the square root of the summed squares
        norms = reduce(norms.square_()).sqrt_()
    if vector:
        return W, coeffs[0], norms[0]
    return W, coeffs, norms


def host_buffer(rows: int, c: int, dtype: torch.dtype, where: torch.device, compute: torch.device) -> torch.Tensor:
    """A zeroed (rows, c) buffer on ``where``: pinned host memory when it streams to CUDA."""
    if where.type == "cpu" and compute.type == "cuda":
        try:  # pinned pages make the tile copies asynchronous; pageable memory still works, slower
            return torch.zeros((rows, c), dtype=dtype, pin_memory=True)
        except RuntimeError:
            pass
    return torch.zeros((rows, c), dtype=dtype, device=where)


class HostBasis(Basis):
    """Full reorthogonalisation against rows kept off the compute device (``basis_device``), in tiles.

    The projections are plain PyTorch on the compute device (``backend`` "torch"); the last block
    written stays on the device, so multiplying it costs no transfer.
    """

    name = "host"

    def __init__(self, rows: int, b: int, P: int, dtype: torch.dtype, device: torch.device, where: torch.device,
                 tile_rows: int, storage_dtype: Optional[torch.dtype] = None):
        super().__init__(b, P, dtype, device, storage_dtype or dtype, "torch")
        self.where, self.tile_rows = torch.device(where), int(tile_rows)
        self.Q = host_buffer(rows, P, self.storage_dtype, self.where, self.device)
        self.capacity = rows
        self.last = (None, None)          # (row, block on the device) of the last write

    def owns(self, W):
        return self.last[1] is not None and W.untyped_storage().data_ptr() == self.last[1].untyped_storage().data_ptr()

    def write(self, row, X):
        self.Q[row:row + X.shape[0]].copy_(X)
        if self.storage_dtype != self.dtype:  # what is multiplied next is the rounded block
            X = X.to(self.storage_dtype).to(self.dtype)
        self.last = (row, X)

    def read(self, row, n):
        if self.last[0] == row and self.last[1].shape[0] == n:
            return self.last[1]
        return self.Q[row:row + n].to(device=self.device, dtype=self.dtype)

    def orthogonalize(self, row, W, coupling):
        return project_out(self.Q, row + W.shape[0], W, tile_rows=self.tile_rows)

    def project(self, k, W):
        return project_out(self.Q, k, W.clone(), tile_rows=self.tile_rows)[0]

    def qr(self, W):
        return orthonormalize(W, backend="torch")

    def rows(self, k):
        return self.Q[:k]
