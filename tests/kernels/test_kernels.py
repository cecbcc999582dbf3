"""Every kernel backend judged against high-precision truth, with the same-precision reference as yardstick.

For each op and input, the truth is the op evaluated on the same inputs in numpy's longdouble (80-bit
extended precision on x86-64: exact float64 products, 11 more bits than float64 in the sums), so it
is truth for float64 inputs too; the pure-PyTorch reference (hessfast/kernels/reference.py) run in
the inputs' precision has some error against it, and a backend may be at most twice as far from the
truth, plus a floor of 5 eps for outputs the reference gets (nearly) exactly (``assert_near_truth``).
The reference's own error is checked against a loose bound, so that a broken yardstick cannot pass
everything, and the CholeskyQR2 reference against Householder QR (an independent oracle).  Inputs
are fresh random tensors, outputs are poisoned with NaN before each call, sizes are awkward (P prime
or just past a tile, b = 1, 2, 3, 5, 8, 13, k = 0, 1, 9, 15, 17 and k = m+1).  Triton runs under
TRITON_INTERPRET=1 (tests/conftest.py, which also parametrizes the ``backend`` fixture); CUDA cases run
only where a GPU is usable. The truth helpers (``ld``, ``rel``, ``assert_near_truth``) are in tests/truth.py.
"""
import functools
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hessfast.kernels import backends, orthonormalize, reorthogonalize
from hessfast.kernels.orthonormalization import ORTH_IMPLS
from hessfast.kernels.reference import cgs2_reference, cholqr2_reference, qr_reference
from hessfast.kernels.reorth import CGS2_IMPLS

from truth import LD, assert_near_truth, ld, rel


def cgs2_truth(Q, k, W):
    """(W2, coeffs, norms) of CGS2 (reference.cgs2_reference's formulas) in longdouble."""
    Qk, X = ld(Q[:k]), ld(W)
    h1 = X @ Qk.T
    X = X - h1 @ Qk
    h2 = X @ Qk.T
    X = X - h2 @ Qk
    return X, h1 + h2, np.sqrt((X * X).sum(1))


def qr_truth(W):
    """(Qb, R) of W's rows in longdouble, by Gram-Schmidt with each projection applied twice
    (accurate to cond(W) times longdouble's eps; full-rank blocks only)."""
    X = ld(W).copy()
    b = X.shape[0]
    R = np.zeros((b, b), dtype=LD)
    for i in range(b):
        for _ in range(2):
            c = X[:i] @ X[i]
            X[i] -= c @ X[:i]
            R[:i, i] += c
        R[i, i] = np.sqrt(X[i] @ X[i])
        X[i] /= R[i, i]
    return X, R


def random_basis(rows, P, dtype, device, pad=0):
    """(rows, P) orthonormal rows, as a view with row stride P + pad (a slice of a wider buffer)."""
    Qt, _ = torch.linalg.qr(torch.randn(P, rows, dtype=torch.float64))
    buf = torch.randn(rows, P + pad, dtype=torch.float64)
    buf[:, :P] = Qt.T
    return buf.to(dtype=dtype, device=device)[:, :P]


def _run_cgs2(backend, Q, k, W):
    """(W2, coeffs, norms) of CGS2_IMPLS[backend] with NaN-poisoned outputs."""
    W2 = W.clone()
    coeffs = torch.full((W.shape[0], k), float("nan"), dtype=W.dtype, device=W.device)
    norms = torch.full((W.shape[0],), float("nan"), dtype=W.dtype, device=W.device)
    CGS2_IMPLS[backend](Q, k, W2, coeffs, norms)
    assert torch.isfinite(coeffs).all() and torch.isfinite(norms).all()
    return W2, coeffs, norms


def _check_cgs2(backend, Q, k, W):
    truth = cgs2_truth(Q, k, W)
    ref = cgs2_reference(Q, k, W)
    got = _run_cgs2(backend, Q, k, W)
    assert all(t.dtype == W.dtype for t in got)
    for name, g, r, t in zip(("W2", "coeffs", "norms"), got, ref, truth):
        if t.size:
            assert_near_truth(f"{backend} CGS2 {name}", rel(g, t), rel(r, t), W.dtype)


