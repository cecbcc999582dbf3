"""Every kernel backend against the pure-PyTorch references (hessfast/kernels/reference.py).

Inputs are fresh random tensors, outputs are poisoned with NaN before each call, sizes are awkward
(P prime or just past a tile, k = 0, 1, m+1, b = 1 and b > 1).  Errors are measured against a float64
evaluation of the reference on the same inputs: <= 1e-5 (float32) and <= 1e-12 (float64).
Triton runs under TRITON_INTERPRET=1 (tests/conftest.py); CUDA cases run only where a GPU is usable.
"""
import pytest
import torch

from hessfast.kernels import dispatch, orthonormalize, reorthogonalize
from hessfast.kernels.orthonormalize import ORTH_IMPLS
from hessfast.kernels.reference import cgs2_reference, qr_reference
from hessfast.kernels.reorth import CGS2_IMPLS

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def _usable(name):
    info = dispatch.backends()
    if name == "triton":
        return info["triton"]["available"] or info["triton"]["cpu_interpreter"]
    if name == "cuda":  # on a GPU machine a built module that cannot run fails the tests, it is not skipped
        return info["cuda"]["available"] or (torch.cuda.is_available() and info["cuda"]["compiled"])
    return info[name]["available"]


def _device(name):
    if name == "cuda" or (name == "triton" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


BACKENDS = [pytest.param(n, marks=pytest.mark.skipif(not _usable(n), reason=f"{n} backend not usable here"))
            for n in ("torch", "cpu", "triton", "cuda")]


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def random_basis(rows, P, dtype, device, pad=0):
    """(rows, P) orthonormal rows, as a view with row stride P + pad (a slice of a wider buffer)."""
    Qt, _ = torch.linalg.qr(torch.randn(P, rows, dtype=torch.float64))
    buf = torch.randn(rows, P + pad, dtype=torch.float64)
    buf[:, :P] = Qt.T
    return buf.to(dtype=dtype, device=device)[:, :P]


CGS2_CASES = [  # (m+1 rows, k, b, P, pad)
    (1, 1, 1, 37, 0),
    (8, 0, 2, 50, 0),
    (12, 1, 3, 1001, 3),
    (9, 9, 1, 4099, 0),      # k = m+1, P just past a Triton block
    (21, 17, 5, 2053, 1),
    (6, 6, 8, 257, 0),       # k = m+1, b = 8
    (20, 15, 13, 1031, 2),   # b = 13: a second, partial group of rows of W in every kernel
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows,k,b,P,pad", CGS2_CASES)
def test_cgs2_matches_reference(backend, dtype, rows, k, b, P, pad):
    dev = _device(backend)
    Q = random_basis(rows, P, dtype, dev, pad)
    W = torch.randn(b, P, dtype=dtype, device=dev) + 0.5 * torch.randn(b, rows, dtype=dtype, device=dev) @ Q
    W2_ref, c_ref, n_ref = cgs2_reference(Q.double(), k, W.double())
    Wk = W.clone()
    coeffs = torch.full((b, k), float("nan"), dtype=dtype, device=dev)
    norms = torch.full((b,), float("nan"), dtype=dtype, device=dev)
    CGS2_IMPLS[backend](Q, k, Wk, coeffs, norms)
    tol = TOL[dtype]
    assert rel(Wk, W2_ref) <= tol
    assert rel(norms, n_ref) <= tol
    if k:
        assert rel(coeffs, c_ref) <= tol
    assert torch.isfinite(coeffs).all() and torch.isfinite(norms).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows,k,b,P,pad", [CGS2_CASES[i] for i in (0, 2, 3, 4)])
def test_cgs2_bfloat16_basis_matches_reference(backend, rows, k, b, P, pad):
    """A bfloat16 basis with a float32 block: float32 accuracy against float64 on the same bf16 values."""
    dev = _device(backend)
    Q = random_basis(rows, P, torch.bfloat16, dev, pad)
    W = torch.randn(b, P, device=dev) + 0.5 * torch.randn(b, rows, device=dev) @ Q.float()
    W2_ref, c_ref, n_ref = cgs2_reference(Q.double(), k, W.double())
    Wk = W.clone()
    coeffs = torch.full((b, k), float("nan"), device=dev)
    norms = torch.full((b,), float("nan"), device=dev)
    CGS2_IMPLS[backend](Q, k, Wk, coeffs, norms)
    assert rel(Wk, W2_ref) <= 1e-5 and rel(norms, n_ref) <= 1e-5
    if k:
        assert rel(coeffs, c_ref) <= 1e-5
    assert Wk.dtype == coeffs.dtype == norms.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_reorthogonalize_empty_block(backend):
    dev = _device(backend)
    Q = random_basis(5, 20, torch.float64, dev)
    W0, c0, n0 = reorthogonalize(Q, 2, torch.empty(0, 20, dtype=torch.float64, device=dev), backend=backend)
    assert W0.shape == (0, 20) and c0.shape == (0, 2) and n0.shape == (0,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reorthogonalize_public_api(backend):
    dev = _device(backend)
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


def _graded_lanczos(backend, dtype, P=300, steps=100, basis_dtype=None):
    """100 Lanczos steps with full CGS2 reorthogonalisation on diag(10^linspace(0, -12)) (cond 1e12).
    With basis_dtype=bfloat16 the basis is stored rounded and the stored vector is the one multiplied
    (as hessfast.lanczos_decomposition does)."""
    dev = _device(backend)
    d = torch.logspace(0, -12, P, dtype=dtype, device=dev)
    Q = torch.zeros(steps + 1, P, dtype=basis_dtype or dtype, device=dev)
    q = torch.ones(P, dtype=dtype, device=dev)
    Q[0] = q / q.norm()
    for j in range(steps):
        w, c, n = reorthogonalize(Q, j + 1, (d * Q[j].to(dtype))[None], backend=backend)
        Q[j + 1] = w[0] / n[0]
    return Q


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_orthogonality_after_100_steps(backend, dtype, tol):
    Q = _graded_lanczos(backend, dtype).double()
    err = float(torch.linalg.matrix_norm(Q @ Q.T - torch.eye(Q.shape[0], dtype=torch.float64, device=Q.device), 2))
    assert err <= tol


@pytest.mark.parametrize("backend", BACKENDS)
def test_orthogonality_after_100_steps_bfloat16_basis(backend):
    """The optional bfloat16 basis keeps ||Q Q^T - I|| at the bf16 rounding level (4.5e-3 measured
    here; bench/RESULTS.md has larger P): far from float32's 1e-5, still well below the loss of
    orthogonality (O(1)) that makes ghost eigenvalues."""
    Q = _graded_lanczos(backend, torch.float32, basis_dtype=torch.bfloat16)
    assert Q.dtype == torch.bfloat16
    Q = Q.double()
    err = float(torch.linalg.matrix_norm(Q @ Q.T - torch.eye(Q.shape[0], dtype=torch.float64, device=Q.device), 2))
    assert 1e-5 < err <= 1e-2


ORTH_CASES = [(1, 31), (3, 1001), (8, 4099), (5, 5), (13, 1031)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("b,P", ORTH_CASES)
def test_orthonormalize_matches_qr(backend, dtype, b, P):
    dev = _device(backend)
    W = (torch.randn(b, P, dtype=torch.float64) * torch.linspace(1, 3, b, dtype=torch.float64)[:, None])
    W = W.to(dtype=dtype, device=dev)
    Q_ref, R_ref = qr_reference(W.double())
    X = W.clone()
    R = torch.full((b, b), float("nan"), dtype=dtype, device=dev)
    method = ORTH_IMPLS[backend](X, R)
    assert method == "cholqr2"
    assert rel(X, Q_ref) <= TOL[dtype] * 10 * b ** 0.5   # cond(W) <= 3: QR perturbation bound
    assert rel(R, R_ref) <= TOL[dtype]
    assert float(torch.tril(R, -1).abs().max()) == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_orthonormalize_falls_back_to_mgs(backend):
    dev = _device(backend)
    W = torch.randn(4, 500, dtype=torch.float64)
    W[2] = W[0] - 2 * W[1] + 1e-9 * torch.randn(500, dtype=torch.float64)   # cond ~ 1e9 > (100 u)^-1/2
    W[3] = 0.0                                                             # rank deficient
    Qb, R, method = orthonormalize(W.to(dev), backend=backend, return_method=True)
    assert method == "mgs"
    live = Qb[:3].double()
    assert float((live @ live.T - torch.eye(3, dtype=torch.float64, device=Qb.device)).abs().max()) < 1e-12
    assert float(Qb[3].abs().max()) == 0.0 and float(R[3, 3]) == 0.0
    assert rel(R.T @ Qb, W.to(dev)) < 1e-12
