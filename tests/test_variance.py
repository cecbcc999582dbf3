"""hessian_variance against dense float64 per-sample curvature, and the routes against each other."""
import numpy as np
import pytest
import torch
from torch import nn

from hessfast.operators import GGNOperator, HessianOperator, ModelFunction, ghost, per_sample
from hessfast.operators.ghost import GhostSums
from hessfast.utils.data import concat_batches, rechunk
from hessfast.utils.model_state import snapshot
from hessfast.variance import HessianVariance, hessian_variance, unit_probes

import cases


# ---------------------------------------------------------------------- dense per-sample truth
def per_sample_dense(case, curvature):
    """(n, P, P) per-sample curvature of the per-sample loss, built with torch.autograd.functional."""
    out = []
    for i in range(len(case.y)):
        one = cases.Case(case.name, case.model, case.x[i:i + 1], case.y[i:i + 1], case.loss_fn)
        out.append(cases.dense_hessian(one) if curvature == "hessian" else cases.dense_ggn(one))
    return torch.stack(out)


def exact(C, Q):
    """Exact estimator values for unit probes Q (R, P): centred, algorithm1 (means over probes), sigma2."""
    n, P, _ = C.shape
    Cbar = C.mean(0)
    sigma2 = ((C - Cbar) ** 2).sum((1, 2)).mean() / P ** 2
    CQ = torch.einsum("ijk,rk->irj", C, Q)                      # (n, R, P)
    mean_sq = (CQ ** 2).sum(2).mean(0)
    quad = torch.einsum("rj,jk,rk->r", Q, Cbar, Q)
    centred = mean_sq - ((Q @ Cbar) ** 2).sum(1)
    return {"sigma2": float(sigma2), "centred": float(centred.mean()), "algorithm1": float((mean_sq - quad ** 2).mean()),
            "quadratic": float(quad.mean())}


def random_orthonormal(P, seed):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=torch.float64))
    return q.T


DENSE = [("mlp", "hessian"), ("mlp", "ggn"), ("cnn", "hessian"), ("cnn", "ggn"), ("mlp-mse", "hessian")]


@pytest.fixture(scope="module")
def dense_truth():
    store = {}

    def get(name, curvature):
        if (name, curvature) not in store:
            case = cases.ALL[name]()
            store[(name, curvature)] = (case, per_sample_dense(case, curvature))
        return store[(name, curvature)]

    return get


@pytest.mark.parametrize("name,curvature", DENSE)
def test_orthonormal_basis_gives_the_exact_per_element_variance(dense_truth, name, curvature, assert_model_unchanged):
    case, C = dense_truth(name, curvature)
    P = C.shape[1]
    Q = random_orthonormal(P, 1)
    truth = exact(C, Q)
    before = snapshot(case.model)
    for route in ("vmap", "ghost"):
        res = hessian_variance(case.model, case.loader([5, len(case.y) - 5]), curvature=curvature,
                               loss_fn=case.loss_fn, probes=Q, route=route, progress=False)
        assert (res.N, res.P, res.num_probes) == (len(case.y), P, P)
        for key in ("sigma2", "centred", "algorithm1", "quadratic"):
            assert getattr(res, key) == pytest.approx(truth[key], rel=1e-9, abs=1e-15), (route, key)
        # per element: the centred estimate over a full basis is mean_i ||C_i - Cbar||_F^2 / P
        assert res.centred / P == pytest.approx(res.sigma2, rel=1e-12)
        assert res.sigma2_unbiased == pytest.approx(res.sigma2 * res.N / (res.N - 1), rel=1e-12)
        assert res.algorithm1 >= res.centred - 1e-12   # it subtracts (v^T Cbar v)^2 <= ||Cbar v||^2
    assert_model_unchanged(case.model, before)


@pytest.mark.parametrize("name,curvature", [("mlp", "hessian"), ("mlp", "ggn"), ("cnn", "hessian")])
def test_random_probes_within_three_standard_errors(dense_truth, name, curvature):
    case, C = dense_truth(name, curvature)
    truth = exact(C, torch.eye(C.shape[1], dtype=torch.float64))["sigma2"]
    res = hessian_variance(case.model, case.batch, curvature=curvature, loss_fn=case.loss_fn, num_probes=40, seed=3,
                           progress=False)
    assert np.isfinite(res.sigma2_stderr) and res.sigma2_stderr > 0
    assert abs(res.sigma2 - truth) <= 3 * res.sigma2_stderr, (res.sigma2, truth, res.sigma2_stderr)
    # the per-probe values are unbiased, so the spread is also sane: not far below the error itself
    assert res.sigma2_stderr < 0.5 * truth


def test_algorithm1_printed_lacks_the_one_over_n(dense_truth):
    case, C = dense_truth("mlp", "hessian")
    res = hessian_variance(case.model, case.batch, num_probes=3, progress=False)
    pp = res.per_probe
    printed = res.N * pp["mean_sq"] - pp["quadratic"] ** 2
    assert res.algorithm1_printed == pytest.approx(printed.mean(), rel=1e-12)
    assert res.algorithm1 == pytest.approx((pp["mean_sq"] - pp["quadratic"] ** 2).mean(), rel=1e-12)