CGS2_CASES = [  # (m+1 rows, k, b, P, pad)
    (1, 1, 1, 37, 0),
    (8, 0, 2, 50, 0),
    (12, 1, 3, 1001, 3),
    (9, 9, 1, 4099, 0),      # k = m+1, P just past a Triton block
    (21, 17, 5, 2053, 1),
    (6, 6, 8, 257, 0),       # k = m+1, b = 8
    (20, 15, 13, 1031, 2),   # b = 13: a second, partial group of rows of W in every kernel
]


def _block(b, rows, Q, dtype):
    """A block with a large component in the span of Q, so that CGS2 has something to remove."""
    return torch.randn(b, Q.shape[1], dtype=dtype, device=Q.device) + 0.5 * torch.randn(
        b, rows, dtype=dtype, device=Q.device) @ Q.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows,k,b,P,pad", CGS2_CASES)
def test_cgs2_within_twice_the_reference_error(backend, dtype, rows, k, b, P, pad, backend_device):
    Q = random_basis(rows, P, dtype, backend_device, pad)
    _check_cgs2(backend, Q, k, _block(b, rows, Q, dtype))


@pytest.mark.parametrize("rows,k,b,P,pad", [CGS2_CASES[i] for i in (0, 1, 2, 3, 4)])
def test_cgs2_bfloat16_basis_within_twice_the_reference_error(backend, rows, k, b, P, pad, backend_device):
    """A bfloat16 basis with a float32 block; the truth is float64 on the same bfloat16 values."""
    Q = random_basis(rows, P, torch.bfloat16, backend_device, pad)
    _check_cgs2(backend, Q, k, _block(b, rows, Q, torch.float32))


@pytest.mark.parametrize("width", ["32", "64"])
def test_cpu_cgs2_at_both_register_widths(width, tmp_path):
    """The CPU kernel works on 32-byte lines without AVX-512 and 64-byte lines with it; forcing each
    (HESSFAST_CPU_VECTOR_BYTES, read once per process) runs this file's CPU CGS2 cases on both paths."""
    if not backends()["cpu"]["available"]:
        pytest.skip("the CPU module is not built")
    env = dict(os.environ, HESSFAST_CPU_VECTOR_BYTES=width)
    # from a neutral directory, so that the child imports the same (installed) hessfast as this process
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "no:xdist",
                          "-k", "(cgs2 or orthogonality) and cpu and not register_widths", str(Path(__file__))],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and " failed" not in run.stdout


def test_reorthogonalize_empty_block(backend, backend_device):
    dev = backend_device
    Q = random_basis(5, 20, torch.float64, dev)
    W0, c0, n0 = reorthogonalize(Q, 2, torch.empty(0, 20, dtype=torch.float64, device=dev), backend=backend)
    assert W0.shape == (0, 20) and c0.shape == (0, 2) and n0.shape == (0,)


def test_reorthogonalize_public_api(backend, backend_device):
    dev = backend_device
    Q = random_basis(10, 333, torch.float64, dev)
    w = torch.randn(333, dtype=torch.float64, device=dev)
    w2, c, n = reorthogonalize(Q, 4, w.clone(), backend=backend)
    assert w2.shape == (333,) and c.shape == (4,) and n.shape == ()
    assert float((Q[:4] @ w2).abs().max()) < 1e-13
    assert abs(float(n) - float(w2.norm())) < 1e-12
    W2, C, N = reorthogonalize(Q, 4, w.clone()[None], backend=backend)
    assert rel(W2[0], w2) < 1e-14 and C.shape == (1, 4) and N.shape == (1,)


