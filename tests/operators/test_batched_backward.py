"""Products through a cached graph as one batched backward (``CurvatureOperator.batched_backward``).

Truth: the dense float64 curvature of the test MLP (``cases.dense_hessian`` / ``dense_ggn``, from
``torch.autograd.functional``) and the same operator's products one backward after another.
"""
import warnings

import numpy as np
import pytest
import torch

import cases
import hessfast


def _operator(curvature, **kw):
    case = cases.mlp_case(n=40)
    loss = hessfast.losses.cross_entropy() if curvature == "fisher" else case.loss_fn   # "fisher" samples targets
    return case, hessfast.CurvatureOperator(case.model, case.loader([11, 29]), curvature=curvature, loss_fn=loss, **kw)


@pytest.mark.parametrize("curvature", ["hessian", "ggn", "empirical_fisher", "fisher"])
def test_batched_backward_equals_products_one_after_another(curvature):
    case, op = _operator(curvature)
    assert op.cached and op.batched_backward is False          # the CPU rule: one backward after another
    assert op.meta()["batched_backward"] is False and not op.shares_products
    V = torch.randn(5, op.P, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    one_by_one = op.matmat(V)
    op.batched_backward = True
    assert op.shares_products
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # no fallback happened
        together = op.matmat(V)
    torch.testing.assert_close(together, one_by_one, rtol=1e-12, atol=1e-14)
    if curvature in ("hessian", "ggn"):
        truth = cases.dense_hessian(case) if curvature == "hessian" else cases.dense_ggn(case)
        torch.testing.assert_close(together, V @ truth, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("error", [RuntimeError("Batching rule not implemented for aten::some_op"),
                                   torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")],
                         ids=["no batching rule", "out of memory with b vectors"])
def test_a_failing_batched_backward_falls_back_with_a_warning(monkeypatch, error):
    _, op = _operator("hessian")
    V = torch.randn(3, op.P, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    expected = op.matmat(V)
    inner = type(op).graph_product

    def fails_when_batched(self, graph, v, batched=False):
        if batched:
            raise error
        return inner(self, graph, v, batched)

    monkeypatch.setattr(type(op), "graph_product", fails_when_batched)
    op.batched_backward = True
    with pytest.warns(UserWarning, match="batched backward through the cached graph failed.*one after another.*"
                                         + str(error).split()[0]):
        got = op.matmat(V)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    assert op.batched_backward is False and op.meta()["batched_backward"] is False


def test_out_of_memory_one_vector_at_a_time_is_raised(monkeypatch):
    _, op = _operator("hessian")

    def oom(self, graph, v, batched=False):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(type(op), "graph_product", oom)
    with pytest.raises(torch.OutOfMemoryError):
        op.matmat(torch.zeros(2, op.P, dtype=torch.float64))


def test_a_cached_product_runs_no_module():
    """Through the cached graph a product is a backward pass alone: no forward hook fires."""
    case, op = _operator("hessian")
    calls = []
    handle = case.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        op.matvec(torch.ones(op.P, dtype=torch.float64))
        op.matmat(torch.ones(2, op.P, dtype=torch.float64))
    finally:
        handle.remove()
    assert calls == []


def test_lockstep_follows_shares_products(assert_model_unchanged):
    """With a batched backward the automatic rule runs the probes in lockstep, to the same numbers."""
    case, op = _operator("hessian")
    from hessfast.utils.model_state import snapshot

    before = snapshot(case.model)
    kw = dict(m=15, num_probes=4, seed=5, progress=False)
    seq = hessfast.lanczos(op, **kw)
    op.batched_backward = True
    together = hessfast.lanczos(op, **kw)
    assert not seq.meta["lockstep"] and together.meta["lockstep"]
    assert seq.meta["batched_backward"] is False and together.meta["batched_backward"] is True
    scale = np.abs(seq.ritz_values).max()
    np.testing.assert_allclose(together.ritz_values, seq.ritz_values, rtol=0, atol=1e-10 * scale)
    np.testing.assert_allclose(together.weights, seq.weights, rtol=0, atol=1e-10)
    assert_model_unchanged(case.model, before)
