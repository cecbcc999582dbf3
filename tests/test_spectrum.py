"""Spectrum: quadrature statistics, degeneracy (Section 7.2), bulk edge (Section 8.1), JSON I/O, plots."""
import json

import numpy as np
import pytest

import hessfast
from hessfast.engine import lanczos_decomposition

import torch


def _dense_spectrum(evals, m, probes=2, seed=0):
    """Spectrum of diag(evals) in a random basis, by our Lanczos, plus the matrix."""
    g = torch.Generator().manual_seed(seed)
    P = len(evals)
    Q, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=torch.float64))
    A = Q @ torch.diag(torch.as_tensor(evals, dtype=torch.float64)) @ Q.T
    ritz = np.full((probes, m), np.nan)
    w = np.zeros((probes, m))
    for p in range(probes):
        res = lanczos_decomposition(lambda v: A @ v, torch.randn(P, generator=g, dtype=torch.float64), m)
        t, ww = res.ritz()
        ritz[p, : len(t)], w[p, : len(t)] = t, ww
    return hessfast.Spectrum(ritz, w, {"P": P, "curvature": "hessian", "N": 10}), A


def test_density_integrates_to_one_and_moments_match_trace():
    evals = np.concatenate([[40.0, 25.0], np.random.default_rng(0).normal(0, 1, 398)])
    spec, A = _dense_spectrum(evals, 60, probes=4)
    grid = np.linspace(-10, 50, 20001)
    dens = spec.density(grid, sigma=0.3)
    assert abs(np.trapezoid(dens, grid) - 1) < 1e-6
    mu = spec.moments(3)
    assert mu[0] == pytest.approx(1.0)
    # Hutchinson: E[v^T A v / v^T v] = tr(A)/P; with 4 probes the error is O(||A||_F / P / 2)
    for k in (1, 2):
        exact = np.sum(evals ** k) / len(evals)
        spread = np.sqrt(2 * np.sum(evals ** (2 * k))) / len(evals) / 2
        assert abs(mu[k] - exact) < 4 * spread


def test_extremes_top_and_bulk_edge():
    rng = np.random.default_rng(1)
    bulk = rng.uniform(-1, 1, 1997)
    evals = np.concatenate([[30.0, 20.0, 10.0], bulk])
    spec, _ = _dense_spectrum(evals, 40, probes=3)
    assert spec.lambda_max == pytest.approx(30.0, rel=1e-10)
    np.testing.assert_allclose(spec.top(3), [30.0, 20.0, 10.0], rtol=1e-8)
    # an outlier's weight is chi2(1)/P; P(chi2(1) > 10) = 0.0016, so threshold 10 excludes all three
    lo, hi = spec.bulk_edge(threshold=10)
    assert -1.05 < lo < -0.9 and 0.9 < hi < 1.05
    # the paper's rule on known weights: walk out from the heaviest value while weight >= 1/P
    known = hessfast.Spectrum([[-3.0, -1.0, 0.0, 1.0, 5.0]], [[0.001, 0.2, 0.5, 0.29, 0.009]], {"P": 100})
    assert known.bulk_edge() == (-1.0, 1.0)


def test_degeneracy_hessian_combines_two_nearest_zero_ggn_takes_one():
    ritz = np.array([[-0.5, -1e-4, 2e-4, 3.0]])
    w = np.array([[0.1, 0.3, 0.5, 0.1]])
    spec = hessfast.Spectrum(ritz, w, {"curvature": "hessian"})
    d = spec.degeneracy()
    assert d.mass == pytest.approx(0.8)
    assert d.value == pytest.approx((0.3 * -1e-4 + 0.5 * 2e-4) / 0.8)
    g = spec.degeneracy("ggn")
    assert g.mass == pytest.approx(0.3) and g.value == pytest.approx(-1e-4)


def test_degeneracy_of_a_low_rank_matrix_is_its_null_fraction():
    evals = np.concatenate([np.linspace(1, 5, 30), np.zeros(270)])
    spec, _ = _dense_spectrum(evals, 31, probes=8)
    # the null space is one eigenvalue of multiplicity 270: Lanczos finds it once, with weight ~0.9
    assert spec.degeneracy("ggn").mass == pytest.approx(0.9, abs=0.06)
    assert abs(spec.degeneracy("ggn").value) < 1e-10


def test_save_load_roundtrip_is_exact_and_json(tmp_path):
    ritz = np.array([[1.0, 2.0, np.nan], [0.5, 3.0, 4.0]])
    w = np.array([[0.4, 0.6, 0.0], [0.2, 0.3, 0.5]])
    spec = hessfast.Spectrum(ritz, w, {"P": 3, "N": 7, "curvature": "ggn", "seed": 3})
    path = tmp_path / "spec.json"
    spec.save(path)
    raw = json.loads(path.read_text())
    assert raw["format"].startswith("hessfast.Spectrum") and raw["ritz_values"][0][2] is None
    back = hessfast.Spectrum.load(path)
    np.testing.assert_array_equal(back.ritz_values, ritz)
    np.testing.assert_array_equal(back.weights, w)
    assert back.meta == spec.meta
    assert back.lambda_max == 4.0 and back.lambda_min == 0.5
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps({"format": "x"}))
    with pytest.raises(ValueError, match="not a hessfast spectrum"):
        hessfast.Spectrum.load(bad)


def test_plot_writes_png_and_repr_summarises(tmp_path):
    evals = np.concatenate([[12.0], np.random.default_rng(2).normal(0, 1, 99)])
    spec, _ = _dense_spectrum(evals, 30)
    spec.meta.update({"elapsed": 0.1, "dtype": "float64", "m": 30})
    out = tmp_path / "s.png"
    spec.plot(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = repr(spec)
    assert "lambda_max = 12" in text and "P = 100" in text and "degeneracy" in text


def test_bad_arguments():
    spec = hessfast.Spectrum([[1.0, 2.0]], [[0.5, 0.5]])
    with pytest.raises(ValueError, match="same shape"):
        hessfast.Spectrum([[1.0, 2.0]], [[1.0]])
    with pytest.raises(ValueError, match="sigma"):
        spec.density([0.0], sigma=0)
    with pytest.raises(ValueError, match="P"):
        spec.bulk_edge()
    with pytest.raises(ValueError, match="k must be"):
        spec.top(0)
