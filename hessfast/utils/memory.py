"""Memory: what is free on a device, and the one planner that says whether the Lanczos basis fits.

:func:`plan_basis` decides, before anything is allocated, where the Lanczos basis goes (the
compute device, host memory streamed in tiles, or a 1/world_size shard per rank), how many bytes
it takes there and whether they fit. Every basis placement of the Lanczos engine asks it, and
:meth:`BasisPlan.check` raises :class:`BasisMemoryError` with the options that would fit.

The basis of m Lanczos steps in blocks of b vectors holds s + 1 blocks, s = ceil(m / b): the s
blocks of the Krylov space and the next one, where the residual of the last step goes
(:func:`basis_rows`; (m + 1) rows for single-vector Lanczos).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch


class BasisMemoryError(MemoryError, ValueError):
    """The Lanczos basis does not fit in the memory available where it would be stored."""


def available_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on ``device`` (best effort)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


GIB = 2.0 ** 30
TILE_BYTES = 256 * 2 ** 20  # device bytes per streamed tile (two are resident: double buffering)
FILL = 0.9                  # the basis may take at most this fraction of the free memory


def saved_tensor_bytes(build) -> tuple:
    """``(build(), bytes)``: the result of ``build()`` and the bytes of the distinct storages autograd
    saved for backward while it ran (what keeping that graph holds in memory)."""
    total = [0]
    seen = set()

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key not in seen:
            seen.add(key)
            total[0] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = build()
    return out, total[0]


def format_bytes(nbytes: float) -> str:
    """A byte count in GiB, MiB or KiB for messages."""
    for unit, scale in (("GiB", GIB), ("MiB", 2.0 ** 20)):
        if nbytes >= 0.1 * scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes / 1024:.1f} KiB"


def itemsize(dtype: torch.dtype) -> int:
    """Bytes of one element of ``dtype``."""
    return torch.empty((), dtype=dtype).element_size()


def block_steps(m: int, block_size: int = 1) -> int:
    """Block steps s = ceil(m / b) of a run of Krylov dimension m in blocks of b."""
    return -(-int(m) // int(block_size))


def basis_rows(m: int, block_size: int = 1) -> int:
    """Rows of the stored basis: (s + 1) b with s = ceil(m / b); m + 1 for single-vector Lanczos."""
    return (block_steps(m, block_size) + 1) * int(block_size)


@dataclass
class BasisPlan:
    """Where the Lanczos basis goes and whether it fits, decided before allocating.

    ``bytes_per_rank`` = :func:`basis_rows` (m, b) * ceil(P / world_size) * itemsize is the stored
    basis on each rank; ``free`` the bytes available where it goes (``where``); ``tile_rows`` the
    rows per streamed tile (None: the basis is on the compute device and used in place).

    A basis sharded like the parameters of an FSDP2 model (``shard_numel``: this rank's entries of
    a row, c_r) stores rows x c_r per rank instead; ``held`` lists what the run already holds on the
    rank (the model shard, the restore copy of the shards: reported, already outside ``free``) and
    ``pending`` what every product still allocates (the gradient shard and float64 copies), which
    must fit beside the basis.
    """

    m: int
    P: int
    dtype: torch.dtype
    world_size: int
    block_size: int
    compute_device: torch.device
    where: torch.device
    bytes_per_rank: int
    free: int
    device_free: int
    host_free: int
    tile_rows: Optional[int]
    shard_numel: Optional[int] = None
    held: dict = field(default_factory=dict)
    pending: dict = field(default_factory=dict)

    @property
    def pending_bytes(self) -> int:
        return int(sum(self.pending.values()))

    @property
    def fits(self) -> bool:
        if self.where != self.compute_device:    # the products' buffers are on the compute device
            return self.bytes_per_rank <= FILL * self.free and self.pending_bytes <= FILL * self.device_free
        return self.bytes_per_rank + self.pending_bytes <= FILL * self.free

    def row_bytes(self, world_size: int) -> int:
        """Bytes of one stored row on a rank: its parameter-shard entries, or ceil(P / world_size)."""
        if self.shard_numel is not None and world_size == self.world_size:
            return self.shard_numel * itemsize(self.dtype)
        return math.ceil(self.P / world_size) * itemsize(self.dtype)

    @property
    def rows(self) -> int:
        return basis_rows(self.m, self.block_size)

    def largest_m(self, free: int, world_size: int) -> int:
        """The largest m whose basis fits in ``free`` bytes on each of ``world_size`` ranks."""
        per_row = max(self.row_bytes(world_size), 1)
        blocks = int(max(FILL * free - self.pending_bytes, 0) // (per_row * self.block_size))   # s + 1 blocks fit
        return max((blocks - 1) * self.block_size, 0)

    def options(self) -> list:
        """What would make the basis fit (or fit better), as phrases for a message."""
        full = self.rows * self.P * itemsize(self.dtype)
        opts = [f"Reduce m (m <= {self.largest_m(self.free, self.world_size)} fits on this configuration)"]
        if self.where == self.compute_device and self.compute_device.type != "cpu":
            ok = self.bytes_per_rank <= FILL * self.host_free
            opts.append(f"keep the basis in host memory, basis_device='cpu' ({format_bytes(self.host_free)} free "
                        f"there: {'fits' if ok else 'does not fit either'})")
        if self.shard_numel is not None:   # the per-product buffers shrink with the ranks as the basis does
            need = math.ceil((full + self.pending_bytes * self.world_size) / max(FILL * self.free, 1))
            if need > self.world_size:
                opts.append(f"shard the model over more ranks (about {need}: the basis, shards and gradients per "
                            "rank shrink as 1 / ranks; torchrun --nproc_per_node=N)")
        else:
            need = math.ceil(full / max(FILL * self.free, 1))
            if need > self.world_size:
                opts.append(f"shard the basis over >= {need} ranks (torchrun --nproc_per_node=N, shard_basis=True)")
        if self.dtype == torch.float64:
            opts.append("use dtype=torch.float32 (half of float64)")
        elif self.dtype == torch.float32:
            opts.append("use basis_dtype=torch.bfloat16 (half of float32)")
        if self.shard_numel is None:       # an FSDP2 model's basis is always the full, sharded one
            opts.append("or pass reorth='none' (three vectors; ghost eigenvalues appear)")
        return opts

    def __str__(self) -> str:
        full = self.rows * self.P * itemsize(self.dtype)
        lines = [f"Lanczos basis: {self.rows} rows x P = {self.P:,} {str(self.dtype).replace('torch.', '')} "
                 f"(m = {self.m}, block size {self.block_size}) = {format_bytes(full)} in all; "
                 f"{format_bytes(self.bytes_per_rank)} per rank on {self.where} (world size {self.world_size}), "
                 f"{format_bytes(self.free)} free there: {'fits' if self.fits else 'does NOT fit'}."]
        if self.shard_numel is not None:
            terms = [f"{k} {format_bytes(v)}" for k, v in self.held.items()]
            terms += [f"{k} {format_bytes(v)} (per product)" for k, v in self.pending.items()]
            lines.append(f"Sharded like the parameters: {self.shard_numel:,} entries per row on this rank; "
                         f"besides the basis: {', '.join(terms) or 'nothing'}.")
        if self.tile_rows is not None:
            lines.append(f"Streamed through {self.compute_device} in tiles of {self.tile_rows} rows.")
        if not self.fits or self.where != self.compute_device:
            lines.append("Options: " + "; ".join(self.options()) + ".")
        return " ".join(lines)

    def check(self) -> "BasisPlan":
        """Return the plan if the basis fits; raise :class:`BasisMemoryError` saying what to do if not."""
        if not self.fits:
            raise BasisMemoryError(str(self))
        return self


def plan_basis(m: int, P: int, dtype: torch.dtype, device: torch.device, *, world_size: int = 1,
               basis_device: Any = None, block_size: int = 1, tile_bytes: int = TILE_BYTES,
               shard_numel: Optional[int] = None, held: Optional[dict] = None,
               pending: Optional[dict] = None) -> BasisPlan:
    """Decide where the basis of ``m`` Lanczos steps goes and how it is streamed; allocates nothing.

    Args:
        m: Krylov dimension (Lanczos steps; block Lanczos: ceil(m / block_size) block steps).
        P: length of a Lanczos vector. dtype: the stored basis' dtype (bfloat16 halves float32).
        device: the compute device (where the products are). world_size: ranks sharing a sharded
            basis (each stores ceil(P / world_size) entries of every row).
        basis_device: where the rows are stored (None: ``device``); another device streams them
            through ``device`` in tiles of at most ``tile_bytes``.
        shard_numel: this rank's entries of every row when the basis is sharded like an FSDP2 model's
            parameters (then ``world_size`` is the mesh size and ceil(P / world_size) is not used).
        held, pending: ``{what: bytes}`` per rank besides the basis, already held (reported) and still to
            be allocated by every product (must fit beside the basis); see :class:`BasisPlan`.
    """
    device = torch.device(device)
    where = device if basis_device is None else torch.device(basis_device)
    if where.type == "cuda" and where.index is None:
        where = device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    chunk = math.ceil(P / world_size) if shard_numel is None else int(shard_numel)
    size = itemsize(dtype)
    rows = basis_rows(m, block_size)
    per_rank = rows * chunk * size
    device_free = available_memory(device)
    host_free = device_free if device.type == "cpu" else available_memory(torch.device("cpu"))
    free = device_free if where == device else (host_free if where.type == "cpu" else available_memory(where))
    tile_rows = None
    if where != device:
        tile_rows = max(1, min(rows, tile_bytes // max(chunk * size, 1)))
    return BasisPlan(m, P, dtype, world_size, block_size, device, where, per_rank, free, device_free, host_free,
                     tile_rows, shard_numel, dict(held or {}), dict(pending or {}))
