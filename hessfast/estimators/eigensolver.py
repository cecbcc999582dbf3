"""The k extreme eigenpairs of a curvature operator by thick-restart (Krylov-Schur) block Lanczos.

Thick restart (Wu & Simon 2000, "Thick-restart Lanczos method for large symmetric eigenvalue
problems", SIMAX 22(2); Stewart's Krylov-Schur form) keeps the basis at most ``max_subspace`` rows.
A cycle ends with the Krylov-Schur decomposition of the n stored rows Q (n, P):

    A Q^T = Q^T T + Q_r^T C,        T = Q A Q^T (n, n),  C = Q_r A Q^T (b, n),          (1)

Q_r (b, P) the next (residual) block. With T = S diag(theta) S^T the Ritz pairs (theta_i, y_i = S_i^T Q)
have residuals ||A y_i - theta_i y_i|| = ||C s_i||_2 (from (1), Q_r orthonormal), and a pair is
converged when that is <= tol * ||A||, ||A|| estimated by the largest |Ritz value| seen.
The restart keeps the l wanted-most Ritz vectors Y (l = k plus one per converged wanted pair, up to
half the free rows, as ARPACK adapts its restarts) and Q_r as rows [0, l + b) of the basis, so (1)
holds again with T = diag(theta_kept) and C = C S_kept (the "arrowhead"), and the engine's
recurrence continues from row l (:meth:`hessfast.engine.Lanczos.run` with ``row=l``): every new
product is projected out of the kept rows by full reorthogonalisation (CGS2), and the first
product's coefficients on them are the arrowhead, measured (``result.coupling``).

Blocks of b > 1 vectors (``block_size``) find eigenvalues of multiplicity up to b (a single
vector's Krylov space holds one vector of each eigenspace). An operator with P <= max_subspace is
diagonalised densely from P products with the unit vectors.
"""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from ..engine import DeviceBasis, Lanczos, LanczosResult, probe_vectors
from ..utils.memory import basis_rows, plan_basis
from ._linear import as_operator, block_rows, matmat, parameter_layout, split_parameters

WHICH = ("LA", "SA", "LM", "BE")
FORMAT = "hessfast.Eigenpairs/1"


