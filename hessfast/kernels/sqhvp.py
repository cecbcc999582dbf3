"""Streamed per-sample squared-HVP accumulation (the inner loop of hessfast.variance).

For probes v_r (r < b) and per-sample Hessian products u_{i,r} = H_i v_r, the Hessian variance
along v_r needs  sum_i ||u_{i,r}||^2,  sum_i u_{i,r}  and  sum_i v_r . u_{i,r}.  The samples come
in chunks (e.g. from ``torch.func.vmap`` over a mini-batch); each chunk is read once.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._checks import check_tensor, stream_ptr
from .dispatch import cpu_module, cuda_module, resolve_backend
from .reference import sqhvp_reference


def _sqhvp_torch(U, V, sum_u, sum_sq, sum_vu):
    sq, su, vu = sqhvp_reference(U, V)
    sum_u += su
    sum_sq += sq
    sum_vu += vu


def _sqhvp_cpu(U, V, sum_u, sum_sq, sum_vu):
    cpu_module().sqhvp(U.numpy(), V.numpy(), sum_u.numpy(), sum_sq.numpy(), sum_vu.numpy(), torch.get_num_threads())


def _sqhvp_cuda(U, V, sum_u, sum_sq, sum_vu):
    mod = cuda_module()
    c, b, P = U.shape
    with torch.cuda.device(U.device):
        grid = mod.sqhvp_grid(P)
        part = torch.empty(grid, 2, b, dtype=U.dtype, device=U.device)
        mod.sqhvp(U.element_size(), U.data_ptr(), c, b, P, V.data_ptr(), sum_u.data_ptr(), part.data_ptr(), grid,
                  stream_ptr(U))
        s = part.double().sum(0)
    sum_sq += s[0]
    sum_vu += s[1]


def _sqhvp_triton(U, V, sum_u, sum_sq, sum_vu):
    from .triton_kernels import sqhvp_triton

    sqhvp_triton(U, V, sum_u, sum_sq, sum_vu)


SQHVP_IMPLS = {"torch": _sqhvp_torch, "cpu": _sqhvp_cpu, "cuda": _sqhvp_cuda, "triton": _sqhvp_triton}


class SquaredHVPAccumulator:
    """Running sums of per-sample Hessian-vector products for b probes, mergeable across chunks.

    Fields (all on the accumulator's device):
        sum_sq (b,) float64:  sum_i ||u_{i,r}||^2
        sum_u  (b, P) dtype:  sum_i u_{i,r}
        sum_vu (b,) float64:  sum_i v_r . u_{i,r}
        count  int:           number of samples i seen

    Usage::

        acc = SquaredHVPAccumulator(b, P, dtype=torch.float64)
        for xs, ys in chunks:                       # c samples per chunk
            U = per_sample_hvps(xs, ys, V)          # (c, b, P), e.g. torch.func.vmap over samples
            acc.update(U, V)                        # one pass over U
        acc.merge(other_acc)                        # e.g. from another process / data shard
        acc.mean_u()                                # (b, P): (1/N) sum_i H_i v_r = H v_r
        acc.variance()                              # (b,): (1/N) sum_i |H_i v_r|^2 - |H v_r|^2

    Args:
        b: number of probes. P: vector length. dtype/device: those of U and V.
        backend: "auto", "torch", "cpu", "cuda" or "triton" (see hessfast.kernels.resolve_backend);
            each meets the accumulation contract stated in :mod:`hessfast.kernels.reference`.
    """

    def __init__(self, b: int, P: int, dtype: torch.dtype = torch.float32, device="cpu", backend: str = "auto"):
        if b < 1 or P < 1:
            raise ValueError(f"SquaredHVPAccumulator needs b >= 1 and P >= 1, got b={b}, P={P}")
        self.b, self.P, self.backend = int(b), int(P), backend
        self.sum_u = torch.zeros(b, P, dtype=dtype, device=device)
        self.sum_sq = torch.zeros(b, dtype=torch.float64, device=device)
        self.sum_vu = torch.zeros(b, dtype=torch.float64, device=device)
        self.count = 0

    def update(self, U: torch.Tensor, V: torch.Tensor, backend: Optional[str] = None) -> "SquaredHVPAccumulator":
        """Add a chunk: U (c, b, P) with U[i, r] = H_i v_r, probes V (b, P). Returns self."""
        fn = "SquaredHVPAccumulator.update"
        b, P = self.b, self.P
        check_tensor(fn, "U", U, 3, f"(c, {b}, {P})", dtype=self.sum_u.dtype, device=self.sum_u.device)
        check_tensor(fn, "V", V, 2, f"({b}, {P})", dtype=self.sum_u.dtype, device=self.sum_u.device)
        if U.shape[1:] != (b, P):
            raise ValueError(f"{fn}: U must have shape (c, {b}, {P}), got {tuple(U.shape)}")
        if V.shape != (b, P):
            raise ValueError(f"{fn}: V must have shape ({b}, {P}), got {tuple(V.shape)}")
        name = resolve_backend(backend or self.backend, U)
        U, V = U.detach(), V.detach()
        if name != "torch":
            U, V = U.contiguous(), V.contiguous()
        if U.shape[0] > 0:
            SQHVP_IMPLS[name](U, V, self.sum_u, self.sum_sq, self.sum_vu)
        self.count += U.shape[0]
        return self

    def merge(self, other: "SquaredHVPAccumulator") -> "SquaredHVPAccumulator":
        """Add another accumulator's sums (same b, P, dtype; same probes). Returns self."""
        if (other.b, other.P, other.sum_u.dtype) != (self.b, self.P, self.sum_u.dtype):
            raise ValueError(f"SquaredHVPAccumulator.merge: shapes/dtypes differ: (b={other.b}, P={other.P}, "
                             f"{other.sum_u.dtype}) vs (b={self.b}, P={self.P}, {self.sum_u.dtype})")
        self.sum_u += other.sum_u.to(self.sum_u.device)
        self.sum_sq += other.sum_sq.to(self.sum_sq.device)
        self.sum_vu += other.sum_vu.to(self.sum_vu.device)
        self.count += other.count
        return self

    def mean_u(self) -> torch.Tensor:
        """(b, P): the mean product (1/N) sum_i u_{i,r}."""
        return self.sum_u / max(self.count, 1)

    def variance(self) -> torch.Tensor:
        """(b,) float64: (1/N) sum_i ||u_{i,r}||^2 - ||(1/N) sum_i u_{i,r}||^2 (population form)."""
        n = max(self.count, 1)
        mean_sq = torch.linalg.vector_norm(self.sum_u.double(), dim=1) ** 2 / n ** 2
        return self.sum_sq / n - mean_sq
