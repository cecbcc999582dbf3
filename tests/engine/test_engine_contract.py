"""The Lanczos engine's contract, the same for every basis strategy and for b = 1 and b = 3.

Every strategy (in device memory, host memory in tiles of 2 rows, three-vector, sharded over 3
ranks) runs the one recurrence on dense float64 matrices (P = 61, prime, so the 3 shards are
uneven and the last one is zero-padded). The sharded runs use 3 threads with an in-process stand-in
for :class:`hessfast.distributed.DistContext` whose collectives sum in rank order, so all ranks
must return bit-identical results; the gloo runs of tests/distributed/test_data_parallel.py cover the real one.
Truth is ``numpy.linalg.eigvalsh`` and the invariants Q Q^T = I and Q A Q^T = T.
"""
import threading

import numpy as np
import pytest
import torch

from hessfast.engine import (DeviceBasis, HostBasis, Lanczos, LanczosResult, NonFiniteError, ShardedBasis,
                             ThreeVectorBasis)
from hessfast.engine.sharded import sharded_product

P, RANKS = 61, 3
STRATEGIES = ["device", "host", "three-vector", "sharded"]
FULL = ["device", "host", "sharded"]          # the strategies that keep every row
CPU = torch.device("cpu")


# ------------------------------------------------------------------------------ in-process ranks
class ThreadGroup:
    """R ranks as threads: each collective exchanges tensors through shared slots and a barrier."""

    def __init__(self, R):
        self.R, self.slots = R, [None] * R
        self.barrier = threading.Barrier(R, timeout=60)

    def exchange(self, rank, t):
        self.slots[rank] = t.clone()
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()
        return out


class FakeContext:
    """The DistContext collectives the sharded basis uses; sums in rank order on every rank."""

    def __init__(self, group, rank):
        self.group, self.rank, self.world_size = group, rank, group.R

    def _sum(self, t):
        parts = self.group.exchange(self.rank, t)
        total = parts[0].clone()
        for p in parts[1:]:
            total += p
        return total

    def all_reduce_small(self, t):
        return t.copy_(self._sum(t))

    def all_gather_vector(self, local, P_):
        return torch.cat(self.group.exchange(self.rank, local.contiguous()))[:P_]

    def reduce_scatter_sum(self, fn, P_, chunk, like, what):
        out = fn().reshape(-1)
        buf = torch.zeros(self.world_size * chunk, dtype=like.dtype, device=like.device)
        buf[:P_] = out
        return self._sum(buf)[self.rank * chunk:(self.rank + 1) * chunk].clone()


class ShardOperator:
    """Rank r's share of A: local sums of A_r V with sum_r A_r = R A, so the mean over N = R is A V."""

    def __init__(self, A_r, N, poison_call=None):
        self.A_r, self.N, self.calls, self.poison_call, self.seen = A_r, N, 0, poison_call, []

    def local_sum(self, V):
        self.calls += 1
        self.seen.append(V.clone())
        out = V @ self.A_r.to(V.dtype)
        if self.calls == self.poison_call:
            out = out.clone()
            out.reshape(-1)[5] = float("nan")
        return out