@dataclass
class Eigenpairs:
    """k eigenpairs of a symmetric operator A.

    Attributes:
        values: (k,) float64: descending for ``which="LA"``, ascending for ``"SA"`` and ``"BE"``,
            by descending magnitude for ``"LM"``.
        vectors: (k, P) orthonormal rows (the operator's dtype and device), ``vectors[i]`` for
            ``values[i]``.
        residuals: (k,) float64 ||A x_i - lambda_i x_i|| (from the Krylov-Schur relation (1)).
        converged: every residual is <= tol * ||A|| (``meta["norm_estimate"]``).
        num_matvecs: products with A made.
        which: the part of the spectrum asked for.
        meta: P, N, curvature, dtype, k, tol, max_subspace, block_size, restarts, method, elapsed.
        layout: [(name, shape)] of the parameters of a flat vector, when the operator says.
    """

    values: np.ndarray
    vectors: torch.Tensor = field(repr=False)
    residuals: np.ndarray
    converged: bool
    num_matvecs: int
    which: str
    meta: dict = field(default_factory=dict, repr=False)
    layout: Optional[list] = field(default=None, repr=False)

    @property
    def k(self) -> int:
        return len(self.values)

    def as_parameters(self, i: int) -> dict:
        """Eigenvector ``i`` as {parameter name: tensor of the parameter's shape}."""
        if not -self.k <= i < self.k:
            raise IndexError(f"Eigenpairs.as_parameters: index {i} out of range for {self.k} eigenpairs.")
        return split_parameters(self.vectors[i], self.layout, "Eigenpairs.as_parameters")

    def __str__(self) -> str:
        vals = ", ".join(f"{v:.6g}" for v in self.values)
        state = "converged" if self.converged else "NOT converged"
        rel = float(np.max(self.residuals)) / max(float(self.meta.get("norm_estimate") or 1.0), 1e-300)
        return (f"hessfast.Eigenpairs ({self.which}, k = {self.k}, {state}, max ||Hx - lambda x|| / ||H|| = "
                f"{rel:.2g}, {self.num_matvecs} products)\n  values = [{vals}]")

    def plot(self, path=None, ax=None):
        """The k eigenvalues (stems) and their relative residuals (log scale, right axis); saved to ``path`` (PNG)."""
        from ..utils.plotting import figure_axes

        with figure_axes(ax, path) as ax:
            idx = np.arange(1, self.k + 1)
            ax.stem(idx, self.values, basefmt=" ")
            ax.set_xlabel(f"eigenpair ({self.which})")
            ax.set_ylabel(r"$\lambda_i$")
            rel = np.maximum(self.residuals / max(float(self.meta.get("norm_estimate") or 1.0), 1e-300), 1e-18)
            twin = ax.twinx()
            twin.semilogy(idx, rel, "C3x", label=r"$\|Hx - \lambda x\| / \|H\|$")
            twin.axhline(self.meta.get("tol", np.nan), color="C3", lw=0.6, ls="--")
            twin.set_ylabel("relative residual")
            twin.legend(loc="upper right", fontsize=8)
            ax.set_title(f"{self.meta.get('curvature') or 'operator'}: {self.k} eigenpairs, "
                         f"{self.num_matvecs} products")
        return ax

    def to_dict(self) -> dict:
        """Everything but the vectors, as plain JSON."""
        from ..utils.serialization import jsonable

        return jsonable({"format": FORMAT, "values": self.values, "residuals": self.residuals,
                         "converged": self.converged, "num_matvecs": self.num_matvecs, "which": self.which,
                         "meta": self.meta, "layout": self.layout})

    def save(self, path) -> None:
        """``path`` (JSON) and the vectors beside it in ``<stem>.vectors.pt`` (a tensor, no pickled objects)."""
        path = Path(path)
        tensors = path.with_suffix(".vectors.pt")
        d = self.to_dict()
        d["vectors_file"] = tensors.name
        torch.save({"vectors": self.vectors.detach().cpu()}, tensors)
        path.write_text(json.dumps(d, indent=1) + "\n")

    @classmethod
    def load(cls, path) -> "Eigenpairs":
        """Read what :meth:`save` wrote (the tensors with ``torch.load(weights_only=True)``)."""
        path = Path(path)
        d = json.loads(path.read_text())
        if d.get("format") != FORMAT:
            raise ValueError(f"{path} is not a saved hessfast.Eigenpairs (format {d.get('format')!r}).")
        vectors = torch.load(path.with_name(d["vectors_file"]), map_location="cpu", weights_only=True)["vectors"]
        layout = [(n, tuple(s)) for n, s in d["layout"]] if d.get("layout") is not None else None
        nan = lambda a: np.array([np.nan if v is None else v for v in a], dtype=np.float64)  # noqa: E731
        return cls(nan(d["values"]), vectors, nan(d["residuals"]), bool(d["converged"]), int(d["num_matvecs"]),
                   d["which"], d.get("meta", {}), layout)


