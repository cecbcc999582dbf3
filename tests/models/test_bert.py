"""A tiny BERT sequence classifier with attention masks over padded batches of different lengths."""
import numpy as np
import pytest
import torch

import hessfast
from hessfast.utils.model_state import snapshot

import hf_cases as hc


@pytest.fixture(scope="module")
def setup():
    model = hc.tiny_bert()
    batches = hc.class_batches()
    V = torch.randn(2, sum(p.numel() for p in model.parameters()), generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)
    return model, batches, V, hc.truth_products(model, batches, hc.class_terms, V)


@pytest.mark.parametrize("attn", ["eager", None])
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_products_match_the_truth(setup, attn, curvature):
    _, batches, V, (HV, GV) = setup
    model = hc.tiny_bert(attn=attn)     # same seed: the same weights as the truth's
    before = snapshot(model)
    modes = [("reverse", True), ("forward", False), ("fd", False)] if attn == "eager" else [("auto", "auto")]
    for mode, cache in modes:
        op = hessfast.CurvatureOperator(model, batches, curvature=curvature,
                                        loss_fn=hessfast.losses.sequence_classification(), hvp_mode=mode,
                                        cache_graph=cache)
        assert op.N == 9 and op.meta()["loss_terms"] == 9
        assert hc.rel(op.matmat(V), HV if curvature == "hessian" else GV) < (1e-6 if mode == "fd" else 1e-10), mode
    hc.assert_unchanged(model, before)


def _per_sample_truth(model, batches, V):
    """(1/n) sum_i ||H_i v||^2 and (1/n) sum_i v . H_i v per probe, each sample alone (its own mask)."""
    w, call = hc._flat_model(model)
    sq, quad, n = np.zeros(len(V)), np.zeros(len(V)), 0
    for b in batches:
        for i in range(b["labels"].shape[0]):
            x = {k: b[k][i:i + 1] for k in ("input_ids", "attention_mask")}
            y = b["labels"][i:i + 1]
            for r, v in enumerate(V):
                _, u = torch.autograd.functional.hvp(lambda f: hc.class_terms(call(f, x), y)[0], w, v)
                sq[r] += float(u @ u)
                quad[r] += float(v @ u)
            n += 1
    return sq / n, quad / n


def test_hessian_variance_with_attention_masks(setup):
    model, batches, _, _ = setup
    V = torch.randn(2, sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    V = V / V.norm(dim=1, keepdim=True)
    mean_sq, quad = _per_sample_truth(model, batches, V)
    with pytest.warns(UserWarning, match="using route='loop'"):
        res = hessfast.hessian_variance(model, batches, probes=V, loss_fn=hessfast.losses.sequence_classification(),
                                        progress=False)
    assert res.meta["route"] == "loop"           # vmap cannot batch the masking code; auto says so and loops
    np.testing.assert_allclose(res.per_probe["mean_sq"], mean_sq, rtol=1e-10)
    np.testing.assert_allclose(res.per_probe["quadratic"], quad, rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="route='loop'"):
        hessfast.hessian_variance(model, batches, probes=V, route="vmap",
                                  loss_fn=hessfast.losses.sequence_classification(), progress=False)
