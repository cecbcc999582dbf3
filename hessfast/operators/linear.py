"""What every P x P curvature operator derives from its ``matvec`` and ``matmat``: ``@``, ``shape``, the dense
matrix and a SciPy ``LinearOperator``. Shared by :class:`~.base.CurvatureOperator` and
:class:`~.fsdp.FSDPOperator`."""
from __future__ import annotations

import numpy as np
import torch


class SymmetricOperator:
    """Mixin for a symmetric operator with ``P``, ``dtype``, ``device``, ``matvec`` (P,) -> (P,) and
    ``matmat`` (b, P) -> (b, P)."""

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        return self.matvec(v) if v.dim() == 1 else self.matmat(v.T).T

    @property
    def shape(self) -> tuple:
        return (self.P, self.P)

    def to_dense(self, chunk: int = 64) -> torch.Tensor:
        """The full P x P matrix (for small models and tests)."""
        eye = torch.eye(self.P, dtype=self.dtype, device=self.device)
        return torch.cat([self.matmat(eye[i:i + chunk]) for i in range(0, self.P, chunk)])

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 numpy in and out), e.g. for ``eigsh``."""
        from scipy.sparse.linalg import LinearOperator

        def mv(x):
            x = torch.as_tensor(np.asarray(x).reshape(-1), dtype=self.dtype, device=self.device)
            return self.matvec(x).detach().cpu().double().numpy()

        def mm(X):
            X = torch.as_tensor(np.asarray(X), dtype=self.dtype, device=self.device)
            return self.matmat(X.T.contiguous()).T.detach().cpu().double().numpy()

        return LinearOperator(self.shape, matvec=mv, rmatvec=mv, matmat=mm, dtype=np.float64)
