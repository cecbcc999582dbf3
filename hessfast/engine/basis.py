"""Basis strategies of the Lanczos engine: where the Lanczos blocks live and how a new one is made orthogonal.

The recurrence (:mod:`.recurrence`) knows nothing about storage. It asks a :class:`Basis` to

* ``write(row, X)`` the b rows of a new block (rounded once to ``storage_dtype``),
* ``read(row, n)`` rows back as full (n, P) vectors in the compute ``dtype`` on ``device`` (what the
  operator multiplies next: the stored, rounded rows),
* ``orthogonalize(row, W, coupling)`` the product W = A Q_j of the block at ``row``: full
  reorthogonalisation by CGS2 against every stored row, or the three-term recurrence,
* ``qr(W)``, ``project(k, W)``, ``reduce(t)``, ``random_row(gen)`` for the block QR and deflation.

Rows are kept in the strategy's *layout*: the full P entries, or on a sharded basis this rank's
slice of c = ceil(P / R) entries (:meth:`Basis.layout` maps a full vector to it). Products W and
the blocks passed to ``write`` are in the layout; ``read`` always returns full vectors.

Strategies here: :class:`DeviceBasis` (in device memory, the fused CGS2 kernel
:func:`hessfast.kernels.reorthogonalize`) and :class:`ThreeVectorBasis` (``reorth="none"``: the
last two blocks only). :mod:`.tiled` adds the host-memory basis streamed in tiles and
:mod:`.sharded` the basis sharded over ranks.

Storage dtype: float32, float64, or bfloat16 with float32 compute (:func:`check_basis_dtype`):
each block is rounded once when written, and the rounded block is the one multiplied next, so the
recurrence and the reorthogonalisation see the same basis.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..kernels import orthonormalize, reorthogonalize, resolve_backend


def check_basis_dtype(basis_dtype: Optional[torch.dtype], dtype: torch.dtype, reorth: str = "full") -> torch.dtype:
    """The dtype of the stored Lanczos basis: ``dtype`` itself, or bfloat16 with float32 compute."""
    if basis_dtype is None or basis_dtype == dtype:
        return dtype
    if basis_dtype != torch.bfloat16:
        raise ValueError(f"basis_dtype={basis_dtype} is not supported: use None (the compute dtype {dtype}) or "
                         "torch.bfloat16 (with float32 compute).")
    if dtype != torch.float32:
        raise ValueError(f"basis_dtype=torch.bfloat16 needs float32 compute, but the operator computes in {dtype}; "
                         "pass dtype=torch.float32 or drop basis_dtype.")
    if reorth != "full":
        raise ValueError("basis_dtype applies to the stored basis of reorth='full'; reorth='none' keeps only "
                         "two blocks, so drop basis_dtype.")
    return basis_dtype


class Basis:
    """Storage of Lanczos rows and the projections of the recurrence (see the module docstring).

    Attributes:
        name: the placement recorded in ``Spectrum.meta["basis"]``.
        b: block size. P: length of a full vector. c: entries of a row in the layout (P unsharded).
        dtype, device: compute dtype and device. storage_dtype: dtype of the stored rows.
        capacity: rows that can be written (None: unlimited, the rows are recycled).
        backend: the kernel backend that runs the projections (resolved, never "auto").
        keeps_all: every written row stays (full reorthogonalisation).
    """

    name = "basis"
    keeps_all = True

    def __init__(self, b: int, P: int, dtype: torch.dtype, device: torch.device, storage_dtype: torch.dtype,
                 backend: str = "torch"):
        self.b, self.P, self.c = int(b), int(P), int(P)
        self.dtype, self.device, self.storage_dtype = dtype, torch.device(device), storage_dtype
        self.backend, self.capacity = backend, None

    # ------------------------------------------------------------------ layout and collectives
    def layout(self, V: torch.Tensor) -> torch.Tensor:
        """This strategy's layout of full vectors V (..., P): V itself unless sharded."""
        return V

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum over the ranks sharing the basis of a small tensor (identity unless sharded)."""
        return t

    def random_row(self, gen: torch.Generator) -> torch.Tensor:
        """A Gaussian (1, c) row in the layout, drawn on the CPU in float64 from ``gen`` (the same on every rank)."""
        v = torch.randn(self.P, generator=gen, dtype=torch.float64)
        return self.layout(v.to(device=self.device, dtype=self.dtype)).reshape(1, -1)

    def owns(self, W: torch.Tensor) -> bool:
        """Whether W shares memory with the stored rows (a product that returned its input)."""
        return False

    # ------------------------------------------------------------------ the strategy
    def write(self, row: int, X: torch.Tensor) -> None:
        raise NotImplementedError

    def read(self, row: int, n: int) -> torch.Tensor:
        raise NotImplementedError

    def write_scaled(self, row: int, X: torch.Tensor, divisor: Optional[float] = None) -> None:
        """``write(row, X / divisor)`` (``divisor`` None: ``write(row, X)``); X may be overwritten."""
        self.write(row, X if divisor is None else X.div_(divisor))

    def orthogonalize(self, row: int, W: torch.Tensor, coupling: Optional[torch.Tensor]):
        """Make the product W (b, c) of the block at rows [row, row + b) orthogonal to the basis.

        Returns (W, H, norms): W projected; H (b, h) the coefficients removed, in compute dtype,
        whose last b columns are those on the block itself (C[r, i] = q_i . A q_r); norms (b,)
        the row norms of the projected W over all ranks.
        """
        raise NotImplementedError

    def project(self, k: int, W: torch.Tensor) -> torch.Tensor:
        """W (n, c) with its components on the stored rows [0, k) removed (CGS2)."""
        raise NotImplementedError

    def qr(self, W: torch.Tensor):
        """(Qn, R): the rows of W (b, c) orthonormalised among themselves, W^T = Qn^T R, R (b, b) upper triangular."""
        return orthonormalize(W, backend=self.backend)

    def rows(self, k: int) -> Optional[torch.Tensor]:
        """The stored rows [0, k) in the layout and storage dtype, or None where they are not kept."""
        return None


class DeviceBasis(Basis):
    """Every row in one (capacity, P) buffer on the compute device; full reorthogonalisation.

    The product of block j is projected out of rows [0, (j+1) b) by the fused CGS2 kernel
    (:func:`hessfast.kernels.reorthogonalize`, which reads a bfloat16 buffer widened on load).
    """

    name = "device"

    def __init__(self, rows: int, b: int, P: int, dtype: torch.dtype, device: torch.device,
                 storage_dtype: Optional[torch.dtype] = None, backend: str = "auto"):
        storage_dtype = storage_dtype or dtype
        device = torch.device(device)
        resolved = resolve_backend(backend, torch.empty(0, dtype=dtype, device=device))
        super().__init__(b, P, dtype, device, storage_dtype, resolved)
        self.Q = torch.empty((rows, P), dtype=storage_dtype, device=device)
        self.capacity = rows

    def owns(self, W):
        return W.untyped_storage().data_ptr() == self.Q.untyped_storage().data_ptr()

    def write(self, row, X):
        self.Q[row:row + X.shape[0]].copy_(X)

    def write_scaled(self, row, X, divisor=None):
        if divisor is None or self.storage_dtype != X.dtype:
            return super().write_scaled(row, X, divisor)
        torch.div(X, divisor, out=self.Q[row:row + X.shape[0]])   # the same rounding as X / divisor, one pass

    def read(self, row, n):
        X = self.Q[row:row + n]
        return X if self.storage_dtype == self.dtype else X.to(self.dtype)

    def orthogonalize(self, row, W, coupling):
        return reorthogonalize(self.Q, row + W.shape[0], W, backend=self.backend)

    def project(self, k, W):
        return reorthogonalize(self.Q, k, W, backend=self.backend)[0]

    def rows(self, k):
        return self.Q[:k]


class ThreeVectorBasis(Basis):
    """``reorth="none"``: only the current and the previous block are kept (2 b rows).

    The product of block j loses its components by the three-term recurrence alone:
    W <- W - B_{j-1} Q_{j-1}, C = W Q_j^T, W <- W - C Q_j. (Row r of A Q_j has the coefficient
    q_{j-1,i} . A q_{j,r} = q_{j,r} . A q_{j-1,i} = B_{j-1}[r, i] on row i of Q_{j-1}.)
    Orthogonality to older blocks decays and converged Ritz values reappear as ghost copies
    (Paige's analysis).
    """

    name = "three-vector"
    keeps_all = False

    def __init__(self, b: int, P: int, dtype: torch.dtype, device: torch.device, backend: str = "auto"):
        resolved = resolve_backend(backend, torch.empty(0, dtype=dtype, device=device))
        super().__init__(b, P, dtype, device, dtype, resolved)
        self.Q = torch.empty((2 * b, P), dtype=dtype, device=self.device)
        self.held = [None, None]          # the first row of the block held by each of the two slots

    def _slot(self, row: int) -> int:
        return (row // self.b) % 2

    def owns(self, W):
        return W.untyped_storage().data_ptr() == self.Q.untyped_storage().data_ptr()

    def write(self, row, X):
        s = self._slot(row)
        self.Q[s * self.b:s * self.b + X.shape[0]].copy_(X)
        self.held[s] = row

    def read(self, row, n):
        s = self._slot(row)
        if self.held[s] != row:
            raise IndexError(f"the three-vector basis no longer holds row {row} (it keeps the last two blocks)")
        return self.Q[s * self.b:s * self.b + n]

    def orthogonalize(self, row, W, coupling):
        b = self.b
        if coupling is not None and row >= b:
            W.addmm_(coupling, self.read(row - b, b), alpha=-1)
        Qj = self.read(row, b)
        C = W @ Qj.T
        W.addmm_(C, Qj, alpha=-1)
        return W, C, torch.linalg.vector_norm(W, dim=1)

    def project(self, k, W):
        for s, first in enumerate(self.held):
            if first is not None and first + self.b <= k:
                S = self.Q[s * self.b:(s + 1) * self.b]
                for _ in range(2):
                    W = W - (W @ S.T) @ S
        return W


def deflation_floor(P: int, dtype: torch.dtype) -> float:
    """Norm below which a random vector projected out of the basis counts as lost (the space is exhausted)."""
    return 1e-3 * math.sqrt(P) * torch.finfo(dtype).eps ** 0.25
