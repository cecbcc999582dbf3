"""hessfast.eigenpairs: thick-restart block Lanczos against dense float64 eigendecompositions."""
import numpy as np
import pytest
import torch

import cases
import hessfast
from hessfast.utils.model_state import snapshot


class Counting:
    """A curvature operator behind the protocol, counting the rows it multiplies."""

    def __init__(self, op):
        self.op, self.P, self.dtype, self.device, self.products = op, op.P, op.dtype, op.device, 0

    def matmat(self, V):
        self.products += V.shape[0]
        return self.op.matmat(V)

    def unflatten(self, v):
        return self.op.unflatten(v)


def rotated(evals, seed=0):
    evals = torch.as_tensor(evals, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(evals), len(evals), generator=g, dtype=torch.float64))
    return (Q * evals) @ Q.T


@pytest.fixture(scope="module")
def mlp_hessian():
    case = cases.mlp_case()                                  # P = 75, indefinite
    op = hessfast.CurvatureOperator(case.model, case.batch, loss_fn=case.loss_fn, dtype=torch.float64)
    H = cases.dense_hessian(case)
    evals, evecs = torch.linalg.eigh(H)
    return case, op, H, evals.numpy(), evecs


def wanted(evals, k, which):
    """The dense eigenvalues eigenpairs(which=...) must return, in its output order."""
    asc = np.sort(evals)
    if which == "LA":
        return asc[::-1][:k]
    if which == "SA":
        return asc[:k]
    if which == "LM":
        return asc[np.argsort(-np.abs(asc), kind="stable")][:k]
    return np.concatenate([asc[:k // 2], asc[len(asc) - (k - k // 2):]])


def sin_angle(X, U):
    """Sine of the largest principal angle between the row spaces of X (k, P) and U (k, P), both orthonormal."""
    resid = X - (X @ U.T) @ U
    return float(torch.linalg.matrix_norm(resid, ord=2))


@pytest.mark.parametrize("which", ["LA", "SA", "LM", "BE"])
def test_values_vectors_and_residuals_match_the_dense_truth(mlp_hessian, which):
    _, op, H, evals, evecs = mlp_hessian
    k = 5
    top = hessfast.eigenpairs(op, k=k, which=which, max_subspace=24, seed=1)
    assert top.meta["method"] == "thick-restart lanczos" and top.converged
    norm = float(np.abs(evals).max())
    np.testing.assert_allclose(top.values, wanted(evals, k, which), rtol=1e-8, atol=1e-8 * norm)
    if which == "SA":
        assert top.values[0] == pytest.approx(evals.min(), rel=1e-8) and top.values[0] < 0
    X = top.vectors.double()
    assert X.shape == (k, op.P)
    torch.testing.assert_close(X @ X.T, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-10)
    true_res = torch.linalg.vector_norm(X @ H - torch.as_tensor(top.values)[:, None] * X, dim=1).numpy()
    np.testing.assert_allclose(top.residuals, true_res, rtol=0, atol=1e-12 * norm)
    assert true_res.max() <= top.meta["tol"] * top.meta["norm_estimate"] * 1.01
    # Davis-Kahan: the angle to the true eigenspace is at most residual / gap to the rest of the spectrum
    idx = [int(np.argmin(np.abs(evals - v))) for v in top.values]
    rest = np.delete(evals, idx)
    gap = float(np.min(np.abs(top.values[:, None] - rest[None, :])))
    U = evecs[:, idx].T
    assert sin_angle(X, U) <= 2 * np.sqrt(k) * true_res.max() / gap + 1e-12


def test_a_triple_eigenvalue_is_found_three_times_with_blocks_of_three():
    evals = np.concatenate([np.linspace(-1.0, 3.0, 117), [5.0, 5.0, 5.0]])
    A = rotated(evals, seed=3)
    top = hessfast.eigenpairs(cases.DenseOperator(A), k=4, which="LA", block_size=3, max_subspace=30, seed=0)
    np.testing.assert_allclose(top.values, [5.0, 5.0, 5.0, 3.0], rtol=0, atol=1e-9)
    U = torch.linalg.eigh(A)[1][:, -3:].T                   # the 3-dimensional eigenspace of 5
    assert sin_angle(top.vectors[:3], U) <= 1e-8
    assert top.meta["block_size"] == 3 and top.num_matvecs % 3 == 0


def test_an_invariant_krylov_space_restarts_from_a_fresh_vector():
    # two distinct eigenvalues: one vector's Krylov space is invariant after 2 steps; the copies of 5
    # beyond the first come from fresh vectors orthogonal to the kept ones
    A = rotated(np.concatenate([np.full(20, 5.0), np.full(80, 1.0)]), seed=11)
    top = hessfast.eigenpairs(cases.DenseOperator(A), k=3, which="LA", max_subspace=8, seed=0)
    assert top.converged
    np.testing.assert_allclose(top.values, [5.0, 5.0, 5.0], rtol=0, atol=1e-10)
    X = top.vectors
    torch.testing.assert_close(X @ X.T, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-10)
    torch.testing.assert_close(X @ A, 5.0 * X, rtol=0, atol=1e-9)


def test_largest_magnitude_takes_the_negative_end_when_it_is_larger():
    A = rotated(np.concatenate([np.linspace(-1.0, 1.0, 150), [-9.0, -8.0, 7.0]]), seed=13)
    top = hessfast.eigenpairs(cases.DenseOperator(A), k=3, which="LM", max_subspace=20)
    np.testing.assert_allclose(top.values, [-9.0, -8.0, 7.0], rtol=0, atol=1e-9)


def test_restarts_happen_with_a_small_subspace_and_still_converge(mlp_hessian):
    _, op, _, evals, _ = mlp_hessian
    counted = Counting(op)
    top = hessfast.eigenpairs(counted, k=3, which="LA", max_subspace=6, seed=0)
    assert top.meta["restarts"] >= 3 and top.meta["max_subspace"] == 6 and top.converged
    np.testing.assert_allclose(top.values, np.sort(evals)[::-1][:3], rtol=1e-8)
    assert top.num_matvecs == counted.products


def test_num_matvecs_counts_every_product_of_the_operator():
    A = rotated(np.linspace(-2.0, 6.0, 150) ** 3, seed=5)
    op = cases.DenseOperator(A)
    top = hessfast.eigenpairs(op, k=6, which="BE", max_subspace=20, seed=2)
    assert top.converged and top.meta["restarts"] >= 1
    assert top.num_matvecs == op.products > 0


def test_an_operator_with_p_at_most_max_subspace_is_solved_densely(mlp_hessian):
    _, op, _, evals, _ = mlp_hessian
    counted = Counting(op)
    top = hessfast.eigenpairs(counted, k=4, which="SA", max_subspace=op.P)
    assert top.meta["method"] == "dense" and top.num_matvecs == counted.products == op.P
    np.testing.assert_allclose(top.values, np.sort(evals)[:4], rtol=1e-10, atol=1e-14)
    assert np.all(top.residuals <= 1e-12)


def test_from_model_and_data_leaves_the_model_untouched_and_splits_per_parameter(assert_model_unchanged):
    case = cases.mlp_case(seed=2)
    before = snapshot(case.model)
    top = hessfast.eigenpairs(case.model, case.batch, k=2, curvature="ggn", loss_fn=case.loss_fn,
                              dtype=torch.float64, max_subspace=16)
    assert_model_unchanged(case.model, before)
    G = cases.dense_ggn(case)
    np.testing.assert_allclose(top.values, np.sort(np.linalg.eigvalsh(G.numpy()))[::-1][:2], rtol=1e-8)
    parts = top.as_parameters(0)
    assert list(parts) == [n for n, _ in case.model.named_parameters()]
    assert all(parts[n].shape == p.shape for n, p in case.model.named_parameters())
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in parts.values()]), top.vectors[0], rtol=0, atol=0)
    assert top.meta["curvature"] == "ggn"


