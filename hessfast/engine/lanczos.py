"""Single-vector Lanczos on a ``matvec`` closure (Section 7.2, 8 and Appendix D of the paper).

m Lanczos steps from a unit probe q_0 build an orthonormal basis Q = [q_0 .. q_{m-1}] (m x P rows)
and a symmetric tridiagonal T_m = Q A Q^T with diagonal alpha (m,) and off-diagonal beta (m-1,).
With full reorthogonalisation every new vector is projected out of the stored basis by classical
Gram-Schmidt applied twice ("twice is enough"); alpha_j is the projection coefficient on q_j and
beta_j the norm of what is left. The eigenvalues of T_m (Ritz values) and the squared first
components of its eigenvectors (Gauss-quadrature weights, Theorem 13) form the :class:`Spectrum`.

:func:`lanczos_decomposition` is the b = 1 case of the engine's one recurrence
(:class:`~.recurrence.Lanczos`) on a device or three-vector basis.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch

from ..utils.memory import basis_rows, plan_basis
from .basis import DeviceBasis, ThreeVectorBasis, check_basis_dtype
from .recurrence import Lanczos
from .result import LanczosResult

REORTH = ("full", "none")


def check_reorth(reorth: str) -> str:
    """``reorth`` itself, or a ValueError naming the choices."""
    if reorth not in REORTH:
        raise ValueError(f"unknown reorth {reorth!r}; choose 'full' (default) or 'none' (3 vectors of memory, "
                         "ghost eigenvalues appear).")
    return reorth


def local_basis(reorth: str, m: int, b: int, P: int, dtype: torch.dtype, device: torch.device,
                basis_dtype: Optional[torch.dtype] = None, backend: str = "auto"):
    """The basis of a single-process run on the compute device: every row (``reorth="full"``, planned
    by :func:`hessfast.utils.memory.plan_basis` before it is allocated) or two blocks."""
    qdtype = check_basis_dtype(basis_dtype, dtype, check_reorth(reorth))
    if reorth == "none":
        return ThreeVectorBasis(b, P, dtype, device, backend=backend)
    plan_basis(m, P, qdtype, device, block_size=b).check()
    return DeviceBasis(basis_rows(m, b), b, P, dtype, device, storage_dtype=qdtype, backend=backend)


def lanczos_decomposition(matvec: Callable[[torch.Tensor], torch.Tensor], q0: torch.Tensor, m: int, *,
                          reorth: str = "full", backend: str = "auto", keep_basis: bool = False,
                          breakdown_tol: Optional[float] = None, step_callback: Optional[Callable] = None,
                          where: str = "", basis_dtype: Optional[torch.dtype] = None) -> LanczosResult:
    """Run m Lanczos steps of the symmetric operator ``matvec`` from ``q0`` (P,), normalised here.

    Stops early, with ``breakdown=True``, when beta_j <= breakdown_tol (default 100 eps ||T||): the
    Krylov space is invariant and the Ritz values found are exact eigenvalues.

    ``basis_dtype=torch.bfloat16`` (float32 ``q0`` only) stores the (m+1) x P basis in bfloat16:
    each new Lanczos vector is rounded once when stored, and that stored vector is the one the
    operator multiplies next, so the recurrence and the reorthogonalisation see the same basis.
    ``step_callback()`` is called after every step. Returns a :class:`LanczosResult` with
    ``alpha`` (k,), ``beta`` (k-1,), ``basis`` (k, P) when ``keep_basis`` (k <= m steps).
    """
    P = q0.shape[0]
    basis = local_basis(reorth, m, 1, P, q0.dtype, q0.device, basis_dtype, backend)

    def matmat(X: torch.Tensor) -> torch.Tensor:
        w = matvec(X[0])
        if not isinstance(w, torch.Tensor) or tuple(w.shape) != (P,):
            shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
            raise ValueError(f"hessfast.lanczos_decomposition: matvec(v) must return a ({P},) tensor, got {shape}")
        return w.reshape(1, P)

    callback = None if step_callback is None else (lambda n: step_callback())
    run = Lanczos(matmat, basis, breakdown_tol=breakdown_tol, step_callback=callback, where=where, name="matvec(v)")
    run.start(q0.reshape(1, P))
    return run.run(m, keep_basis=keep_basis)


PROBE_CHUNK = 1 << 20   # entries per draw when only some entries are kept (a multiple of 16, see below)


def probe_vectors(num_probes: int, P: int, seed: Optional[int], dtype: torch.dtype, device: torch.device,
                  ranges: Optional[Sequence[Tuple[int, int]]] = None, chunk: int = PROBE_CHUNK) -> torch.Tensor:
    """Gaussian probes (num_probes, P), drawn on the CPU in float64 so a seed gives the same probes everywhere.

    With ``ranges`` (sorted, disjoint ``(start, stop)`` intervals of [0, P)) only those entries are kept:
    (num_probes, sum of the lengths), the same numbers as the slices of the full draw, without ever holding
    a full vector (a rank of an FSDP-sharded model draws just its shards' entries). The float64 stream is
    drawn in pieces of ``chunk`` entries: torch's CPU normal sampler fills groups of 16, so pieces that are
    multiples of 16 (and a last one of at least 16) give the same stream as one draw of all num_probes x P
    numbers (tests/engine/test_probes.py checks this bit for bit).
    """
    gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
    if ranges is None:
        return torch.randn(num_probes, P, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    if chunk < 16 or chunk % 16:
        raise ValueError(f"chunk must be a positive multiple of 16, got {chunk}")
    ranges = [(int(a), int(b)) for a, b in ranges]
    if any(b < a or a < 0 or b > P for a, b in ranges) or any(b0 > a1 for (_, b0), (a1, _) in zip(ranges, ranges[1:])):
        raise ValueError(f"ranges must be sorted, disjoint intervals of [0, {P}), got {ranges}")
    out = torch.empty(num_probes, sum(b - a for a, b in ranges), dtype=dtype, device=device)
    starts = [0]
    for a, b in ranges:
        starts.append(starts[-1] + b - a)
    for lo, hi in _stream_pieces(num_probes * P, chunk):
        piece = torch.randn(hi - lo, generator=gen, dtype=torch.float64)
        for i in range(lo // P, (hi - 1) // P + 1):          # the probes this piece of the stream covers
            base = i * P
            for r, (a, b) in enumerate(ranges):
                x, y = max(base + a, lo), min(base + b, hi)
                if y > x:
                    pos = starts[r] + x - base - a
                    out[i, pos:pos + y - x] = piece[x - lo:y - lo].to(device=device, dtype=dtype)
    return out


def _stream_pieces(total: int, chunk: int) -> list:
    """[lo, hi) pieces of a stream of ``total`` draws: ``chunk`` each (a multiple of 16), the last one longer
    rather than under 16 entries (torch draws fewer than 16 normals by another path)."""
    edges = list(range(0, total, chunk)) + [total]
    if len(edges) > 2 and edges[-1] - edges[-2] < 16:
        del edges[-2]
    return list(zip(edges[:-1], edges[1:]))
