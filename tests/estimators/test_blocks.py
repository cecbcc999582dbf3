"""hessfast.block_spectra: spectra of the diagonal blocks H_bb against dense float64 truth."""
import json

import numpy as np
import pytest
import torch

import cases
import hessfast
from hessfast.utils.model_state import snapshot


class Counting:
    """A curvature operator behind the protocol, counting rows multiplied and matmat calls."""

    def __init__(self, op):
        self.op, self.P, self.dtype, self.device = op, op.P, op.dtype, op.device
        self.products = self.calls = 0

    def matmat(self, V):
        self.products += V.shape[0]
        self.calls += 1
        return self.op.matmat(V)

    def unflatten(self, v):
        return self.op.unflatten(v)


@pytest.fixture(scope="module")
def cnn():
    case = cases.cnn_case()
    op = hessfast.CurvatureOperator(case.model, case.batch, loss_fn=case.loss_fn, dtype=torch.float64)
    return case, op, cases.dense_hessian(case).numpy()


def dense_blocks(model, H, groups):
    """{block: H_bb} from the dense H and {block: [parameter names]} (flattening order of named_parameters)."""
    offsets, start = {}, 0
    for name, p in model.named_parameters():
        offsets[name] = np.arange(start, start + p.numel())
        start += p.numel()
    out = {}
    for block, names in groups.items():
        idx = np.concatenate([offsets[n] for n in names])
        out[block] = H[np.ix_(idx, idx)]
    return out


def test_module_blocks_match_the_dense_diagonal_blocks(cnn):
    case, op, H = cnn
    counted = Counting(op)
    m = 300                                                   # more than any block: every extreme is exact
    res = hessfast.block_spectra(counted, m=m, blocks="module", seed=0)
    modules = {}
    for name, _ in case.model.named_parameters():
        modules.setdefault(name.rpartition(".")[0], []).append(name)
    assert res.groups == modules and list(res) == list(modules)
    truth = dense_blocks(case.model, H, modules)
    norm = np.abs(np.linalg.eigvalsh(H)).max()
    for block, Hbb in truth.items():
        ev = np.linalg.eigvalsh(Hbb)
        s = res[block]
        assert s.P == Hbb.shape[0]
        assert s.lambda_max == pytest.approx(ev.max(), abs=1e-10 * norm)
        assert s.lambda_min == pytest.approx(ev.min(), abs=1e-10 * norm)
    # every step of every block was one stacked product: products add up, calls are far fewer
    assert counted.products == res.meta["products"] <= sum(Hbb.shape[0] for Hbb in truth.values())
    assert counted.calls == res.meta["matmat_calls"] < counted.products / 2


def test_parameter_blocks_with_m_equal_to_the_block_size_are_exact(cnn):
    case, op, H = cnn
    groups = {n: [n] for n, _ in case.model.named_parameters()}
    truth = dense_blocks(case.model, H, groups)
    res = hessfast.block_spectra(op, m=max(b.shape[0] for b in truth.values()), blocks="parameter", seed=3)
    assert list(res) == list(groups)
    for name, Hbb in truth.items():
        ev = np.linalg.eigvalsh(Hbb)
        np.testing.assert_allclose([res[name].lambda_max, res[name].lambda_min], [ev.max(), ev.min()],
                                   rtol=0, atol=1e-10 * np.abs(ev).max())


def test_traces_of_blocks_are_unbiased_over_probes(cnn):
    # tr(H_bb) by SLQ with 24 Gaussian probes: within 4 standard errors of the dense trace
    case, op, H = cnn
    res = hessfast.block_spectra(op, m=6, blocks={"convs": ["0", "2"], "head": ["5"]}, num_probes=24, seed=1)
    assert res.groups == {"convs": ["0.weight", "0.bias", "2.weight", "2.bias"], "head": ["5.weight", "5.bias"]}
    truth = dense_blocks(case.model, H, res.groups)
    for block, Hbb in truth.items():
        est = res[block].trace()
        assert abs(est.estimate - np.trace(Hbb)) <= 4 * est.stderr, (block, est, np.trace(Hbb))
    rows = {r["block"]: r for r in res.rows()}
    assert rows["head"]["P"] == truth["head"].shape[0]
    assert "lambda_max" in res.table() and "head" in res.table()


