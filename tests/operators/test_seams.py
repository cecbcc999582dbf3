"""The operators' public seams that the Lanczos engine and the estimators use, and the GGN's double-vjp pieces."""
import functools

import pytest
import torch

import hessfast
from hessfast.operators.ggn import jacobian_vector, linearize, output_hessian

import cases


@functools.lru_cache(maxsize=None)
def _dense(curvature):
    case = cases.mlp_case(n=40)
    return cases.dense_hessian(case) if curvature == "hessian" else cases.dense_ggn(case)


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("cache", [True, False])
def test_local_sum_is_the_unnormalised_sum(curvature, cache):
    case = cases.mlp_case(n=40)
    op = hessfast.CurvatureOperator(case.model, case.loader([11, 29]), curvature=curvature, cache_graph=cache)
    truth = _dense(curvature)
    v = torch.randn(op.P, dtype=torch.float64)
    V = torch.randn(3, op.P, dtype=torch.float64)
    torch.testing.assert_close(op.local_sum(v), 40 * truth @ v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.local_sum(V), 40 * V @ truth, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.matmat(V), V @ truth, rtol=1e-10, atol=1e-12)
    assert op.cached is cache and op.dist is None
    with pytest.raises(ValueError, match=r"shape \(P,\) or \(b, P\) with P=75"):
        op.local_sum(torch.zeros(2, 2, op.P, dtype=torch.float64))


def test_meta_names_and_unflatten():
    case = cases.bn_case()
    op = hessfast.GGNOperator(case.model, case.loader([12, 20]), bn_mode="train", hvp_mode="forward")
    assert op.meta() == {"curvature": "ggn", "hvp_mode": "forward", "cached": False, "bn_mode": "train",
                         "dtype": "float64", "single_batch": False, "P": 57, "N": 32, "world_size": 1,
                         "rank_samples": [32], "dropout": "off", "attention": "math", "loss_terms": 32.0,
                         "loss": "cross_entropy(ignore_index=-100, label_smoothing=0.0, weight=None, class_dim=1)"}
    trainable = [(n, p) for n, p in case.model.named_parameters() if p.requires_grad]
    assert op.names == [n for n, _ in trainable]
    w = op.parameter_vector()
    parts = op.unflatten(w)
    assert list(parts) == op.names
    for name, p in trainable:
        assert torch.equal(parts[name], p.detach())
    assert (op.P, op.N, op.dtype, op.device, op.shape) == (57, 32, torch.float64, torch.device("cpu"), (57, 57))
    assert hessfast.HessianOperator(case.model, case.batch).meta()["single_batch"] is True


def test_double_vjp_pieces_against_the_dense_jacobian():
    """J v by the double-vjp trick and H_out u by one backward pass, in float64 against torch.func."""
    case = cases.cnn_case(n=5)
    op = hessfast.GGNOperator(case.model, case.batch, cache_graph=False)
    fn = op.fn
    leaves = fn.leaf_params()
    out = fn.forward(leaves, case.x)
    u, jtu = linearize(out, leaves)
    v = torch.randn(fn.P, dtype=torch.float64)
    (jv,) = jacobian_vector(jtu, [u], fn.unflatten(v))
    J = torch.func.jacrev(lambda w: fn.forward(fn.unflatten(w), case.x))(fn.parameter_vector())
    torch.testing.assert_close(jv.reshape(-1), J.reshape(out.numel(), -1) @ v, rtol=1e-12, atol=1e-13)
    out_d, grad_out = output_hessian(fn, out, case.batch)
    q = torch.randn_like(out)
    (hq,) = torch.autograd.grad(grad_out, out_d, q)
    H_out = torch.func.hessian(lambda o: fn.output_loss(o.view_as(out), case.batch))(out.detach().reshape(-1))
    torch.testing.assert_close(hq.reshape(-1), H_out @ q.reshape(-1), rtol=1e-12, atol=1e-13)