# ---------------------------------------------------------------------- routes agree
class Reused(nn.Module):
    """A Linear called twice, a Linear on sequences, a strided dilated conv and a frozen bias."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, stride=2, dilation=2, padding=1)
        self.seq = nn.Linear(3, 4)
        self.shared = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)
        self.head.bias.requires_grad_(False)

    def forward(self, x):
        h = torch.tanh(self.conv(x))                  # (n, 3, 3, 3)
        h = h.flatten(2).transpose(1, 2)              # (n, 9, 3): a sequence
        h = torch.tanh(self.seq(h))
        h = torch.tanh(self.shared(torch.tanh(self.shared(h))))
        return self.head(h.mean(1))


def reused_case(n=13):
    g = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    model = Reused().double()
    x = torch.randn(n, 2, 7, 7, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return cases.Case("reused", model, x, y, nn.CrossEntropyLoss())


@pytest.mark.parametrize("name", ["mlp", "cnn", "mlp-mse", "linear", "reused"])
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_ghost_norms_equal_vmap_and_loop(name, curvature, assert_model_unchanged):
    case = reused_case() if name == "reused" else cases.ALL[name]()
    kw = dict(curvature=curvature, loss_fn=case.loss_fn, num_probes=3, seed=7, progress=False)
    data = case.loader([6, len(case.y) - 6])
    before = snapshot(case.model)
    vm = hessian_variance(case.model, data, route="vmap", **kw)
    gh = hessian_variance(case.model, data, route="ghost", **kw)
    assert gh.meta["route"] == "ghost" and vm.meta["route"] == "vmap"
    for key in ("mean_sq", "quadratic", "mean_product_sq"):
        np.testing.assert_allclose(gh.per_probe[key], vm.per_probe[key], rtol=1e-10, atol=1e-14)
    if name in ("mlp", "reused"):
        lp = hessian_variance(case.model, data, route="loop", **kw)
        np.testing.assert_allclose(lp.per_probe["mean_sq"], vm.per_probe["mean_sq"], rtol=1e-10)
    assert_model_unchanged(case.model, before)


def test_ggn_double_vjp_fallback_matches_forward_mode():
    case = cases.cnn_case()
    fn = ModelFunction(case.model, case.batch)
    V = unit_probes(fn.P, 2, None, 0, fn.dtype, fn.device)
    sums = GhostSums(fn, GGNOperator)
    fwd = sums(case.batch, V, ggn_forward=True)
    assert not sums.forward_mode_failed                         # forward mode did run
    rev = sums(case.batch, V, ggn_forward=False)
    for a, b in zip(fwd, rev):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    sums.forward_mode_failed = True                             # as after an op without forward mode
    again = sums(case.batch, V[:1], ggn_forward=True)
    for a, b in zip(again, fwd):
        torch.testing.assert_close(a, b[:1], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["mlp", "cnn", "reused"])
def test_ghost_hessian_probes_batched_in_one_backward_equal_the_loop(name):
    case = reused_case() if name == "reused" else cases.ALL[name]()
    fn = ModelFunction(case.model, case.batch, loss_fn=case.loss_fn)
    V = unit_probes(fn.P, 3, None, 2, fn.dtype, fn.device)
    sums = GhostSums(fn, HessianOperator)
    loop = sums(case.batch, V, batch_probes=False)
    batched = sums(case.batch, V, batch_probes=True)
    for a, b in zip(loop, batched):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("route", ["ghost", "vmap"])
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_loader_batches_merged_and_split_into_chunks_do_not_change_the_result(route, curvature):
    case = cases.mlp_case(n=40)
    kw = dict(curvature=curvature, num_probes=3, seed=1, progress=False, route=route)
    one = hessian_variance(case.model, case.batch, **kw)
    assert one.meta["chunk_size"] >= 40                         # small data: one chunk
    for data, chunk in ((case.loader([7, 13, 19, 1]), None), (case.loader([7, 13, 19, 1]), 16),
                        (case.batch, 3), ((b for b in case.loader([20, 20])), 7), (case.loader([5] * 8), 1)):
        other = hessian_variance(case.model, data, chunk_size=chunk, **kw)
        assert other.N == 40 and other.meta["chunk_size"] == (chunk or one.meta["chunk_size"])
        for key in ("mean_sq", "quadratic", "centred"):
            np.testing.assert_allclose(other.per_probe[key], one.per_probe[key], rtol=1e-10, atol=1e-15)


def test_rechunk_merges_splits_and_passes_on_batches_that_cannot_be_concatenated():
    x, y = torch.arange(20.).reshape(10, 2), torch.arange(10)
    batches = [(x[:3], y[:3]), (x[3:4], y[3:4]), (x[4:10], y[4:10])]
    out = list(rechunk(iter(batches), 4))
    assert [len(b[1]) for b in out] == [4, 4, 2]
    torch.testing.assert_close(torch.cat([b[0] for b in out]), x)
    torch.testing.assert_close(torch.cat([b[1] for b in out]), y)
    # dict and tuple inputs are concatenated leaf by leaf
    d = concat_batches([({"a": x[:2], "b": x[:2, :1]}, y[:2]), ({"a": x[2:5], "b": x[2:5, :1]}, y[2:5])])
    assert d[0]["a"].shape == (5, 2) and d[0]["b"].shape == (5, 1) and d[1].shape == (5,)
    t = concat_batches([((x[:2], x[:2]), y[:2]), ((x[2:3], x[2:3]), y[2:3])])
    assert isinstance(t[0], tuple) and t[0][1].shape == (3, 2)
    # sequences of different lengths: passed on unchanged, in order
    seqs = [(torch.zeros(2, 5, 3), y[:2]), (torch.zeros(3, 7, 3), y[2:5])]
    assert concat_batches(seqs) is None
    out = list(rechunk(iter(seqs), 100))
    assert [tuple(b[0].shape) for b in out] == [(2, 5, 3), (3, 7, 3)]


def test_auto_chunk_sizes():
    P = 26_122
    for R in (1, 4, 64):
        c = per_sample.auto_chunk(R, P, torch.float32, torch.device("cpu"))
        assert c >= 1 and (c == 1 or c * R * P * 4 <= per_sample.CPU_CHUNK_BYTES)
    case = cases.cnn_case()
    fn = ModelFunction(case.model, case.batch)
    c1, c8 = ghost.auto_chunk(fn, HessianOperator, case.batch, 1), ghost.auto_chunk(fn, HessianOperator, case.batch, 8)
    assert c1 >= c8 >= 1


def test_auto_route_and_batchnorm(assert_model_unchanged):
    case = cases.bn_case()
    before = snapshot(case.model)
    res = hessian_variance(case.model, case.batch, num_probes=2, progress=False)
    assert res.meta["route"] == "vmap"      # batch-norm affine parameters are not in Linear/Conv layers
    with pytest.raises(ValueError, match="route='ghost' cannot"):
        hessian_variance(case.model, case.batch, route="ghost", progress=False)
    with pytest.raises(ValueError, match="per-sample curvature"):
        hessian_variance(case.model, case.batch, bn_mode="train", progress=False)
    assert_model_unchanged(case.model, before)
    assert hessian_variance(cases.mlp_case().model, cases.mlp_case().batch, progress=False).meta["route"] == "ghost"


def test_uneven_loader_chunks_and_kernel_backend_do_not_change_the_result():
    case = cases.mlp_case(n=40)
    kw = dict(num_probes=2, seed=1, progress=False, route="vmap")
    one = hessian_variance(case.model, case.batch, **kw)
    for data, chunk in ((case.loader([7, 13, 19, 1]), None), (case.batch, 3), ((b for b in case.loader([20, 20])), 7)):
        other = hessian_variance(case.model, data, chunk_size=chunk, backend="torch", **kw)
        assert other.N == 40
        np.testing.assert_allclose(other.per_probe["centred"], one.per_probe["centred"], rtol=1e-11)


def test_max_samples_is_a_seeded_subset_without_replacement():
    case = cases.mlp_case(n=40)
    res = hessian_variance(case.model, case.loader([16, 16, 8]), max_samples=11, seed=4, num_probes=2,
                           progress=False)
    assert (res.N, res.N_total) == (11, 40)
    keep = torch.randperm(40, generator=torch.Generator().manual_seed(4))[:11].sort().values
    sub = hessian_variance(case.model, (case.x[keep], case.y[keep]), seed=4, num_probes=2, progress=False)
    np.testing.assert_allclose(res.per_probe["centred"], sub.per_probe["centred"], rtol=1e-12)
    full = hessian_variance(case.model, case.batch, max_samples=400, seed=4, num_probes=2, progress=False)
    assert (full.N, full.N_total) == (40, 40)


def test_result_is_json_and_readable():
    import json

    case = cases.linear_case()
    res = hessian_variance(case.model, case.batch, num_probes=1, progress=False)
    assert isinstance(res, HessianVariance)
    assert np.isnan(res.sigma2_stderr)                    # one probe: no standard error
    d = json.loads(json.dumps(res.to_dict()))
    assert d["sigma2_stderr"] is None and d["P"] == 28 and len(d["per_probe"]["sigma2"]) == 1
    assert "sigma2 (per element)" in repr(res)


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(route="fast"), ValueError, "unknown route"),
    (dict(num_probes=0), ValueError, "num_probes"),
    (dict(probes=torch.ones(2, 5)), ValueError, r"shape \(R, P\) with P=75"),
    (dict(probes=torch.zeros(1, 75)), ValueError, "zero"),
    (dict(max_samples=0), ValueError, "max_samples"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(curvature="kfac"), ValueError, "unknown curvature"),
])
def test_input_checks(kwargs, err, match):
    case = cases.mlp_case()
    with pytest.raises(err, match=match):
        hessian_variance(case.model, case.batch, progress=False, **kwargs)


def test_data_checks_are_those_of_the_operators():
    case = cases.mlp_case()
    with pytest.raises(ValueError, match="empty"):
        hessian_variance(case.model, [], progress=False)
    with pytest.raises(TypeError, match="inputs, targets"):
        hessian_variance(case.model, [(case.x,)], progress=False)