def test_user_groups_take_parameter_and_module_names_and_a_group_spectrum_is_exact():
    case = cases.mlp_case()
    H = cases.dense_hessian(case).numpy()
    blocks = {"first": ["0"], "mixed": ["0.bias", "2.weight"]}
    res = hessfast.block_spectra(case.model, case.batch, m=80, blocks=blocks, loss_fn=case.loss_fn,
                                 dtype=torch.float64)
    assert res.groups == {"first": ["0.weight", "0.bias"], "mixed": ["0.bias", "2.weight"]}
    truth = dense_blocks(case.model, H, res.groups)
    for block, Hbb in truth.items():
        ev = np.linalg.eigvalsh(Hbb)
        assert res[block].lambda_max == pytest.approx(ev.max(), abs=1e-12)
        assert res[block].lambda_min == pytest.approx(ev.min(), abs=1e-12)


def test_the_model_is_untouched_and_the_ggn_blocks_are_positive(assert_model_unchanged):
    case = cases.mlp_case(seed=4)
    before = snapshot(case.model)
    res = hessfast.block_spectra(case.model, case.batch, m=10, curvature="ggn", loss_fn=case.loss_fn,
                                 dtype=torch.float64)
    assert_model_unchanged(case.model, before)
    assert res.meta["curvature"] == "ggn"
    assert all(s.lambda_min >= -1e-12 for s in res.values())


def test_save_load_and_plot(tmp_path, cnn):
    _, op, _ = cnn
    res = hessfast.block_spectra(op, m=6, num_probes=2, seed=0)
    res.save(tmp_path / "blocks.json")
    back = hessfast.BlockSpectra.load(tmp_path / "blocks.json")
    assert list(back) == list(res) and back.groups == res.groups
    for name in res:
        np.testing.assert_array_equal(back[name].ritz_values, res[name].ritz_values)
    assert json.loads((tmp_path / "blocks.json").read_text())["format"] == "hessfast.BlockSpectra/1"
    hessfast.plot_block_spectra(res, tmp_path / "blocks.png")
    assert (tmp_path / "blocks.png").stat().st_size > 1000
    with pytest.raises(TypeError, match="takes the BlockSpectra"):
        hessfast.plot_block_spectra({"a": res[next(iter(res))]}, tmp_path / "x.png")


@pytest.mark.parametrize("blocks, match", [
    ("layer", "blocks must be 'module', 'parameter' or a dict"),
    ({}, "empty dict"),
    ({"a": ["nope"]}, "'nope' is neither a trainable parameter nor a module"),
    ({"a": "0.weight"}, "must list parameter or module names as strings"),
    ({"a": []}, "must list parameter or module names"),
    ({"a": [0]}, "must list parameter or module names"),
])
def test_bad_block_specs_say_what_is_wrong(cnn, blocks, match):
    _, op, _ = cnn
    with pytest.raises(ValueError, match=match):
        hessfast.block_spectra(op, m=4, blocks=blocks)


def test_an_operator_without_names_is_refused():
    class Plain:
        P, dtype, device = 5, torch.float64, torch.device("cpu")

        def matmat(self, V):
            return V

    with pytest.raises(ValueError, match="gives no parameter names"):
        hessfast.block_spectra(Plain(), m=3)
    with pytest.raises(ValueError, match="m must be a positive int"):
        hessfast.block_spectra(Plain(), m=0)


def test_the_bases_are_planned_before_allocating(monkeypatch, cnn):
    from hessfast.utils import memory

    _, op, _ = cnn
    monkeypatch.setattr(memory, "available_memory", lambda device: 10 * op.P * 8)   # room for about 9 rows
    with pytest.raises(hessfast.BasisMemoryError):
        hessfast.block_spectra(op, m=20, blocks="module")
    with pytest.raises(hessfast.BasisMemoryError):
        hessfast.eigenpairs(op, k=3, max_subspace=20)
