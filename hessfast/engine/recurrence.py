"""The one Lanczos recurrence: block steps (b = 1 is single-vector Lanczos) over a :class:`~.basis.Basis`.

From the orthonormalised probes Q_0 (V0^T = Q_0^T R_0), block step j computes

    W = A Q_j                          (``matmat``: b products, in the basis' layout)
    W, H = orthogonalize(W)            (CGS2 against every stored row, or the three-term recurrence)
    A_j = (C + C^T) / 2                C = the last b columns of H, C[r, i] = q_i . A q_r
    W^T = Q_{j+1}^T B_j                (the block QR; b = 1: beta_j = |w|, q_{j+1} = w / beta_j)

and T = tridiag(B_{j-1}, A_j, B_j^T) = Q A Q^T (:class:`~.result.LanczosResult`).

One breakdown rule. With ||T|| estimated by max_j ||A_j||_2 + ||B_{j-1}||_2 + max_i |w_i|, a row of
the new block whose R[i, i] <= tol (default 100 eps ||T||) depends on the basis. When every row of
the block does, the Krylov space of the probes is invariant: the run stops (``breakdown``) and its
Ritz values are exact eigenvalues (for b = 1 this is beta_j <= tol). When only some do, each is
replaced by a random unit vector orthogonal to everything so far, with zero coupling (B_j[i, :] = 0),
so T stays exactly Q A Q^T; if no such vector is left the space is exhausted and the run stops.

One error: a NaN or Inf in a product reaches the coefficients and norms of its step, which are
read back together (one host synchronisation per step) and raise :class:`~.result.NonFiniteError`
naming the step.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch

from .basis import Basis, deflation_floor
from .result import LanczosResult, NonFiniteError, empty_blocks


class Lanczos:
    """The block Lanczos recurrence of a symmetric operator on a basis strategy.

    Args:
        matmat: X (b, P) full vectors -> the (b, c) products A X in the basis' layout (c = P
            unless the basis is sharded).
        basis: the :class:`~.basis.Basis` that stores the rows and projects the products.
        breakdown_tol: absolute breakdown threshold (default 100 eps ||T||, eps of the compute dtype).
        seed: seeds the random vectors that replace deflated rows.
        step_callback: called with b after every block step (e.g. ``tqdm.update``).
        where: appended to error messages, e.g. " of probe 3".
        name: what ``matmat`` is called in error messages.

    Usage: ``start(V0)`` then ``run(steps)``; a restarted method writes its locked rows with
    ``basis.write`` and calls ``run(steps, row=k)`` (see :meth:`run`).
    """

    def __init__(self, matmat: Callable[[torch.Tensor], torch.Tensor], basis: Basis, *,
                 breakdown_tol: Optional[float] = None, seed: Optional[int] = 0,
                 step_callback: Optional[Callable[[int], None]] = None, where: str = "", name: str = "matmat(X)"):
        self.matmat, self.basis, self.tol_abs = matmat, basis, breakdown_tol
        self.step_callback, self.where, self.name = step_callback, where, name
        self.gen = torch.Generator().manual_seed(int(seed) if seed is not None else 0)
        self.eps = torch.finfo(basis.dtype).eps
        self.anorm, self.prev_norm, self.count, self.deflated = 0.0, 0.0, 0, 0
        self.coupling = None           # B_{j-1} on the device, for the three-term recurrence
        self.R0 = self.norms2 = None

    def tol(self) -> float:
        return self.tol_abs if self.tol_abs is not None else 100 * self.eps * max(self.anorm, 1e-300)

    # ------------------------------------------------------------------ the first block
    def start(self, V0: torch.Tensor, local: bool = False) -> np.ndarray:
        """Orthonormalise the probes V0 (b, P) (full vectors) into rows [0, b); returns R_0 (b, b).

        ``local=True``: V0 is already in the basis's layout (b, c), e.g. this rank's entries of a basis
        sharded like the parameters (:func:`~hessfast.engine.lanczos.probe_vectors` with ``ranges``).
        """
        basis = self.basis
        V0 = V0.detach().to(device=basis.device, dtype=basis.dtype)
        width = V0.shape[-1] if local else basis.P
        if V0.dim() != 2 or V0.shape != (basis.b, width):
            raise ValueError(f"the starting block must have shape ({basis.b}, {width}), got {tuple(V0.shape)}")
        if local:   # the squared norms are sums over the ranks' entries
            norms = torch.sqrt(basis.reduce((V0.double() ** 2).sum(1)))
        else:
            norms = torch.linalg.vector_norm(V0.double(), dim=1)
        self.norms2 = (norms ** 2).cpu().numpy()
        if basis.b == 1:
            n = norms[0].to(V0.dtype) if local else torch.linalg.vector_norm(V0[0])
            basis.write(0, V0 / n if local else basis.layout(V0 / n))
            self.R0 = np.array([[float(n)]])
            return self.R0
        tol0 = 100 * self.eps * float(norms.max())
        Qn, B, _, status = self._next_block(0, V0 if local else basis.layout(V0), None, tol0)
        if status != "ok":
            raise ValueError("the starting block has no probe independent of the others (all are zero or "
                             "numerically dependent); pass probes drawn at random.")
        basis.write(0, Qn)
        self.R0 = B
        return B

    # ------------------------------------------------------------------ block QR with deflation
    def _next_block(self, k: int, W: torch.Tensor, norms: Optional[torch.Tensor], tol: float,
                    beta: Optional[float] = None):
        """Q_{next}, B (b, b) float64 (b = 1: the float beta), B on the device, and
        "ok" | "invariant" | "exhausted".

        W (b, c) is already orthogonal to rows [0, k); for b = 1, ``norms`` (1,) is its norm on the
        device and ``beta`` the same number already read back, and Q_{next} is W itself, not yet
        divided by beta: :meth:`_write` divides it on its way into the basis (one pass over it).
        """
        basis, b = self.basis, W.shape[0]
        if b == 1:
            beta = float(norms[0]) if beta is None else beta
            if not beta > tol:
                return W, beta, None, "invariant"
            return W, beta, norms.view(1, 1), "ok"
        Qn, R = basis.qr(W)
        B = R.double().cpu().numpy().copy()
        bad = [i for i in range(b) if not B[i, i] > tol]
        if len(bad) == b:
            return Qn, B, None, "invariant"
        for i in bad:
            B[i, :] = 0.0
            Qn[i] = 0.0
        floor = deflation_floor(basis.P, basis.dtype)
        for i in bad:
            for _ in range(3):  # a random vector loses at most a little to the projections; retry if not
                v = basis.project(k, basis.random_row(self.gen))
                for _ in range(2):
                    v = v - basis.reduce(v @ Qn.T) @ Qn
                n = float(basis.reduce(torch.linalg.vector_norm(v).square().reshape(1)).sqrt())
                if n > floor:
                    Qn[i] = v[0] / n
                    break
            else:
                return Qn, B, None, "exhausted"
        self.deflated += len(bad)
        return Qn, B, torch.as_tensor(B, dtype=basis.dtype).to(basis.device), "ok"

    def _write(self, row: int, Qn: torch.Tensor, B) -> None:
        """Store the next block; for b = 1 Qn is the unnormalised w and B = beta (q = w / beta)."""
        self.basis.write_scaled(row, Qn, B if self.basis.b == 1 else None)

    # ------------------------------------------------------------------ block steps
    def _product(self, row: int) -> torch.Tensor:
        basis, b = self.basis, self.basis.b
        X = basis.read(row, b)
        W = self.matmat(X)
        if not isinstance(W, torch.Tensor) or tuple(W.shape) != (b, basis.c):
            shape = tuple(W.shape) if isinstance(W, torch.Tensor) else type(W).__name__
            raise ValueError(f"{self.name} must be a ({b}, {basis.c}) tensor, got {shape}")
        if W.dtype != basis.dtype or W.device != basis.device:
            raise ValueError(f"{self.name} must be {basis.dtype} on {basis.device}, got {W.dtype} on {W.device}")
        W = W.detach()
        if basis.owns(W) or W.untyped_storage().data_ptr() == X.untyped_storage().data_ptr():
            W = W.clone()  # a product that returned its input must not overwrite the basis
        return W if W.is_contiguous() else W.contiguous()

    def _coefficients(self, H: torch.Tensor, norms: torch.Tensor):
        """A_j (b = 1: the float alpha), ||A_j||_2, max_i |w_i| and |w_0| from one read-back of the
        last b columns of H and the norms: the step's one host synchronisation and its NaN check."""
        b = norms.shape[0]
        vals = torch.cat((H[:, H.shape[1] - b:].reshape(-1), norms)).tolist()
        if not all(map(math.isfinite, vals)):
            raise NonFiniteError(
                f"a curvature-vector product returned NaN or Inf at Lanczos step {self.count}{self.where}. "
                "Check the loss at these weights (and the data for NaN), or use dtype=torch.float64.")
        if b == 1:
            return vals[0], abs(vals[0]), vals[1], vals[1]
        C = np.array(vals[: b * b]).reshape(b, b)
        A = (C + C.T) / 2
        return A, float(np.linalg.norm(A, 2)), max(vals[b * b:]), vals[-1]

    def run(self, steps: int, *, row: int = 0, residual: bool = False, keep_basis: bool = False) -> LanczosResult:
        """Run ``steps`` block steps from the block stored at rows [row, row + b).

        Rows [0, row) are *locked*: every product is projected out of them too (full bases only),
        and the result's ``coupling`` holds the first product's coefficients on them (b, row) (the
        arrowhead of a thick restart). ``residual=True`` also orthonormalises the last step's
        projected product into the rows after the last block (when the basis has room) and returns
        its coupling B_s as ``residual``: a later ``run(..., row=...)`` continues from there.
        The result's blocks are those of these steps only.
        """
        basis, b = self.basis, self.basis.b
        if row and not basis.keeps_all:
            raise ValueError(f"a run from row {row} needs a basis that keeps every row (reorth='full'); "
                             f"the {basis.name} basis keeps only the last blocks")
        diag, off, coupling, res_B, breakdown = [], [], None, None, False
        self.deflated = 0
        for j in range(steps):
            r = row + j * b
            W, H, norms = basis.orthogonalize(r, self._product(r), self.coupling)
            A, a_norm, rmax, beta = self._coefficients(H, norms)
            if j == 0 and r > 0:
                coupling = H[:, :r].double().cpu().numpy()
            diag.append(A)
            self.anorm = max(self.anorm, a_norm + self.prev_norm + rmax)
            self.count += 1
            if self.step_callback is not None:
                self.step_callback(b)
            last = j == steps - 1
            if last and not residual:
                break
            Qn, B, B_dev, status = self._next_block(r + b, W, norms, self.tol(), beta)
            if last:
                res_B = np.reshape(B, (b, b))
                if status == "ok" and basis.capacity is not None and r + 2 * b <= basis.capacity:
                    self._write(r + b, Qn, B)
                break
            if status != "ok":
                breakdown = True
                break
            self._write(r + b, Qn, B)
            off.append(B)
            self.coupling = B_dev
            self.prev_norm = B if b == 1 else float(np.linalg.norm(B, 2))
        k = row + len(diag) * b
        return LanczosResult(
            np.array(diag).reshape(-1, b, b) if diag else empty_blocks(b),
            np.array(off).reshape(-1, b, b) if off else empty_blocks(b),
            basis.rows(k) if keep_basis else None, breakdown, self.deflated, self.R0, self.norms2, res_B, coupling)
