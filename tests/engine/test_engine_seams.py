"""The engine's seams: restarting from locked vectors, the one memory planner, what Spectrum.meta records."""
import numpy as np
import pytest
import torch

import hessfast
from hessfast.engine import (BasisLanczos, DeviceBasis, Lanczos, block_lanczos, lanczos_decomposition,
                             probe_vectors)
from hessfast.kernels import resolve_backend
from hessfast.utils import memory
from hessfast.utils.memory import BasisMemoryError, basis_rows, plan_basis

import cases


def dense(evals, seed=0):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(len(evals), len(evals), generator=g, dtype=torch.float64))
    return (U * torch.as_tensor(evals, dtype=torch.float64)) @ U.T


def test_thick_restart_runs_on_the_seam():
    """Thick-restart Lanczos (Wu & Simon) written on the public seam: keep the k = 3 largest Ritz
    vectors, write them and the residual vector as rows [0, k], run from row k. The coupling of the
    first new product to the locked rows is beta_m s_{m,i} (the arrowhead), the basis stays
    orthonormal, and the top 3 eigenvalues converge where 12 plain steps do not."""
    P, m, k = 97, 12, 3
    evals = np.concatenate([[10.0, 9.8, 9.6], np.linspace(0.0, 9.0, P - 3)])
    A = dense(evals, seed=1)
    basis = DeviceBasis(m + 1, 1, P, torch.float64, torch.device("cpu"))
    lz = Lanczos(lambda X: X @ A, basis)
    lz.start(torch.randn(1, P, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    res = lz.run(m, residual=True, keep_basis=True)
    plain = np.sort(res.ritz()[0])[::-1][:k]
    T, Q, beta = res.T, res.basis.clone(), float(res.residual[0, 0])
    for _ in range(8):
        theta, S = np.linalg.eigh(T)
        keep = np.argsort(theta)[::-1][:k]
        arrow = beta * S[-1, keep]                              # coupling of the residual to the Ritz vectors
        Y = torch.as_tensor(S[:, keep].T) @ Q                   # (k, P) Ritz vectors
        r = basis.read(Q.shape[0], 1).clone()           # the residual vector, written after the last row
        basis.write(0, Y)
        basis.write(k, r)
        res = lz.run(m - k, row=k, residual=True, keep_basis=True)
        np.testing.assert_allclose(res.coupling[0], arrow, rtol=0, atol=1e-10 * evals.max())
        n = k + res.steps
        T = np.zeros((n, n))
        T[:k, :k] = np.diag(theta[keep])
        T[k, :k] = T[:k, k] = arrow
        T[k:, k:] = res.T
        Q, beta = res.basis.clone(), float(res.residual[0, 0])
        assert float((Q @ Q.T - torch.eye(n, dtype=torch.float64)).abs().max()) <= 1e-12
    top = np.sort(np.linalg.eigvalsh(T))[::-1][:k]
    np.testing.assert_allclose(top, evals[:k], rtol=0, atol=1e-8)
    assert np.abs(plain - evals[:k]).max() > 1e-4               # the restarts did the work


def test_single_vector_is_the_block_size_one_case():
    A = dense(np.linspace(-1.0, 4.0, 53), seed=3)
    v = torch.randn(53, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    one = lanczos_decomposition(lambda x: A @ x, v, 20).ritz()
    blk = block_lanczos(lambda X: X @ A, v[None], 20)
    np.testing.assert_allclose(blk[0], one[0], rtol=0, atol=1e-13)
    np.testing.assert_allclose(blk[1][0], one[1], rtol=0, atol=1e-13)


def test_a_product_that_returns_its_input_leaves_the_basis_intact():
    """The identity: one step, then breakdown (A q_0 = q_0), with Ritz value exactly 1."""
    v = torch.randn(17, dtype=torch.float64)
    res = lanczos_decomposition(lambda x: x, v, 5, keep_basis=True)
    assert res.breakdown and res.steps == 1
    np.testing.assert_allclose(res.ritz()[0], [1.0], atol=1e-15)
    torch.testing.assert_close(res.basis[0], v / v.norm(), rtol=0, atol=1e-15)


@pytest.mark.parametrize("b", [1, 3])
def test_one_planner_largest_m_fits_and_one_more_block_does_not(monkeypatch, b):
    P, dtype = 1000, torch.float32
    free = int(40 * b * P * 4 / 0.9) + 100                     # room for 40 blocks of b rows
    monkeypatch.setattr(memory, "available_memory", lambda device: free)
    plan = plan_basis(10, P, dtype, torch.device("cpu"), block_size=b)
    m = plan.largest_m(plan.free, 1)
    assert m == 39 * b
    assert plan_basis(m, P, dtype, torch.device("cpu"), block_size=b).fits
    too_big = plan_basis(m + b, P, dtype, torch.device("cpu"), block_size=b)
    assert not too_big.fits and too_big.bytes_per_rank == basis_rows(m + b, b) * P * 4
    with pytest.raises(BasisMemoryError, match=rf"Reduce m \(m <= {m} fits"):
        too_big.check()


def test_the_runner_allocates_what_the_planner_says():
    case = cases.mlp_case()
    op = hessfast.HessianOperator(case.model, case.batch)
    V = probe_vectors(3, op.P, 1, op.dtype, op.device)
    for b, m in ((1, 12), (3, 10)):
        run = BasisLanczos(op, m, block_size=b)
        res = run(V[:b], m, keep_basis=True)
        assert res.basis.untyped_storage().nbytes() == run.plan.bytes_per_rank == basis_rows(m, b) * op.P * 8


def test_meta_records_the_backend_that_ran_and_the_basis_placement(monkeypatch):
    case = cases.mlp_case()
    kw = dict(m=8, seed=0, progress=False)
    ran = resolve_backend("auto", torch.empty(0, dtype=torch.float64))
    spec = hessfast.lanczos(case.model, case.batch, **kw)
    assert spec.meta["backend"] == ran and spec.meta["backend_requested"] == "auto"
    assert spec.meta["basis"] == "device" and spec.meta["basis_device"] == "cpu" and spec.meta["shard_basis"] is False
    assert spec.meta["basis_dtype"] == "float64" and spec.meta["basis_bytes_per_rank"] == 9 * spec.P * 8
    monkeypatch.setenv("HESSFAST_BACKEND", "torch")
    env = hessfast.lanczos(case.model, case.batch, **kw)
    assert env.meta["backend"] == "torch" and env.meta["backend_requested"] == "auto"
    none = hessfast.lanczos(case.model, case.batch, reorth="none", **kw)
    assert none.meta["basis"] == "three-vector"
    blocks = hessfast.lanczos(case.model, case.batch, block_size=3, num_probes=4, **kw)
    assert blocks.ritz_values.shape == (4, 9) and blocks.meta["basis"] == "device"
    op = hessfast.HessianOperator(case.model, case.batch)
    host = BasisLanczos(op, 8, basis_device="cpu", tile_rows=3)
    assert host.meta()["basis"] == "host" and host.meta()["backend"] == "torch"
    assert host.meta()["basis_tile_rows"] == 3