def test_reorthogonalize_errors_name_the_tensor():
    Q = torch.randn(5, 20, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"W must have shape \(b, 20\)"):
        reorthogonalize(Q, 2, torch.randn(2, 21, dtype=torch.float64))
    with pytest.raises(TypeError, match="W must have dtype torch.float64"):
        reorthogonalize(Q, 2, torch.randn(2, 20))
    with pytest.raises(ValueError, match=r"k=6 must lie in \[0, Q.shape\[0\]=5\]"):
        reorthogonalize(Q, 6, torch.randn(1, 20, dtype=torch.float64))
    with pytest.raises(ValueError, match="unit column stride"):
        reorthogonalize(Q.T.contiguous().T, 2, torch.randn(1, 20, dtype=torch.float64), backend="cpu")
    with pytest.raises(TypeError, match="Q must be a torch.Tensor"):
        reorthogonalize(Q.numpy(), 2, torch.randn(1, 20, dtype=torch.float64))
    with pytest.raises(TypeError, match="W must have dtype torch.float32"):  # a bf16 basis takes float32 blocks
        reorthogonalize(Q.bfloat16(), 2, torch.randn(1, 20, dtype=torch.float64))
    with pytest.raises(TypeError, match="Q must be float32 or float64 or bfloat16, got torch.float16"):
        reorthogonalize(Q.half(), 2, torch.randn(1, 20))


def _graded_lanczos(backend, dtype, P=300, steps=100, basis_dtype=None, device="cpu"):
    """``steps`` Lanczos steps with full CGS2 reorthogonalisation on diag(10^linspace(0, -12)) (cond 1e12).
    With basis_dtype=bfloat16 the basis is stored rounded and the stored vector is the one multiplied
    (as the Lanczos engine does)."""
    dev = device
    d = torch.logspace(0, -12, P, dtype=dtype, device=dev)
    Q = torch.zeros(steps + 1, P, dtype=basis_dtype or dtype, device=dev)
    q = torch.ones(P, dtype=dtype, device=dev)
    Q[0] = q / q.norm()
    for j in range(steps):
        w, c, n = reorthogonalize(Q, j + 1, (d * Q[j].to(dtype))[None], backend=backend)
        Q[j + 1] = w[0] / n[0]
    return Q


def _orthogonality_loss(Q):
    Q = Q.double()
    return float(torch.linalg.matrix_norm(Q @ Q.T - torch.eye(Q.shape[0], dtype=torch.float64, device=Q.device), 2))


@functools.lru_cache(maxsize=None)
def _reference_loss(dtype, basis_dtype=None, steps=100):
    return _orthogonality_loss(_graded_lanczos("torch", dtype, basis_dtype=basis_dtype, steps=steps))


def _steps(backend, device):
    """100 steps; 30 for Triton in its CPU interpreter (0.4 s a call there: the same code paths, and the
    reference is run for the same number of steps). On a GPU Triton runs the full 100."""
    return 30 if backend == "triton" and device == "cpu" else 100


