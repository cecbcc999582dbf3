"""Compiled curvature products (hessfast.operators.compiled): the same products, compiled once, eager on failure.

Truth is the dense float64 curvature of tests/cases.py. The tests compile with TorchDynamo's
``aot_eager`` backend (the same tracing, functionalisation and graph capture as the default, without
the C++ code generation that takes tens of seconds on CPU), except the last, which compiles with the
default inductor backend and compares its float32 and float64 products with the eager ones. The
tests that compile a working product take 5-40 s each on CPU and are marked ``slow``; the fallback,
rule and argument tests are not.
"""
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import cases
import hessfast
from hessfast.operators import GGNOperator, HessianOperator, compiled
from hessfast.utils.model_state import snapshot


@pytest.fixture
def fast_backend(monkeypatch):
    monkeypatch.setattr(compiled, "COMPILE_BACKEND", "aot_eager")


def dense(cls, case, data):
    return cls(case.model, data, loss_fn=case.loss_fn, hvp_mode="reverse").to_dense()


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.slow
@pytest.mark.parametrize("cls, sizes", [(HessianOperator, [16, 16, 8]), (GGNOperator, [40])])
def test_compiled_products_match_dense_truth(cls, sizes, fast_backend, assert_model_unchanged):
    case = cases.mlp_case(seed=4)
    data = case.loader(sizes)                          # [16, 16, 8]: two batch shapes, two compiled graphs
    before = snapshot(case.model)
    op = cls(case.model, data, loss_fn=case.loss_fn, compile=True)
    meta = op.meta()
    assert op.hvp_mode == "forward" and meta["compiled"] and meta["compile"] is True
    assert meta["compile_graphs"] == len(set(sizes)) and meta["compile_s"] > 0
    D = dense(cls, case, data)
    V = torch.randn(3, op.P, dtype=torch.float64)
    assert rel(op.matvec(V[0]), D @ V[0]) < 1e-10
    assert rel(op.matmat(V), V @ D) < 1e-10            # the vmapped product, compiled at its first call
    assert op.meta()["compiled"]
    assert_model_unchanged(case.model, before)


@pytest.mark.slow
def test_compiled_once_per_model_and_shape(fast_backend):
    """Tracking during training: a new operator at new weights reuses the compiled code."""
    case = cases.mlp_case(seed=5)
    model, data = case.model, case.loader([20, 20])
    first = HessianOperator(model, data, loss_fn=case.loss_fn, compile=True)
    assert first.meta()["compile_graphs"] == 1
    count = compiled.compilations()
    for step in range(3):
        with torch.no_grad():                         # a training step changes the weights
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        op = HessianOperator(model, data, loss_fn=case.loss_fn, compile=True)
        v = torch.randn(op.P, dtype=torch.float64)
        assert rel(op.matvec(v), dense(HessianOperator, case, data) @ v) < 1e-10
        assert op.meta()["compile_graphs"] == 0 and op.meta()["compile_s"] == 0.0
    spec = hessfast.lanczos(model, data, m=8, loss_fn=case.loss_fn, compile=True, seed=0, progress=False)
    assert spec.meta["compiled"] and spec.meta["compile_graphs"] == 0
    assert compiled.compilations() == count             # nothing was compiled again