def select(theta: np.ndarray, count: int, which: str) -> np.ndarray:
    """Indices of the ``count`` Ritz values of ``theta`` (ascending) most wanted by ``which``, in output order."""
    n = len(theta)
    count = min(count, n)
    if which == "LA":
        return np.arange(n - 1, n - 1 - count, -1)
    if which == "SA":
        return np.arange(count)
    if which == "LM":
        return np.argsort(-np.abs(theta), kind="stable")[:count]
    hi = count - count // 2                              # "BE": one more from the top when count is odd
    return np.concatenate([np.arange(count // 2), np.arange(n - hi, n)])


def default_tol(dtype: torch.dtype) -> float:
    """1e-10 in float64, 1e-5 otherwise (float32 compute), both relative to ||A||."""
    return 1e-10 if dtype == torch.float64 else 1e-5


class ThickRestart:
    """The restarted recurrence on one :class:`~hessfast.engine.DeviceBasis` of ``max_subspace + b`` rows.

    ``run()`` returns (theta (k,), S-combinations as vectors (k, P), residuals (k,), converged, restarts).
    """

    def __init__(self, product: Callable, P: int, dtype, device, *, k: int, which: str, tol: float,
                 max_subspace: int, b: int, seed: int, max_restarts: int, backend: str):
        self.product, self.P, self.k, self.which, self.tol = product, P, k, which, tol
        self.n_max, self.b, self.seed, self.max_restarts = max_subspace, b, seed, max_restarts
        plan_basis(max_subspace, P, dtype, device, block_size=b).check()
        self.basis = DeviceBasis(basis_rows(max_subspace, b), b, P, dtype, device, backend=backend)
        self.lz = Lanczos(product, self.basis, seed=seed, name="matmat(V) of eigenpairs")
        self.norm = 0.0

    def keep_count(self, converged: int) -> int:
        """Ritz vectors kept at a restart: the k wanted plus one more per wanted pair already
        converged, up to half the free rows (the adaptive rule of ARPACK's implicit restarts, which
        gives the unconverged pairs a wider gap as the converged ones lock in), leaving one block step."""
        extra = min(converged, (self.n_max - self.k) // 2)
        return min(self.k + extra, self.n_max - self.b)

    def cycle(self, kept: int, theta_kept: np.ndarray):
        """Block steps from row ``kept`` until the basis is full or the wanted pairs converge.

        Yields (T (n, n), C (b, n), invariant) of (1) after every step: ``invariant`` when the
        residual block is (numerically) zero, so the n rows span an invariant subspace; the cycle
        then goes on from a fresh random block orthogonal to them while the basis has room.
        """
        b, diag, off = self.b, [], []
        T0 = np.diag(theta_kept)
        for j in range((self.n_max - kept) // b):
            res = self.lz.run(1, row=kept + j * b, residual=True)
            if j == 0:
                coupling = res.coupling if kept else np.zeros((b, 0))
            diag.append(res.diag[0])
            n = kept + len(diag) * b
            T = np.zeros((n, n))
            T[:kept, :kept] = T0
            T[kept:kept + b, :kept] = coupling
            T[:kept, kept:kept + b] = coupling.T
            T[kept:, kept:] = LanczosResult(np.array(diag), np.array(off).reshape(-1, b, b)).T
            C = np.zeros((b, n))
            # the engine wrote the next block (and (1) holds with it) unless the space is invariant
            invariant = not np.any(np.diag(res.residual) > self.lz.tol())
            if not invariant:
                C[:, n - b:] = res.residual
            yield T, C, invariant
            if invariant:
                if n + b > self.n_max:
                    return
                # the next block is a fresh random one orthogonal to all n rows, with zero coupling
                self.basis.write(n, self.fresh_block(n))
                off.append(np.zeros((b, b)))
            else:
                off.append(res.residual)

    def fresh_block(self, rows: int) -> torch.Tensor:
        """A random orthonormal (b, P) block orthogonal to the stored rows [0, rows)."""
        basis = self.basis
        V = torch.randn(self.b, self.P, generator=self.lz.gen, dtype=torch.float64).to(basis.device, basis.dtype)
        for _ in range(2):
            V = basis.project(rows, V)
        return basis.qr(V)[0]

    def restart(self, S_keep: np.ndarray, n: int, invariant: bool) -> None:
        """Rows [0, l) <- the kept Ritz vectors S_keep^T Q; rows [l, l + b) <- Q_r, or a random
        block orthogonal to them when the space was invariant (then C = 0 and any new block will do)."""
        basis, l = self.basis, S_keep.shape[1]
        Q = basis.read(0, n)
        Y = torch.as_tensor(S_keep.T, dtype=Q.dtype, device=Q.device) @ Q
        R = None if invariant else basis.read(n, self.b).clone()
        basis.write(0, Y)
        basis.write(l, self.fresh_block(l) if invariant else R)

    def run(self) -> tuple:
        self.lz.start(probe_vectors(self.b, self.P, self.seed, self.basis.dtype, self.basis.device))
        kept, theta_kept, restarts = 0, np.zeros(0), 0
        while True:
            for T, C, invariant in self.cycle(kept, theta_kept):
                if invariant and T.shape[0] + self.b <= self.n_max:
                    # a Krylov space can miss copies of a repeated eigenvalue: never stop on an
                    # invariant subspace while a fresh block fits (the cycle continues with one)
                    continue
                theta, S = np.linalg.eigh(T)
                self.norm = max(self.norm, float(np.abs(theta).max()))
                resid = np.linalg.norm(C @ S, axis=0)
                want = select(theta, self.k, self.which)
                done = resid[want] <= self.tol * self.norm
                converged = len(want) == self.k and bool(done.all())
                if converged:
                    break
            if converged or restarts >= self.max_restarts:
                Q = self.basis.read(0, T.shape[0])
                X = torch.as_tensor(S[:, want].T.copy(), dtype=Q.dtype, device=Q.device) @ Q
                return theta[want], X, resid[want], converged, restarts
            keep = np.sort(select(theta, self.keep_count(int(done.sum())), self.which))
            self.restart(S[:, keep], T.shape[0], invariant)
            kept, theta_kept, restarts = len(keep), theta[keep], restarts + 1


def dense_eigenpairs(op, k: int, which: str, block: int) -> tuple:
    """(values, vectors, residuals) from the dense matrix of P products with the unit vectors (float64)."""
    eye = torch.eye(op.P, dtype=op.dtype, device=op.device)
    A = matmat(op, eye, block, "eigenpairs (dense)").double().cpu()
    A = (A + A.T) / 2
    theta, S = torch.linalg.eigh(A)
    want = select(theta.numpy(), k, which)
    S = S[:, torch.as_tensor(want)]
    resid = torch.linalg.vector_norm(A @ S - S * theta[torch.as_tensor(want)], dim=0).numpy()
    return theta.numpy()[want], S.T.to(dtype=op.dtype, device=op.device).contiguous(), resid


def check_args(k, which, tol, max_subspace, block_size, P, dtype) -> tuple:
    """Validated (k, tol, max_subspace, block_size); errors name the argument and the fix."""
    for name, v in (("k", k), ("block_size", block_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"eigenpairs: {name} must be a positive int, got {v!r}.")
    if which not in WHICH:
        raise ValueError(f"eigenpairs: unknown which={which!r}; choose 'LA' (largest), 'SA' (smallest, most "
                         "negative), 'LM' (largest magnitude) or 'BE' (both ends).")
    if k > P:
        raise ValueError(f"eigenpairs: k = {k} exceeds the operator's dimension P = {P}.")
    tol = default_tol(dtype) if tol is None else float(tol)
    eps = torch.finfo(dtype).eps
    if not tol >= 10 * eps:
        raise ValueError(f"eigenpairs: tol = {tol:g} is below what {str(dtype).replace('torch.', '')} reaches "
                         f"(about {10 * eps:.1g} of ||A||); raise tol or compute in dtype=torch.float64.")
    if max_subspace is None:
        max_subspace = max(2 * k + 1, 20, k + 2 * block_size)
    elif isinstance(max_subspace, bool) or not isinstance(max_subspace, int) or max_subspace < k + block_size:
        raise ValueError(f"eigenpairs: max_subspace must be an int >= k + block_size = {k + block_size} (the k "
                         f"kept vectors and one block), got {max_subspace!r}; 2k + 1 or more restarts less.")
    return k, tol, min(max_subspace, P), block_size


def eigenpairs(model_or_operator: Any, data: Any = None, k: int = 10, which: str = "LA", tol: Optional[float] = None,
               max_subspace: Optional[int] = None, block_size: int = 1, seed: int = 0, max_restarts: int = 500,
               curvature: Optional[str] = None, loss_fn: Optional[Callable] = None, backend: str = "auto",
               **operator_kwargs) -> Eigenpairs:
    """The k extreme eigenvalues and eigenvectors of the Hessian or GGN (or any symmetric operator).

    Thick-restart block Lanczos with full reorthogonalisation (module docstring, eq. (1)).

    Args:
        model_or_operator: an ``nn.Module`` (with ``data``), a :class:`hessfast.CurvatureOperator`, or
            any object with ``matmat(V)`` (b, P) -> (b, P), ``P``, ``dtype`` and ``device``.
        data: one ``(inputs, targets)`` batch or an iterable of batches (mean loss over all samples).
        k: eigenpairs wanted.
        which: ``"LA"`` largest algebraic, ``"SA"`` smallest algebraic (most negative), ``"LM"``
            largest magnitude, ``"BE"`` both ends (k // 2 from the bottom, the rest from the top).
        tol: a pair is converged when ||A x - lambda x|| <= tol * ||A||; default 1e-5 (float32
            compute) or 1e-10 (float64).
        max_subspace: rows of the basis at most (memory: (max_subspace + block_size) x P values);
            default max(2k + 1, 20), capped at P. With P <= max_subspace the operator is made dense
            from P products and diagonalised exactly.
        block_size: vectors per block; use b >= the multiplicity of repeated eigenvalues to find all copies.
        seed: seeds the starting block (Gaussian, drawn on the CPU).
        max_restarts: restarts before giving up (then ``converged=False`` and a warning).
        curvature, loss_fn, **operator_kwargs (``dtype``, ``bn_mode``, ...): build the operator from
            (model, data), as in :func:`hessfast.lanczos`.
        backend: kernel backend of the reorthogonalisation.

    Returns:
        :class:`Eigenpairs`; the model is left as it was.
    """
    start = time.perf_counter()
    op = as_operator(model_or_operator, data, curvature=curvature, loss_fn=loss_fn, operator_kwargs=operator_kwargs,
                     caller="eigenpairs")
    k, tol, n_max, b = check_args(k, which, tol, max_subspace, block_size, op.P, op.dtype)
    block = block_rows(op)
    count = [0]

    def product(X: torch.Tensor) -> torch.Tensor:
        count[0] += X.shape[0]
        return matmat(op, X, block, "eigenpairs")

    restarts = 0
    if n_max >= op.P:
        values, vectors, resid = dense_eigenpairs(op, k, which, block)
        count[0], converged, method, norm = op.P, True, "dense", None
    else:
        solver = ThickRestart(product, op.P, op.dtype, op.device, k=k, which=which, tol=tol, max_subspace=n_max,
                              b=b, seed=seed, max_restarts=max_restarts, backend=backend)
        values, vectors, resid, converged, restarts = solver.run()
        method, norm = "thick-restart lanczos", solver.norm
        if not converged:
            warnings.warn(f"eigenpairs: not converged after {restarts} restarts ({count[0]} products): largest "
                          f"relative residual {float(np.max(resid)) / max(norm, 1e-300):.2g} > tol = {tol:g}; "
                          "raise max_restarts or max_subspace, or loosen tol.", RuntimeWarning, stacklevel=2)
    meta = {"P": op.P, "N": getattr(op, "N", None), "curvature": getattr(op, "curvature", None),
            "dtype": str(op.dtype).replace("torch.", ""), "k": k, "which": which, "tol": tol,
            "max_subspace": n_max, "block_size": b, "seed": int(seed), "restarts": restarts, "method": method,
            "norm_estimate": norm if norm is not None else float(np.max(np.abs(values))),
            "elapsed": time.perf_counter() - start}
    return Eigenpairs(np.asarray(values, dtype=np.float64).copy(), vectors, np.asarray(resid, dtype=np.float64),
                      bool(converged), count[0], which, meta, parameter_layout(op))