@pytest.mark.parametrize("dtype,bound", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_orthogonality_after_100_steps(backend, dtype, bound, backend_device):
    """||Q Q^T - I||_2 after 100 steps (the error against exact orthogonality): the reference stays
    below the bound full reorthogonalisation promises, and a backend within twice the reference's."""
    steps = _steps(backend, backend_device)
    ref = _reference_loss(dtype, steps=steps)
    assert ref <= bound
    Q = _graded_lanczos(backend, dtype, steps=steps, device=backend_device)
    assert_near_truth(f"{backend} Q Q^T - I after {steps} steps", _orthogonality_loss(Q), ref, dtype)


def test_orthogonality_after_100_steps_bfloat16_basis(backend, backend_device):
    """The optional bfloat16 basis keeps ||Q Q^T - I|| at the bf16 rounding level (4.5e-3 measured
    here; bench/RESULTS.md has larger P): far from float32's 1e-5, still well below the loss of
    orthogonality (O(1)) that makes ghost eigenvalues; no backend does worse than 2x the reference."""
    steps = _steps(backend, backend_device)
    Q = _graded_lanczos(backend, torch.float32, basis_dtype=torch.bfloat16, steps=steps, device=backend_device)
    assert Q.dtype == torch.bfloat16
    err, ref = _orthogonality_loss(Q), _reference_loss(torch.float32, torch.bfloat16, steps)
    assert 1e-5 < err <= 1e-2 and err <= 2 * ref


ORTH_CASES = [(1, 31, 1.0), (2, 37, 3.0), (3, 1001, 3.0), (5, 5, 3.0), (8, 4099, 50.0), (13, 1031, 3.0)]


def _graded_block(b, P, cond, dtype, device):
    """(b, P) with singular values from 1 down to 1/cond (cond(W) = cond), rounded to dtype."""
    U, _ = torch.linalg.qr(torch.randn(b, b, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(P, b, dtype=torch.float64))
    s = torch.logspace(0, -math.log10(cond), b, dtype=torch.float64)
    return ((U * s) @ V.T).to(dtype=dtype, device=device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("b,P,cond", ORTH_CASES)
def test_orthonormalize_within_twice_the_reference_error(backend, dtype, b, P, cond, backend_device):
    """Qb, R and Qb's loss of orthogonality against longdouble truth, each at most 2x the
    same-precision cholqr2_reference's error; the truth agrees with Householder QR in float64."""
    W = _graded_block(b, P, cond, dtype, backend_device)
    Q_true, R_true = qr_truth(W)
    assert rel(qr_reference(W.double())[1], R_true) < 1e-14 * cond
    Q_ref, R_ref, ref_method = cholqr2_reference(W)
    X, R = W.clone(), torch.full((b, b), float("nan"), dtype=dtype, device=W.device)
    assert ORTH_IMPLS[backend](X, R) == ref_method == "cholqr2"
    assert torch.isfinite(R).all() and float(torch.tril(R, -1).abs().max()) == 0.0
    eye = np.eye(b, dtype=LD)
    assert_near_truth(f"{backend} Qb", rel(X, Q_true), rel(Q_ref, Q_true), dtype)
    assert_near_truth(f"{backend} R", rel(R, R_true), rel(R_ref, R_true), dtype)
    loss = [rel(ld(Qb) @ ld(Qb).T, eye, scale=b ** 0.5) for Qb in (X, Q_ref)]
    assert_near_truth(f"{backend} Qb Qb^T - I", *loss, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cholqr2_reference_matches_householder(dtype):
    """The reference against an independent oracle, Householder QR in float64, on a block of
    cond 1e5 in float64 (CholeskyQR2 accepts up to 6.7e6) and of cond 100 in float32 (up to 290)."""
    cond = 1e5 if dtype == torch.float64 else 100.0
    W = _graded_block(6, 777, cond, dtype, "cpu")
    Qb, R, method = cholqr2_reference(W)
    Q_true, R_true = qr_reference(W.double())
    eps = torch.finfo(dtype).eps
    assert method == "cholqr2"
    assert rel(R, R_true) < 100 * eps and rel(Qb, Q_true) < 100 * eps * cond  # Qb's error grows like cond
    assert float((Qb.double() @ Qb.double().T - torch.eye(6, dtype=torch.float64)).abs().max()) < 100 * eps


def test_orthonormalize_falls_back_to_mgs(backend, backend_device):
    dev = backend_device
    W = torch.randn(4, 500, dtype=torch.float64)
    W[2] = W[0] - 2 * W[1] + 1e-9 * torch.randn(500, dtype=torch.float64)   # cond ~ 1e9 > (100 eps)^-1/2
    W[3] = 0.0                                                             # rank deficient
    Qb, R, method = orthonormalize(W.to(dev), backend=backend, return_method=True)
    assert method == "mgs"
    live = Qb[:3].double()
    assert float((live @ live.T - torch.eye(3, dtype=torch.float64, device=Qb.device)).abs().max()) < 1e-12
    assert float(Qb[3].abs().max()) == 0.0 and float(R[3, 3]) == 0.0
    assert rel(R.T @ Qb, W.to(dev)) < 1e-12


def test_orthonormalize_errors_name_the_tensor():
    with pytest.raises(ValueError, match=r"needs b <= P"):
        orthonormalize(torch.randn(5, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="W must be float32 or float64"):
        orthonormalize(torch.randn(2, 9).half())
    Qb, R, method = orthonormalize(torch.empty(0, 7), return_method=True)
    assert Qb.shape == (0, 7) and R.shape == (0, 0) and method == "empty"