def test_compile_failure_falls_back_to_eager_with_a_warning(monkeypatch):
    def broken(gm, example_inputs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(compiled, "COMPILE_BACKEND", broken)
    case = cases.mlp_case(seed=6)
    data = case.loader([24, 16])
    with pytest.warns(UserWarning, match="torch.compile of the HessianOperator product failed.*no C\\+\\+ compiler"):
        op = HessianOperator(case.model, data, loss_fn=case.loss_fn, compile=True)
    meta = op.meta()
    assert not meta["compiled"] and "no C++ compiler" in meta["compile_fallback"]
    assert op.hvp_mode == "reverse" and op.cached       # what compile=False would have run
    eager = HessianOperator(case.model, data, loss_fn=case.loss_fn)
    v = torch.randn(op.P, dtype=torch.float64)
    assert torch.equal(op.matvec(v), eager.matvec(v))
    with pytest.warns(UserWarning, match="product failed"):   # the failed key is remembered: no second attempt
        HessianOperator(case.model, data, loss_fn=case.loss_fn, compile=True)


class GraphBreaking(nn.Module):
    """A model whose forward pass cannot be captured in one graph (fullgraph=True refuses it)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3).double()

    def forward(self, x):
        torch._dynamo.graph_break()
        return self.lin(torch.tanh(x))


def test_graph_break_falls_back_to_eager(fast_backend):
    model = GraphBreaking()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g)
    with pytest.warns(UserWarning, match="product failed"):
        spec = hessfast.lanczos(model, (x, y), m=6, compile=True, hvp_mode="forward", seed=0, progress=False)
    assert not spec.meta["compiled"] and spec.meta["compile_fallback"]
    ref = hessfast.lanczos(model, (x, y), m=6, hvp_mode="forward", seed=0, progress=False)
    np.testing.assert_allclose(spec.ritz_values, ref.ritz_values, rtol=0, atol=1e-12)


def test_auto_rule_is_deterministic_and_eager_on_cpu():
    for _ in range(3):
        assert compiled.auto_compile("cpu", 10 ** 9) is False
        assert compiled.auto_compile("cuda", compiled.AUTO_MIN_BATCH_PRODUCTS - 1) is False
        assert compiled.auto_compile("cuda", compiled.AUTO_MIN_BATCH_PRODUCTS) is True
    assert compiled.resolve_compile("auto", device="cuda", hvp_mode="reverse", batch_products=10 ** 6) is False
    assert compiled.resolve_compile("auto", device="cuda", hvp_mode="auto", batch_products=10 ** 6) is True
    case = cases.mlp_case()
    spec = hessfast.lanczos(case.model, case.batch, m=5, loss_fn=case.loss_fn, compile="auto", seed=0, progress=False)
    assert spec.meta["compile"] == "auto" and not spec.meta["compiled"] and spec.meta["hvp_mode"] == "reverse"


def test_bad_compile_arguments():
    case = cases.mlp_case()
    with pytest.raises(ValueError, match="compile must be False, True or 'auto'"):
        HessianOperator(case.model, case.batch, loss_fn=case.loss_fn, compile="yes")
    with pytest.raises(ValueError, match="hvp_mode='reverse' does not run; use hvp_mode='auto' or 'forward'"):
        HessianOperator(case.model, case.batch, loss_fn=case.loss_fn, compile=True, hvp_mode="reverse")
    with pytest.raises(ValueError, match="hvp_mode='fd'"):
        hessfast.lanczos(case.model, case.batch, m=3, loss_fn=case.loss_fn, compile=True, hvp_mode="fd")


@pytest.mark.slow
@pytest.mark.parametrize("dtype, tol, cls", [(torch.float64, 1e-10, HessianOperator),
                                             (torch.float32, 1e-5, GGNOperator)])
def test_inductor_products_agree_with_eager(dtype, tol, cls):
    """The default backend (C++ code generation on CPU): compiled and eager products agree."""
    case = cases.cnn_case(seed=1) if cls is GGNOperator else cases.mlp_case(seed=7)
    model = case.model.to(dtype)
    batch = (case.x.to(dtype), case.y)
    op = cls(model, batch, loss_fn=case.loss_fn, compile=True)
    assert op.meta()["compiled"], op.meta().get("compile_fallback")
    eager = cls(model, batch, loss_fn=case.loss_fn, hvp_mode="forward")
    with warnings.catch_warnings():
        warnings.simplefilter("error")                 # no silent fallback during the products
        for seed in range(3):
            v = torch.randn(op.P, generator=torch.Generator().manual_seed(seed), dtype=dtype)
            assert rel(op.matvec(v).double(), eager.matvec(v).double()) < tol
