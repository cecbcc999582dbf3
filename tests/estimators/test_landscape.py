"""hessfast.loss_landscape: exact mean losses on a grid, curvature along eigenvectors, the model untouched."""
import json

import numpy as np
import pytest
import torch
from torch.func import functional_call

import cases
import hessfast
from hessfast.utils.model_state import snapshot


def flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


def direct_loss(case, w, bn_train=False):
    """Mean loss over all samples at flat trainable parameters w, in one batch, by functional_call."""
    names = [n for n, p in case.model.named_parameters() if p.requires_grad]
    shapes = [p.shape for n, p in case.model.named_parameters() if p.requires_grad]
    state, start = {}, 0
    for n, s in zip(names, shapes):
        k = int(np.prod(s))
        state[n] = w[start:start + k].view(s)
        start += k
    flags = [m.training for m in case.model.modules()]
    case.model.eval()
    try:
        with torch.no_grad():
            return float(case.loss_fn(functional_call(case.model, state, (case.x,)), case.y))
    finally:
        for m, f in zip(case.model.modules(), flags):
            m.training = f


def test_center_is_the_mean_loss_over_uneven_batches():
    case = cases.mlp_case()
    d = torch.randn(75, dtype=torch.float64)
    res = hessfast.loss_landscape(case.model, case.loader([7, 20, 13]), d, span=(-1, 1), steps=5,
                                  loss_fn=case.loss_fn)
    exact = direct_loss(case, flat_params(case.model))
    assert res.center == pytest.approx(exact, rel=1e-13)
    assert res.losses[2] == pytest.approx(exact, rel=1e-13)       # alpha = 0 on the odd symmetric grid
    assert res.losses.shape == (5,) and res.betas is None and res.meta["N"] == 40


@pytest.mark.parametrize("which", ["top", "bottom"])
def test_curvature_along_a_unit_eigenvector_is_its_eigenvalue(which):
    # L(w + a v) = L0 + a g.v + lambda a^2 / 2 + O(a^3). A least-squares quartic on 21 points of
    # [-0.01, 0.01] absorbs the a^3 and a^4 terms; the a^5, a^6 terms left move its a^2 coefficient by
    # ~ 1e-9 relative here (a quadratic fit would be off by 1e-5).
    case = cases.mlp_case()
    H = cases.dense_hessian(case)
    evals, evecs = torch.linalg.eigh(H)
    i = -1 if which == "top" else 0
    res = hessfast.loss_landscape(case.model, case.batch, evecs[:, i], span=(-1e-2, 1e-2), steps=21,
                                  loss_fn=case.loss_fn)
    c2 = np.polyfit(res.alphas, res.losses, 4)[-3]
    assert 2 * c2 == pytest.approx(float(evals[i]), rel=1e-7)


def test_two_directions_match_direct_evaluation_and_dicts_equal_flat_vectors():
    case = cases.cnn_case()
    g = torch.Generator().manual_seed(0)
    D = torch.randn(2, 157, generator=g, dtype=torch.float64)
    res = hessfast.loss_landscape(case.model, case.loader([10, 14]), D, span=(-0.5, 0.25), steps=4,
                                  loss_fn=case.loss_fn)
    assert res.losses.shape == (4, 4) and res.dims == 2
    w = flat_params(case.model)
    for i, j in [(0, 0), (1, 3), (3, 2)]:
        exact = direct_loss(case, w + res.alphas[i] * D[0] + res.betas[j] * D[1])
        assert res.losses[i, j] == pytest.approx(exact, rel=1e-12)
    names = [n for n, p in case.model.named_parameters()]
    sizes = [p.numel() for p in case.model.parameters()]
    as_dicts = [{n: part.view_as(p) for n, part, p in zip(names, row.split(sizes), case.model.parameters())}
                for row in D]
    again = hessfast.loss_landscape(case.model, case.loader([10, 14]), as_dicts, span=(-0.5, 0.25), steps=4,
                                    loss_fn=case.loss_fn)
    np.testing.assert_array_equal(again.losses, res.losses)


