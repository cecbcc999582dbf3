"""A tiny GPT-2 (tied embeddings, dropout, padded dict batches of different lengths) against dense float64 truth.

The truth is the curvature of the mean over all non-ignored next tokens of the data set, written by
hand in ``hf_cases`` and differentiated densely; hessfast sees the model, the dict batches and
``hessfast.losses.causal_lm()``.
"""
import numpy as np
import pytest
import torch
from scipy.sparse.linalg import eigsh

import hessfast
from hessfast.utils.model_state import snapshot

import hf_cases as hc

MODES = [("reverse", True), ("reverse", False), ("forward", False)]


@pytest.fixture(scope="module")
def setup():
    model = hc.tiny_gpt2()
    batches = hc.token_batches()
    return model, batches, hc.dense_truth(model, batches, hc.causal_lm_terms)


def probes(P, k=3, seed=0):
    return torch.randn(k, P, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_products_are_the_curvature_of_the_mean_over_all_tokens(setup, curvature):
    model, batches, truth = setup
    before = snapshot(model)
    dense = truth.hessian if curvature == "hessian" else truth.ggn
    V = probes(dense.shape[0])
    for mode, cache in MODES:
        op = hessfast.CurvatureOperator(model, batches, curvature=curvature, loss_fn=hessfast.losses.causal_lm(),
                                        hvp_mode=mode, cache_graph=cache)
        assert op.P == dense.shape[0] and op.N == 9
        assert op.meta()["loss_terms"] == truth.count == 28
        err = hc.rel(op.matmat(V), V @ dense)
        assert err < 1e-10, f"{curvature} {mode} cache={cache}: relative error {err:.2e}"
    hc.assert_unchanged(model, before)


def test_per_batch_means_would_be_wrong(setup):
    """The same batches weighted per batch (a plain callable loss) are measurably off: the test above
    can tell the two conventions apart."""
    model, batches, truth = setup

    def per_batch_mean(out, labels):
        s, c = hc.causal_lm_terms(out, labels)
        return s / c

    pairs = [({k: v for k, v in b.items() if k != "labels"}, b["labels"]) for b in batches]
    op = hessfast.HessianOperator(model, pairs, loss_fn=hessfast.losses.from_callable(
        lambda out, y: per_batch_mean(out.logits, y), raw_output=True))
    V = probes(op.P)
    assert hc.rel(op.matmat(V), V @ truth.hessian) > 1e-2


def test_default_sdpa_attention_is_exact(setup):
    """With the default attention (SDPA, whose fused CPU kernel has no second derivative) products are
    still exact: the exact modes run attention through PyTorch's math kernel."""
    _, batches, truth = setup
    model = hc.tiny_gpt2(attn=None)
    assert model.config._attn_implementation == "sdpa"
    V = probes(truth.hessian.shape[0])
    for curvature, dense in (("hessian", truth.hessian), ("ggn", truth.ggn)):
        op = hessfast.CurvatureOperator(model, batches, curvature=curvature, loss_fn=hessfast.losses.causal_lm())
        assert op.hvp_mode == "reverse"
        assert hc.rel(op.matmat(V), V @ dense) < 1e-10


def test_lanczos_extremes_match_arpack(setup):
    model, batches, truth = setup
    for curvature, dense in (("hessian", truth.hessian), ("ggn", truth.ggn)):
        spec = hessfast.lanczos(model, batches, m=120, curvature=curvature, loss_fn=hessfast.losses.causal_lm(),
                                seed=0, progress=False)
        top = eigsh(dense.numpy(), k=1, which="LA", return_eigenvectors=False)[0]
        np.testing.assert_allclose(spec.lambda_max, top, rtol=1e-9)
        if curvature == "hessian":
            bottom = eigsh(dense.numpy(), k=1, which="SA", return_eigenvectors=False)[0]
            np.testing.assert_allclose(spec.lambda_min, bottom, rtol=1e-9)
        assert spec.meta["dropout"] == "off" and "dropout off" in repr(spec)
        assert spec.meta["hvp_mode"] == "reverse"


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_finite_differences_against_exact(setup, curvature):
    """float64: the fd step rule gives <= 1e-6 relative (measured about 1e-10); float32: about 1e-4."""
    model, batches, truth = setup
    dense = truth.hessian if curvature == "hessian" else truth.ggn
    V = probes(dense.shape[0])
    op = hessfast.CurvatureOperator(model, batches, curvature=curvature, loss_fn=hessfast.losses.causal_lm(),
                                    hvp_mode="fd")
    assert op.hvp_mode == "fd" and not op.cached
    err64 = hc.rel(op.matmat(V), V @ dense)
    assert err64 < 1e-6, err64
    op32 = hessfast.CurvatureOperator(model, batches, curvature=curvature, loss_fn=hessfast.losses.causal_lm(),
                                      hvp_mode="fd", dtype=torch.float32)
    err32 = hc.rel(op32.matmat(V.float()).double(), V @ dense)
    exact32 = hessfast.CurvatureOperator(model, batches, curvature=curvature, loss_fn=hessfast.losses.causal_lm(),
                                         dtype=torch.float32)
    floor = hc.rel(exact32.matmat(V.float()).double(), V @ dense)   # float32 rounding of the exact product
    assert err32 < 2e-3 and err32 > floor, (err32, floor)


def test_tied_embeddings_are_counted_once(setup):
    model, batches, truth = setup
    assert model.lm_head.weight is model.transformer.wte.weight
    op = hessfast.HessianOperator(model, batches, loss_fn=hessfast.losses.causal_lm(), cache_graph=False)
    assert op.P == sum(p.numel() for p in model.parameters()) == truth.w.numel()
    assert "transformer.wte.weight" in op.names and "lm_head.weight" not in op.names


def test_a_bfloat16_model_runs_in_float32_and_stays_bfloat16(setup):
    _, batches, truth = setup
    model = hc.tiny_gpt2(dtype=torch.bfloat16)
    before = snapshot(model)
    V = probes(truth.w.numel())
    HV, _ = hc.truth_products(model, batches, hc.causal_lm_terms, V)   # at the bfloat16 weights, exactly widened
    op = hessfast.HessianOperator(model, batches, loss_fn=hessfast.losses.causal_lm())
    assert op.dtype == torch.float32 and op.meta()["dtype"] == "float32"
    assert hc.rel(op.matmat(V.float()).double(), HV) < 1e-4
    spec = hessfast.lanczos(model, batches, m=20, loss_fn=hessfast.losses.causal_lm(), seed=0, progress=False)
    assert spec.meta["dtype"] == "float32" and np.isfinite(spec.lambda_max)
    hc.assert_unchanged(model, before)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
