"""The Lanczos engine: the recurrence, its result type and the basis placements it runs on.

Works on any symmetric operator given as ``matvec`` / ``matmat`` callables; :func:`hessfast.lanczos`
(in :mod:`hessfast.slq`) connects it to the curvature operators.
"""
from .block import block_lanczos, block_lanczos_spectrum
from .lanczos import (BasisMemoryError, LanczosResult, NonFiniteError, TridiagonalRecorder, check_basis_dtype,
                      check_basis_memory, lanczos_decomposition, probe_vectors)

__all__ = ["BasisMemoryError", "LanczosResult", "NonFiniteError", "TridiagonalRecorder", "block_lanczos",
           "block_lanczos_spectrum", "check_basis_dtype", "check_basis_memory", "lanczos_decomposition", "probe_vectors"]
