"""Memory: what is free on a device, and the one planner that says whether the Lanczos basis fits.

:func:`plan_basis` decides, before anything is allocated, where the (m+1) x P basis goes (the
compute device, host memory streamed in tiles, or a 1/world_size shard per rank), how many bytes
it takes there and whether they fit; every basis placement of the Lanczos engine asks it.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch


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


def format_bytes(nbytes: float) -> str:
    """A byte count in GiB, MiB or KiB for messages."""
    for unit, scale in (("GiB", GIB), ("MiB", 2.0 ** 20)):
        if nbytes >= 0.1 * scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes / 1024:.1f} KiB"


def itemsize(dtype: torch.dtype) -> int:
    """Bytes of one element of ``dtype``."""
    return torch.empty((), dtype=dtype).element_size()


@dataclass
class BasisPlan:
    """Where the (m+1) x P Lanczos basis goes and whether it fits, decided before allocating.

    ``bytes_per_rank`` = (m+1) * block_size * ceil(P / world_size) * itemsize is the stored basis on
    each rank; ``free`` the bytes available where it goes (``where``); ``tile_rows`` the rows per
    streamed tile (None: the basis is on the compute device and used in place).
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

    @property
    def fits(self) -> bool:
        return self.bytes_per_rank <= 0.9 * self.free

    def largest_m(self, free: int, world_size: int) -> int:
        per_step = self.block_size * math.ceil(self.P / world_size) * itemsize(self.dtype)
        return max(int(0.9 * free // per_step) - 1, 0)

    def __str__(self) -> str:
        size = itemsize(self.dtype)
        full = (self.m + 1) * self.block_size * self.P * size
        lines = [f"Lanczos basis: (m+1) x P = {self.m + 1} x {self.P:,} {str(self.dtype).replace('torch.', '')} "
                 f"= {format_bytes(full)} in all; {format_bytes(self.bytes_per_rank)} per rank on {self.where} "
                 f"(world size {self.world_size}), {format_bytes(self.free)} free there: "
                 f"{'fits' if self.fits else 'does NOT fit'}."]
        if self.tile_rows is not None:
            lines.append(f"Streamed through {self.compute_device} in tiles of {self.tile_rows} rows.")
        if not self.fits or self.where != self.compute_device:
            opts = []
            if self.where == self.compute_device and self.compute_device.type != "cpu":
                ok = self.bytes_per_rank <= 0.9 * self.host_free
                opts.append(f"basis_device='cpu' ({format_bytes(self.host_free)} free in host memory: "
                            f"{'fits' if ok else 'does not fit either'})")
            need = math.ceil(full / (0.9 * max(self.free, 1)))
            if need > self.world_size:
                opts.append(f"shard the basis over >= {need} ranks (torchrun --nproc_per_node=N, shard_basis=True)")
            opts.append(f"m <= {self.largest_m(self.free, self.world_size)} on this configuration")
            if self.dtype == torch.float64:
                opts.append("dtype=torch.float32 (half of float64)")
            elif self.dtype == torch.float32:
                opts.append("basis_dtype=torch.bfloat16 (half of float32)")
            opts.append("reorth='none' (three vectors; ghost eigenvalues appear)")
            lines.append("Options: " + "; ".join(opts) + ".")
        return " ".join(lines)


def plan_basis(m: int, P: int, dtype: torch.dtype, device: torch.device, *, world_size: int = 1,
               basis_device: Any = None, block_size: int = 1, tile_bytes: int = TILE_BYTES) -> BasisPlan:
    """Decide where the basis goes and how it is streamed; allocates nothing."""
    device = torch.device(device)
    where = device if basis_device is None else torch.device(basis_device)
    if where.type == "cuda" and where.index is None:
        where = device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    chunk = math.ceil(P / world_size)
    size = itemsize(dtype)
    per_rank = (m + 1) * block_size * chunk * size
    device_free = available_memory(device)
    host_free = device_free if device.type == "cpu" else available_memory(torch.device("cpu"))
    free = device_free if where == device else (host_free if where.type == "cpu" else available_memory(where))
    tile_rows = None
    if where != device:
        tile_rows = max(1, min(m + 1, tile_bytes // max(chunk * size, 1)))
    return BasisPlan(m, P, dtype, world_size, block_size, device, where, per_rank, free, device_free, host_free,
                     tile_rows)