def split(A, R, seed=1):
    """R symmetric matrices summing to R A."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for _ in range(R - 1):
        X = torch.randn(A.shape, generator=g, dtype=A.dtype)
        parts.append(X + X.T)
    parts.append(R * A - sum(parts))
    return parts


# ------------------------------------------------------------------------------ running a strategy
def make_basis(strategy, b, rows, dtype, storage, ctx=None):
    if strategy == "device":
        return DeviceBasis(rows, b, P, dtype, CPU, storage_dtype=storage)
    if strategy == "host":
        return HostBasis(rows, b, P, dtype, CPU, CPU, tile_rows=2, storage_dtype=storage)
    if strategy == "three-vector":
        return ThreeVectorBasis(b, P, dtype, CPU)
    return ShardedBasis(ctx, rows, b, P, dtype, CPU, tile_rows=3, storage_dtype=storage)


def run(strategy, A, V0, steps, *, storage=None, poison_call=None):
    """(LanczosResult of rank 0, the full basis (k, P) float64 or None, every X multiplied, all results)."""
    b, dtype = V0.shape[0], V0.dtype
    rows = (steps + 1) * b
    if strategy != "sharded":
        seen, calls = [], [0]

        def matmat(X):
            calls[0] += 1
            seen.append(X.clone())
            W = X @ A.to(dtype)
            return W * float("nan") if calls[0] == poison_call else W

        lz = Lanczos(matmat, make_basis(strategy, b, rows, dtype, storage))
        lz.start(V0)
        res = lz.run(steps, keep_basis=True)
        return res, None if res.basis is None else res.basis.double(), seen, [res]
    group, parts = ThreadGroup(RANKS), split(A, RANKS)
    results, errors, ops = [None] * RANKS, [None] * RANKS, [None] * RANKS

    def rank(r):
        try:
            basis = make_basis("sharded", b, rows, dtype, storage, FakeContext(group, r))
            ops[r] = ShardOperator(parts[r], RANKS, poison_call if r == 1 else None)
            lz = Lanczos(sharded_product(basis.ctx, ops[r], basis), basis)
            lz.start(V0)
            results[r] = lz.run(steps, keep_basis=True)
        except Exception as exc:  # noqa: BLE001 -- re-raised in the test's thread
            errors[r] = exc

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(RANKS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if any(e is not None for e in errors):
        raise next(e for e in errors if e is not None)
    Q = torch.cat([res.basis.double() for res in results], dim=1)[:, :P]
    return results[0], Q, ops[0].seen, results


def dense(evals, seed=0):
    """U diag(evals) U^T (float64) with a seeded random orthogonal U."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(len(evals), len(evals), generator=g, dtype=torch.float64))
    return (U * torch.as_tensor(evals, dtype=torch.float64)) @ U.T


def probes(b, seed=3, dtype=torch.float64):
    return torch.randn(b, P, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


OUTLIERS = np.concatenate([[9.0, 7.5, -6.0], np.linspace(-1.0, 1.0, P - 3)])
WELL = np.linspace(1.0, 2.0, P)
GRADED = np.logspace(0, -10, P)


# ------------------------------------------------------------------------------ the contract
@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_one_result_type_with_exact_first_moments(strategy, b):
    A, V0 = dense(OUTLIERS), probes(b)
    res, _, _, every = run(strategy, A, V0, 6)
    assert isinstance(res, LanczosResult) and res.b == b and res.steps == 6 and not res.breakdown
    assert res.diag.shape == (6, b, b) and res.off.shape == (5, b, b) and res.start.shape == (b, b)
    theta, w = res.ritz()
    w = np.reshape(w, (b, -1))
    assert theta.shape == (6 * b,) and np.all(np.diff(theta) >= 0)
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-13)
    for i in range(b):   # Gauss quadrature: exact to degree 2s - 1; the first two moments suffice here
        v = V0[i]
        for k in (1, 2):
            exact = float(v @ torch.linalg.matrix_power(A, k) @ v / (v @ v))
            assert abs(float(w[i] @ theta ** k) - exact) <= 1e-12 * 9.0 ** k
    for other in every[1:]:  # every rank: the same numbers, bit for bit
        np.testing.assert_array_equal(other.diag, res.diag)
        np.testing.assert_array_equal(other.off, res.off)


