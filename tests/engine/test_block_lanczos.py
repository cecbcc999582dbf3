"""Block Lanczos on explicit dense symmetric matrices (float64 dense truth)."""
import numpy as np
import pytest
import torch

from hessfast.engine import block_lanczos, block_lanczos_spectrum


def dense_case(P=60, top=10.0, mult=3, seed=0):
    """Symmetric A (P, P) with eigenvalue `top` of multiplicity `mult`, the rest spread in [-1, 5]."""
    g = torch.Generator().manual_seed(seed)
    evals = torch.cat([torch.full((mult,), top, dtype=torch.float64),
                       torch.linspace(-1.0, 5.0, P - mult, dtype=torch.float64)])
    U, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=torch.float64))
    return (U * evals) @ U.T, evals


def single_lanczos(A, v, m):
    """Plain single-vector Lanczos with full reorthogonalisation (test oracle)."""
    Q = torch.zeros(m, A.shape[0], dtype=A.dtype)
    Q[0] = v / v.norm()
    a, bt = [], []
    for j in range(m):
        w = A @ Q[j]
        for _ in range(2):
            w = w - Q[: j + 1].T @ (Q[: j + 1] @ w)
        a.append(float(Q[j] @ (A @ Q[j])))
        if j + 1 < m:
            bt.append(float(w.norm()))
            Q[j + 1] = w / bt[-1]
    T = np.diag(a) + np.diag(bt, 1) + np.diag(bt, -1)
    th, S = np.linalg.eigh(T)
    return th, S[0] ** 2


def test_block_resolves_repeated_top_eigenvalue(backend, backend_device):
    dev = backend_device
    A, evals = dense_case()
    V0 = torch.randn(3, 60, dtype=torch.float64)
    theta, w, info = block_lanczos(lambda X: X @ A.to(dev), V0.to(dev), 30, backend=backend)
    assert info["steps"] == 10 and theta.shape == (30,) and w.shape == (3, 30)
    assert int(np.sum(np.abs(theta - 10.0) < 1e-8)) == 3          # multiplicity found
    th1, _ = single_lanczos(A, V0[0], 30)
    assert int(np.sum(np.abs(th1 - 10.0) < 1e-9)) == 1             # single-vector Lanczos: one converged copy
    assert abs(th1.max() - 10.0) < 1e-8 and abs(theta.max() - 10.0) < 1e-8
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-12)


def test_block_bfloat16_basis_keeps_the_multiplicity(backend, backend_device):
    """A bfloat16 basis (float32 blocks): the triple top eigenvalue is still found three times, to 1e-3
    relative (2e-4 measured), and the Gauss weights still sum to one."""
    dev = backend_device
    A, evals = dense_case()
    A32 = A.float().to(dev)
    V0 = torch.randn(3, 60, dtype=torch.float64).float()
    theta, w, info = block_lanczos(lambda X: X @ A32, V0.to(dev), 30, backend=backend, basis_dtype=torch.bfloat16)
    assert info["steps"] == 10 and theta.shape == (30,)
    assert int(np.sum(np.abs(theta - 10.0) < 1e-2)) == 3
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-5)


def test_block_quadrature_moments_and_full_space():
    A, evals = dense_case(P=48, mult=2, seed=1)
    V0 = torch.randn(4, 48, dtype=torch.float64)
    theta, w, info = block_lanczos(lambda X: X @ A, V0, 16, backend="torch")   # s = 4 block steps
    for i in range(4):
        v = V0[i]
        for p in range(0, 2 * info["steps"]):                  # block Gauss: exact to degree 2s - 1
            exact = float(v @ torch.linalg.matrix_power(A, p) @ v / (v @ v))
            assert abs(float(w[i] @ theta ** p) - exact) <= 1e-9 * max(1.0, abs(exact))
    theta, w, info = block_lanczos(lambda X: X @ A, V0, 48, backend="cpu")      # M = P: all eigenvalues
    np.testing.assert_allclose(np.sort(theta), np.sort(evals.numpy()), atol=1e-10)


def test_block_agrees_with_single_vector_lanczos():
    A, evals = dense_case(P=80, mult=1, seed=2)
    V0 = torch.randn(2, 80, dtype=torch.float64)
    theta, w, _ = block_lanczos(lambda X: X @ A, V0, 40)
    th1, w1 = single_lanczos(A, V0[0], 40)
    top = float(evals.max())                      # isolated top eigenvalue: both converge to dense truth
    assert abs(theta.max() - top) < 1e-10 * top and abs(th1.max() - top) < 1e-10 * top
    for p in (1, 2, 3):   # same spectral moments of probe 0
        assert abs(float(w[0] @ theta ** p) - float(w1 @ th1 ** p)) < 1e-9 * float(evals.abs().max()) ** p


def test_deflation_and_spectrum_padding():
    A = torch.diag(torch.tensor([3.0, 3.0, 1.0, 1.0, 1.0, 0.5] + [0.0] * 10, dtype=torch.float64))
    V0 = torch.randn(5, 16, dtype=torch.float64)
    V0[4] = V0[0] + V0[1]                                     # a dependent probe
    ritz, weights, steps, breakdown = block_lanczos_spectrum(lambda X: X @ A, V0, 8, 2, bar=None)
    assert ritz.shape == weights.shape and ritz.shape[0] == 5
    np.testing.assert_allclose(weights.sum(1), 1.0, atol=1e-12)
    for i in range(5):
        th = ritz[i, : steps[i]]
        assert abs(float(weights[i, : steps[i]] @ th) - float(V0[i] @ A @ V0[i] / (V0[i] @ V0[i]))) < 1e-10
    theta, w, info = block_lanczos(lambda X: X @ A, V0[:4], 16)
    assert info["deflated"] > 0 or info["breakdown"]          # rank-2 start space of a 4-eigenvalue-cluster A
    assert np.isfinite(theta).all()


def test_matmat_errors():
    V0 = torch.randn(2, 10, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"matmat\(X\) must be a \(2, 10\) tensor"):
        block_lanczos(lambda X: X[:1], V0, 4)
    with pytest.raises(ValueError, match=r"m = 11 must lie in \[1, P = 10\]"):
        block_lanczos(lambda X: X, V0, 11)
