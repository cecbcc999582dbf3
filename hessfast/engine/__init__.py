"""The Lanczos engine: one block recurrence over basis strategies, its one result type and one error.

Layout:
    recurrence.py  :class:`Lanczos`, the recurrence (b = 1 is single-vector Lanczos), the breakdown rule
    basis.py       :class:`Basis` and the in-device (:class:`DeviceBasis`) and three-vector strategies
    tiled.py       :class:`HostBasis`, rows in host memory streamed in tiles (``basis_device="cpu"``)
    sharded.py     :class:`ShardedBasis`, rows sharded over the ranks of a process group
    result.py      :class:`LanczosResult` (``.ritz()``: Ritz values and Gauss / block-Gauss weights)
                   and :class:`NonFiniteError`
    lanczos.py, block.py   the closure wrappers ``lanczos_decomposition``, ``block_lanczos``, ``block_lanczos_spectrum``
    runner.py      :class:`BasisLanczos`: runs on a curvature operator with the planned placement

Memory is planned before anything is allocated by :func:`hessfast.utils.memory.plan_basis`.
:func:`hessfast.lanczos` (in :mod:`hessfast.slq`) connects the engine to the curvature operators.

A new basis placement is one :class:`Basis` subclass (``write``, ``read``, ``orthogonalize``,
``project``, and where the layout is not the full vector ``layout``, ``reduce``, ``qr``) plus a
branch in ``BasisLanczos._basis``; the recurrence does not change.

Restarted methods (thick-restart Lanczos for the top eigenpairs) run on the same recurrence:
write the k kept orthonormal vectors (e.g. Ritz vectors Y = S^T Q, from ``basis.rows(k)``) and the
normalised residual block into rows [0, k + b) of a full basis with ``basis.write``, then
``Lanczos(matmat, basis).run(steps, row=k, residual=True)``: every product is projected out of
the k locked rows too, ``result.coupling`` (b, k) holds the first product's coefficients on them
(the arrowhead of the restarted T), ``result.diag`` / ``result.off`` the new blocks and
``result.residual`` the coupling of the next block, written after the last one for the next restart.
"""
from ..utils.memory import BasisMemoryError, plan_basis
from .basis import Basis, DeviceBasis, ThreeVectorBasis, check_basis_dtype
from .block import block_lanczos, block_lanczos_spectrum
from .lanczos import lanczos_decomposition, probe_vectors
from .recurrence import Lanczos
from .result import LanczosResult, NonFiniteError
from .runner import BasisLanczos
from .sharded import ShardedBasis
from .tiled import HostBasis, project_out

__all__ = ["Basis", "BasisLanczos", "BasisMemoryError", "DeviceBasis", "HostBasis", "Lanczos", "LanczosResult",
           "NonFiniteError", "ShardedBasis", "ThreeVectorBasis", "block_lanczos", "block_lanczos_spectrum",
           "check_basis_dtype", "lanczos_decomposition", "plan_basis", "probe_vectors", "project_out"]