@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_nan_product_raises_non_finite_error_naming_the_step(strategy, b):
    with pytest.raises(NonFiniteError, match="Lanczos step 3") as info:
        run(strategy, dense(OUTLIERS), probes(b), 8, poison_call=4)
    assert isinstance(info.value, FloatingPointError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_breakdown_on_three_distinct_eigenvalues_gives_them_exactly(strategy, b):
    """Eigenvalues 3, 1, -1, each at least 20 times: the (block) Krylov space of b probes has
    dimension 3 b, so the run stops after 3 steps and its Ritz values are the eigenvalues, b copies each."""
    evals = np.repeat([3.0, 1.0, -1.0], [20, 20, 21])
    res, _, _, _ = run(strategy, dense(evals), probes(b), 10)
    assert res.breakdown and res.steps == 3
    theta, w = res.ritz()
    np.testing.assert_allclose(theta, np.repeat([-1.0, 1.0, 3.0], b), atol=1e-12)
    np.testing.assert_allclose(np.reshape(w, (b, -1)).sum(1), 1.0, atol=1e-13)


@pytest.mark.parametrize("spectrum", ["well-conditioned", "graded"])
@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("strategy", FULL)
def test_basis_is_orthonormal_and_projects_a_onto_t(strategy, b, spectrum):
    evals = WELL if spectrum == "well-conditioned" else GRADED
    A = dense(evals, seed=2)
    res, Q, seen, _ = run(strategy, A, probes(b), 12)
    k = res.size
    assert Q.shape == (k, P)
    assert float((Q @ Q.T - torch.eye(k, dtype=torch.float64)).abs().max()) <= 1e-13
    T = (Q @ A @ Q.T).numpy()
    np.testing.assert_allclose(T, res.T, rtol=0, atol=1e-13 * float(np.abs(evals).max()))


@pytest.mark.parametrize("strategy", FULL)
def test_deflated_probe_keeps_the_invariants(strategy):
    """A probe that is the sum of two others is replaced by a random vector (zero coupling): Q stays
    orthonormal, T stays Q A Q^T, and the dependent probe's weights still give its Rayleigh quotient."""
    A = dense(OUTLIERS)
    V0 = probes(3)
    V0[2] = V0[0] + V0[1]
    res, Q, _, _ = run(strategy, A, V0, 8)
    assert res.start[2, 2] == 0.0
    assert float((Q @ Q.T - torch.eye(res.size, dtype=torch.float64)).abs().max()) <= 1e-13
    np.testing.assert_allclose((Q @ A @ Q.T).numpy(), res.T, rtol=0, atol=1e-12)
    theta, w = res.ritz()
    v = V0[2]
    assert abs(float(w[2] @ theta) - float(v @ A @ v / (v @ v))) <= 1e-12


@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_extremes_match_dense_eigenvalues(strategy, b):
    A = dense(OUTLIERS, seed=4)
    evals = np.linalg.eigvalsh(A.numpy())
    res, _, _, _ = run(strategy, A, probes(b, seed=5), 24 // b + 4)
    theta, _ = res.ritz()
    assert abs(theta.max() - evals[-1]) <= 1e-10 * evals[-1]
    assert abs(theta.min() - evals[0]) <= 1e-10 * abs(evals[0])


@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("strategy", FULL)
def test_bfloat16_storage_is_rounded_once_and_multiplied_as_stored(strategy, b):
    """float32 compute, bfloat16 rows: orthonormal to 1e-2 and extremes within 1e-3 of lambda_max
    (the tolerances hessfast.lanczos states), and every block multiplied is the stored block."""
    A = dense(OUTLIERS, seed=4)
    evals = np.linalg.eigvalsh(A.numpy())
    steps = 24 // b + 4
    res, Q, seen, _ = run(strategy, A, probes(b, seed=5, dtype=torch.float32), steps, storage=torch.bfloat16)
    assert res.basis.dtype == torch.bfloat16
    assert float((Q @ Q.T - torch.eye(res.size, dtype=torch.float64)).abs().max()) <= 1e-2
    theta, _ = res.ritz()
    assert abs(theta.max() - evals[-1]) <= 1e-3 * evals[-1]
    assert abs(theta.min() - evals[0]) <= 1e-3 * evals[-1]
    for j, X in enumerate(seen):
        stored = Q[j * b:(j + 1) * b]
        assert X.dtype == torch.float32
        assert torch.equal(X.reshape(b, P).double(), stored), f"block {j} multiplied is not the stored one"