def test_float32_default_tolerance_reaches_the_float64_truth(mlp_hessian):
    case, _, _, evals, _ = mlp_hessian
    op32 = hessfast.CurvatureOperator(case.model, case.batch, loss_fn=case.loss_fn, dtype=torch.float32)
    top = hessfast.eigenpairs(op32, k=3, which="LA", max_subspace=20)
    assert top.meta["tol"] == 1e-5 and top.converged and top.vectors.dtype == torch.float32
    np.testing.assert_allclose(top.values, np.sort(evals)[::-1][:3], rtol=0, atol=1e-4 * np.abs(evals).max())


def test_save_and_load_round_trip(tmp_path, mlp_hessian):
    _, op, _, _, _ = mlp_hessian
    top = hessfast.eigenpairs(op, k=2, max_subspace=16)
    top.save(tmp_path / "top.json")
    assert (tmp_path / "top.vectors.pt").is_file()
    back = hessfast.Eigenpairs.load(tmp_path / "top.json")
    np.testing.assert_array_equal(back.values, top.values)
    np.testing.assert_array_equal(back.residuals, top.residuals)
    assert torch.equal(back.vectors, top.vectors) and back.num_matvecs == top.num_matvecs
    assert back.which == "LA" and back.converged == top.converged
    assert torch.equal(back.as_parameters(1)["2.bias"], top.as_parameters(1)["2.bias"])


def test_not_converging_warns_and_says_so():
    A = rotated(np.linspace(0.0, 1.0, 200), seed=7)            # no gaps: slow convergence
    with pytest.warns(RuntimeWarning, match="not converged after 1 restarts"):
        top = hessfast.eigenpairs(cases.DenseOperator(A), k=5, max_subspace=12, max_restarts=1)
    assert not top.converged and top.meta["restarts"] == 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(which="largest"), "unknown which='largest'"),
    (dict(k=0), "k must be a positive int"),
    (dict(k=80), "exceeds the operator's dimension P = 75"),
    (dict(tol=1e-17), "below what float64 reaches"),
    (dict(k=5, max_subspace=5), "max_subspace must be an int >= k \\+ block_size = 6"),
    (dict(block_size=0), "block_size must be a positive int"),
])
def test_bad_arguments_say_what_to_change(mlp_hessian, kwargs, match):
    _, op, _, _, _ = mlp_hessian
    with pytest.raises(ValueError, match=match):
        hessfast.eigenpairs(op, **kwargs)


def test_an_object_without_the_protocol_is_refused():
    with pytest.raises(TypeError, match="lacks"):
        hessfast.eigenpairs(object(), k=2)
