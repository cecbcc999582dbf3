"""Probes in lockstep (hessfast.engine.lockstep): the same runs as probe after probe, one batched product per step.

Truth: k sequential single-vector runs of the one recurrence (``lanczos_decomposition``) from the
same probes, dense eigenvalues (``numpy.linalg.eigvalsh``) and the invariants Q_i Q_i^T = I and
Q_i A Q_i^T = T_i of every probe's own basis. Sizes are awkward on purpose (P = 61, prime; k = 5).
"""
import numpy as np
import pytest
import torch

import cases
import hessfast
from hessfast.engine import NonFiniteError, lanczos_decomposition
from hessfast.engine.lockstep import Lockstep, lockstep_fits, use_lockstep
from hessfast.utils.model_state import snapshot

P, K = 61, 5
CPU = torch.device("cpu")


def graded(P=P, seed=0):
    """A symmetric float64 matrix with eigenvalues 10^(-3..1), a negative tail and a cluster at 0."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=torch.float64))
    lam = torch.cat([torch.logspace(-3, 1, P - 10, dtype=torch.float64), -torch.linspace(0.1, 1, 5).double(),
                     torch.zeros(5, dtype=torch.float64)])
    return (Q * lam) @ Q.T


def probes(k=K, P=P, seed=1):
    return torch.randn(k, P, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_lockstep_equals_sequential_runs(backend):
    A, V0, m = graded(), probes(), 40
    calls = []

    def matmat(X):
        calls.append(X.shape[0])
        return X @ A

    run = Lockstep(matmat, K, m, P, torch.float64, CPU, backend=backend)
    together = run.run(V0)
    assert calls == [K] * m                     # one batched product per step, all probes in it
    for i, res in enumerate(together):
        alone = lanczos_decomposition(lambda v: A @ v, V0[i], m, backend=backend)
        scale = np.abs(alone.alpha).max()
        np.testing.assert_allclose(res.alpha, alone.alpha, rtol=0, atol=1e-10 * scale)
        np.testing.assert_allclose(res.beta, alone.beta, rtol=0, atol=1e-10 * scale)
        theta, w = res.ritz()
        theta0, w0 = alone.ritz()
        np.testing.assert_allclose(theta, theta0, rtol=0, atol=1e-10 * np.abs(theta0).max())
        np.testing.assert_allclose(w, w0, rtol=0, atol=1e-10)
        assert res.start[0, 0] == pytest.approx(float(V0[i].norm()), rel=1e-14)


def test_each_probe_keeps_its_own_orthonormal_basis():
    A, V0, m = graded(), probes(), 30
    run = Lockstep(lambda X: X @ A, K, m, P, torch.float64, CPU)
    results = run.run(V0)
    ev = np.linalg.eigvalsh(A.numpy())
    for i, res in enumerate(results):
        Q = run.Q[i, :m].numpy()
        assert np.abs(Q @ Q.T - np.eye(m)).max() < 1e-12
        assert np.abs(Q @ A.numpy() @ Q.T - res.T).max() < 1e-11
        theta = res.ritz()[0]
        assert abs(theta.max() - ev.max()) < 1e-9 * ev.max()      # the top converges within 30 steps
    # different probes build different bases: lockstep is not a block method sharing one
    assert np.abs(run.Q[0, 5].numpy() @ run.Q[1, :6].numpy().T).max() > 1e-3


def test_probes_break_down_at_their_own_step():
    """Probe i sees only 4 + 3 i distinct eigenvalues, so its Krylov space is invariant after that many steps."""
    d = torch.arange(1, P + 1, dtype=torch.float64)
    A = torch.diag(d)
    V0 = torch.zeros(4, P, dtype=torch.float64)
    for i in range(4):
        V0[i, : 4 + 3 * i] = 1.0 + torch.arange(4 + 3 * i, dtype=torch.float64) / 7
    calls = []

    def matmat(X):
        calls.append(X.shape[0])
        return X @ A

    results = Lockstep(matmat, 4, 30, P, torch.float64, CPU).run(V0)
    for i, res in enumerate(results):
        n = 4 + 3 * i
        assert res.breakdown and res.steps == n
        np.testing.assert_allclose(res.ritz()[0], d[:n].numpy(), rtol=0, atol=1e-10)   # exact eigenvalues
        alone = lanczos_decomposition(lambda v: A @ v, V0[i], 30)
        assert alone.steps == n and alone.breakdown
    assert calls == [4] * 4 + [3] * 3 + [2] * 3 + [1] * 3   # finished probes leave the block
    calls.clear()
    fixed = Lockstep(matmat, 4, 30, P, torch.float64, CPU, fixed_block=True).run(V0)
    assert calls == [4] * 13                                  # one shape throughout (compiled products)
    for a, b in zip(fixed, results):
        np.testing.assert_allclose(a.alpha, b.alpha, rtol=0, atol=1e-12 * P)
        np.testing.assert_allclose(a.beta, b.beta, rtol=0, atol=1e-12 * P)


def test_nan_names_step_and_probe():
    A = graded()

    def matmat(X):
        W = X @ A
        if calls[0] == 3:
            W[2, 7] = float("nan")
        calls[0] += 1
        return W

    calls = [0]
    with pytest.raises(NonFiniteError, match="step 3 of probe 2"):
        Lockstep(matmat, K, 10, P, torch.float64, CPU).run(probes())


def test_bad_product_shape_is_refused():
    with pytest.raises(ValueError, match=r"matmat\(X\) must be a \(5, 61\) tensor"):
        Lockstep(lambda X: X[:, :3], K, 5, P, torch.float64, CPU).run(probes())


# ------------------------------------------------------------------------------ through hessfast.lanczos
@pytest.mark.parametrize("hvp_mode", ["reverse", "forward"])
def test_lanczos_lockstep_equals_sequential_probes(hvp_mode, assert_model_unchanged):
    case = cases.mlp_case()
    data = case.loader([17, 13, 10])
    before = snapshot(case.model)
    kw = dict(m=20, loss_fn=case.loss_fn, num_probes=4, seed=3, hvp_mode=hvp_mode, progress=False)
    a = hessfast.lanczos(case.model, data, lockstep=True, **kw)
    b = hessfast.lanczos(case.model, data, lockstep=False, **kw)
    assert a.meta["lockstep"] and not b.meta["lockstep"]
    scale = np.abs(b.ritz_values).max()
    np.testing.assert_allclose(a.ritz_values, b.ritz_values, rtol=0, atol=1e-10 * scale)
    np.testing.assert_allclose(a.weights, b.weights, rtol=0, atol=1e-10)
    H = hessfast.HessianOperator(case.model, data, loss_fn=case.loss_fn).to_dense().numpy()
    ev = np.linalg.eigvalsh((H + H.T) / 2)
    assert abs(a.lambda_max - ev.max()) < 1e-8 * abs(ev.max())
    assert_model_unchanged(case.model, before)


def test_automatic_rule():
    base = dict(num_probes=8, block_size=1, placement="device", distributed=False, fits=True)
    assert use_lockstep(None, shared_products=True, **base)
    assert not use_lockstep(None, shared_products=False, **base)     # a cached graph: probe after probe
    assert not use_lockstep(None, shared_products=True, **{**base, "num_probes": 1})
    assert not use_lockstep(None, shared_products=True, **{**base, "placement": "host"})
    assert not use_lockstep(False, shared_products=True, **base)
    with pytest.raises(ValueError, match="block_size=1"):
        use_lockstep(True, shared_products=True, **{**base, "block_size": 2})
    with pytest.raises(ValueError, match="memory for num_probes bases"):
        use_lockstep(True, shared_products=True, **{**base, "fits": False})
    assert lockstep_fits(4, 100, 1000, torch.float64, CPU)
    assert not lockstep_fits(4, 100, 10 ** 15, torch.float64, CPU)
    case = cases.mlp_case()
    kw = dict(m=10, loss_fn=case.loss_fn, num_probes=3, seed=0, progress=False)
    assert not hessfast.lanczos(case.model, case.batch, **kw).meta["lockstep"]        # cached graph
    assert hessfast.lanczos(case.model, case.batch, hvp_mode="forward", **kw).meta["lockstep"]
    with pytest.raises(ValueError, match="lockstep=True needs block_size=1"):
        hessfast.lanczos(case.model, case.batch, block_size=3, lockstep=True, **kw)
