"""hessfast's kernel layer: pure-PyTorch references, Triton kernels, the compiled C++/CUDA
modules (built from csrc/) and the one dispatch function that picks among them.

Public API:
    reorthogonalize(Q, k, W, backend="auto") -> (W2, coeffs, norms)   fused CGS2
    orthonormalize(W, backend="auto") -> (Qb, R)                        CholeskyQR2 / MGS
    SquaredHVPAccumulator(b, P, dtype, device)                          streamed per-sample HVP sums
    backends() -> dict, resolve_backend(backend, tensor) -> str
"""
from .dispatch import BACKENDS, backends, resolve_backend
from .orthonormalization import orthonormalize
from .reorth import reorthogonalize
from .sqhvp import SquaredHVPAccumulator

__all__ = ["BACKENDS", "backends", "resolve_backend", "reorthogonalize", "orthonormalize", "SquaredHVPAccumulator"]
