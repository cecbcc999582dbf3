"""Curvatures are classes: the factory, the registry, the hooks a new curvature implements, the product modes."""
import numpy as np
import pytest
import torch
from torch import nn

import hessfast
from hessfast.operators import (CurvatureOperator, GGNOperator, HessianOperator, ModelFunction, curvatures,
                                ghost, operator_class)
from hessfast.variance import hessian_variance

import cases


class CentralDifferenceHessian(CurvatureOperator):
    """A curvature written as a user would add one: only the functional product, here the central
    difference of gradients ``(g(w + h v) - g(w - h v)) / 2h`` (no graph product, so forward mode only)."""

    curvature = "central-difference-test"
    step = 1e-4

    @staticmethod
    def functional_product(fn, params, batch, v, reverse=False):
        g = torch.func.grad(lambda p: fn.batch_loss(p, batch))
        h = CentralDifferenceHessian.step
        plus = g(tuple(p + h * t for p, t in zip(params, v)))
        minus = g(tuple(p - h * t for p, t in zip(params, v)))
        return tuple((a - b) / (2 * h) for a, b in zip(plus, minus))


def test_the_factory_returns_the_registered_class():
    case = cases.mlp_case()
    for name, cls in (("hessian", HessianOperator), ("ggn", GGNOperator), (None, HessianOperator)):
        op = CurvatureOperator(case.model, case.batch, curvature=name)
        assert type(op) is cls and isinstance(op, CurvatureOperator) and op.curvature == (name or "hessian")
        assert operator_class(op.curvature) is cls
    assert curvatures()[:2] == ("hessian", "ggn") and hessfast.CurvatureOperator is CurvatureOperator
    assert HessianOperator(case.model, case.batch, curvature="hessian").curvature == "hessian"
    with pytest.raises(ValueError, match=r"HessianOperator is the 'hessian' curvature, not 'ggn'"):
        HessianOperator(case.model, case.batch, curvature="ggn")
    with pytest.raises(ValueError, match="unknown curvature 'kfac'; choose 'hessian' or 'ggn'"):
        operator_class("kfac")
    with pytest.raises(TypeError, match="already registered"):
        type("Again", (CurvatureOperator,), {"curvature": "ggn"})


def test_a_new_curvature_is_one_subclass():
    case = cases.mlp_case()
    truth = cases.dense_hessian(case)
    op = CurvatureOperator(case.model, case.loader([9, 31]), curvature="central-difference-test")
    assert type(op) is CentralDifferenceHessian and op.hvp_mode == "forward" and not op.cached
    assert op.meta()["hvp_mode"] == "forward" and op.N == 40
    # truncation error O(h^2 |d^3 L|) and rounding O(eps / h): about 1e-8 relative here
    V = torch.randn(4, op.P, dtype=torch.float64)
    err = float((op.matmat(V) - V @ truth).abs().max() / (V @ truth).abs().max())
    assert err < 1e-6, err
    with pytest.raises(ValueError, match="has no reverse-mode product; use hvp_mode='forward'"):
        CentralDifferenceHessian(case.model, case.batch, hvp_mode="reverse")
    # the per-sample products of the variance come from the same hook; the ghost route has no rule for it
    fn = ModelFunction(case.model, case.batch)
    assert "no rule for the 'central-difference-test' curvature" in ghost.unsupported_reason(fn, type(op))
    kw = dict(num_probes=2, seed=3, progress=False)
    fd = hessian_variance(case.model, case.batch, curvature="central-difference-test", **kw)
    exact = hessian_variance(case.model, case.batch, curvature="hessian", route="vmap", **kw)
    assert fd.meta["route"] == "vmap"
    np.testing.assert_allclose(fd.per_probe["mean_sq"], exact.per_probe["mean_sq"], rtol=1e-5)


def test_a_class_without_any_product_is_refused():
    class Empty(CurvatureOperator):
        pass

    case = cases.mlp_case()
    with pytest.raises(TypeError, match="neither build_graph/graph_product nor functional_product"):
        Empty(case.model, case.batch)


def _true_products(case, cls, V):
    """sum_i C_i v for the rows of V, by torch.autograd.functional on the flat parameters (float64)."""
    names = [n for n, p in case.model.named_parameters() if p.requires_grad]
    params = dict(case.model.named_parameters())
    w = torch.cat([params[n].detach().reshape(-1) for n in names])

    def outputs(flat):
        state, i = {}, 0
        for n in names:
            k = params[n].numel()
            state[n] = flat[i:i + k].view(params[n].shape)
            i += k
        return torch.func.functional_call(case.model, state, (case.x,))

    def loss(o):
        return nn.functional.cross_entropy(o, case.y, reduction="sum")

    rows = []
    for v in V:
        if cls is HessianOperator:
            rows.append(torch.autograd.functional.hvp(lambda flat: loss(outputs(flat)), w, v)[1])
        else:
            out, jv = torch.autograd.functional.jvp(outputs, w, v)
            hjv = torch.autograd.functional.hvp(loss, out.detach(), jv)[1]
            rows.append(torch.autograd.functional.vjp(outputs, w, hjv)[1])
    return torch.stack(rows)


@pytest.mark.parametrize("cls", [HessianOperator, GGNOperator])
def test_graph_and_functional_products_agree_per_batch(cls):
    """The two hooks each class implements give the per-batch sum of the products (float64)."""
    case = cases.cnn_case(n=9)
    op = cls(case.model, case.batch, cache_graph=False)
    fn = op.fn
    V = torch.randn(3, fn.P, dtype=torch.float64)
    truth = _true_products(case, cls, V)
    vs = fn.unflatten(V)
    graph = op.build_graph(case.batch, fn.leaf_params())
    batched = fn.flatten(op.graph_product(graph, vs, batched=True), lead=(3,))
    for r in range(3):
        v = tuple(t[r] for t in vs)
        rev = fn.flatten(op.graph_product(graph, v))
        fwd = fn.flatten(cls.functional_product(fn, fn.params, case.batch, v))
        rr = fn.flatten(cls.functional_product(fn, fn.params, case.batch, v, reverse=True))
        for got in (rev, fwd, rr, batched[r]):
            torch.testing.assert_close(got, truth[r], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls", [HessianOperator, GGNOperator])
def test_merged_graphs_equal_the_sum_of_the_batches(cls):
    case = cases.mlp_case(n=40)
    op = cls(case.model, case.loader([7, 13, 19, 1]), cache_graph=False)
    leaves = op.fn.leaf_params()
    graphs = [op.build_graph(b, leaves) for b in op.fn.batches()]
    merged = op.merge_graphs(graphs)
    assert len(merged) == 1
    v = op.fn.unflatten(torch.randn(op.P, dtype=torch.float64))
    one = op.fn.flatten(op.graph_product(merged[0], v))
    each = sum(op.fn.flatten(op.graph_product(g, v)) for g in graphs)
    torch.testing.assert_close(one, each, rtol=1e-12, atol=1e-14)