def test_the_model_comes_back_bit_for_bit_in_both_bn_modes():
    case = cases.bn_case()  # batch norm with non-default statistics, dropout, a frozen bias, train mode
    for p in case.model.parameters():
        p.grad = torch.full_like(p, 0.25)
    before = snapshot(case.model)
    P = sum(p.numel() for p in case.model.parameters() if p.requires_grad)
    for bn_mode in ("eval", "train"):
        hessfast.loss_landscape(case.model, case.loader([16, 16]), torch.randn(2, P, dtype=torch.float64),
                                steps=3, loss_fn=case.loss_fn, bn_mode=bn_mode)
    after = snapshot(case.model)
    for key in ("params", "buffers", "grads"):
        assert all(torch.equal(before[key][n], after[key][n]) for n in before[key])
    assert before["requires_grad"] == after["requires_grad"] and before["training"] == after["training"]


def test_filter_normalisation_rescales_filters_and_is_scale_invariant():
    # Each filter of the normalised direction has the norm of the weights' filter, 1-D parameters get
    # no step: the landscape is the same whatever the scale of the raw direction, and equals the
    # direct evaluation along the direction normalised here.
    case = cases.mlp_case()
    g = torch.Generator().manual_seed(1)
    d = torch.randn(75, generator=g, dtype=torch.float64)
    kw = dict(span=(-1, 1), steps=5, normalize="filter", loss_fn=case.loss_fn)
    a = hessfast.loss_landscape(case.model, case.batch, d, **kw)
    b = hessfast.loss_landscape(case.model, case.batch, 7.0 * d, **kw)
    np.testing.assert_allclose(a.losses, b.losses, rtol=1e-12)
    parts, start = [], 0
    for p in case.model.parameters():
        t = d[start:start + p.numel()].view_as(p)
        start += p.numel()
        if p.dim() == 1:
            parts.append(torch.zeros_like(t).reshape(-1))
        else:
            parts.append((t * (p.detach().norm(dim=1) / t.norm(dim=1))[:, None]).reshape(-1))
    normalised = torch.cat(parts)
    assert a.losses[4] == pytest.approx(direct_loss(case, flat_params(case.model) + normalised), rel=1e-12)


def test_save_load_and_plot(tmp_path):
    case = cases.linear_case()
    D = torch.randn(2, 28, dtype=torch.float64)
    for dirs in (D[0], D):
        res = hessfast.loss_landscape(case.model, case.batch, dirs, steps=3)
        res.save(tmp_path / "l.json")
        back = hessfast.LossLandscape.load(tmp_path / "l.json")
        np.testing.assert_array_equal(back.losses, res.losses)
        assert back.center == res.center and back.meta == json.loads(json.dumps(res.meta))
        res.plot(tmp_path / f"l{res.dims}.png")
        assert (tmp_path / f"l{res.dims}.png").stat().st_size > 1000


def test_bad_input_is_refused():
    case = cases.linear_case()
    d = torch.randn(28, dtype=torch.float64)
    with pytest.raises(ValueError, match="one or two directions"):
        hessfast.loss_landscape(case.model, case.batch, torch.randn(3, 28))
    with pytest.raises(ValueError, match="P = 28"):
        hessfast.loss_landscape(case.model, case.batch, torch.randn(27))
    with pytest.raises(ValueError, match="missing \\['bias'\\]"):
        hessfast.loss_landscape(case.model, case.batch, {"weight": torch.zeros(4, 6)})
    with pytest.raises(ValueError, match="'weight' has shape"):
        hessfast.loss_landscape(case.model, case.batch, {"weight": torch.zeros(6, 4), "bias": torch.zeros(4)})
    with pytest.raises(ValueError, match="steps"):
        hessfast.loss_landscape(case.model, case.batch, d, steps=1)
    with pytest.raises(ValueError, match="low < high"):
        hessfast.loss_landscape(case.model, case.batch, d, span=(1, -1))
    with pytest.raises(ValueError, match="normalize"):
        hessfast.loss_landscape(case.model, case.batch, d, normalize="layer")
    with pytest.raises(ValueError, match="empty"):
        hessfast.loss_landscape(case.model, [], d)
