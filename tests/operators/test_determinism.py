"""hvp_mode="auto" is a rule, not a race: the same call with the same seed gives the same bits."""
import itertools
import time

import numpy as np
import pytest

import hessfast

import cases


@pytest.fixture
def erratic_clock(monkeypatch):
    """A wall clock that jumps by 0, 1 ms or 10 s per call: any decision taken by timing would flip."""
    steps = itertools.cycle([0.0, 10.0, 1e-3, 10.0, 0.0, 1e-3])
    now = [0.0]

    def clock():
        now[0] += next(steps)
        return now[0]

    monkeypatch.setattr(time, "perf_counter", clock)


@pytest.mark.parametrize("name,curvature", [("cnn", "hessian"), ("mlp", "ggn")])
def test_lanczos_auto_twice_gives_identical_bits(erratic_clock, name, curvature):
    case = cases.ALL[name]()
    split = [10, len(case.y) - 10]
    runs = [hessfast.lanczos(case.model, case.loader(split), m=10, num_probes=2, curvature=curvature, seed=5,
                             hvp_mode="auto", cache_graph="auto", progress=False) for _ in range(2)]
    a, b = runs
    np.testing.assert_array_equal(a.ritz_values, b.ritz_values)
    np.testing.assert_array_equal(a.weights, b.weights)
    assert a.meta["hvp_mode"] == b.meta["hvp_mode"] == "reverse"
    assert a.meta["cached_graph"] is b.meta["cached_graph"] is True


def test_lanczos_auto_without_cache_is_reverse_and_reproducible(erratic_clock):
    case = cases.mlp_case()
    a, b = (hessfast.lanczos(case.model, case.batch, m=12, seed=1, cache_graph=False, progress=False)
            for _ in range(2))
    np.testing.assert_array_equal(a.ritz_values, b.ritz_values)
    assert a.meta["hvp_mode"] == "reverse" and a.meta["cached_graph"] is False


@pytest.mark.parametrize("route", ["ghost", "vmap"])
def test_hessian_variance_twice_gives_identical_bits(erratic_clock, route):
    case = cases.cnn_case(n=12)
    a, b = (hessfast.hessian_variance(case.model, case.loader([5, 7]), num_probes=2, seed=2, route=route,
                                      progress=False) for _ in range(2))
    for key in a.per_probe:
        np.testing.assert_array_equal(a.per_probe[key], b.per_probe[key])
    assert a.meta["route"] == route and a.sigma2 == b.sigma2
