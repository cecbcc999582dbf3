"""A tiny ViT classifier: (pixel_values, labels) batches, a ModelOutput and the default loss."""
import pytest
import torch

import hessfast
from hessfast.utils.model_state import snapshot

import hf_cases as hc


@pytest.fixture(scope="module")
def setup():
    model = hc.tiny_vit()
    batches = hc.image_batches()
    V = torch.randn(2, sum(p.numel() for p in model.parameters()), generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)
    return model, batches, V, hc.truth_products(model, batches, hc.class_terms, V)


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_products_match_the_truth_with_the_default_loss(setup, curvature):
    model, batches, V, (HV, GV) = setup
    before = snapshot(model)
    for mode, cache in (("reverse", True), ("reverse", False), ("forward", False)):
        op = hessfast.CurvatureOperator(model, batches, curvature=curvature, hvp_mode=mode, cache_graph=cache)
        assert hc.rel(op.matmat(V), HV if curvature == "hessian" else GV) < 1e-10, mode
    hc.assert_unchanged(model, before)


def test_default_sdpa_and_finite_differences(setup):
    """ViT's eager attention takes its softmax in float32 (1e-9 from SDPA's float64): SDPA gets its own truth."""
    _, batches, V, _ = setup
    model = hc.tiny_vit(attn=None)
    HV, GV = hc.truth_products(model, batches, hc.class_terms, V)
    assert hc.rel(hessfast.HessianOperator(model, batches).matmat(V), HV) < 1e-10
    for curvature, truth in (("hessian", HV), ("ggn", GV)):
        fd = hessfast.CurvatureOperator(model, batches, curvature=curvature, hvp_mode="fd")
        assert fd.meta()["hvp_mode"] == "fd" and fd.meta()["attention"] == "default"
        assert hc.rel(fd.matmat(V), truth) < 1e-6
