"""Streamed squared-HVP accumulation: every backend within twice the reference's error, chunked and merged.

The truth is the chunk's sums in longdouble on the same inputs (see tests/truth.py); each
backend's sum_u, sum_sq and sum_vu may be at most twice as far from it as the same-precision
reference's (SQHVP_IMPLS["torch"]), plus the floor of ``assert_near_truth``.
"""
import numpy as np
import pytest
import torch

from hessfast.kernels import SquaredHVPAccumulator
from hessfast.kernels.sqhvp import SQHVP_IMPLS
from truth import assert_near_truth, ld, rel


def sqhvp_truth(U, V, s0):
    """(sum_u, sum_sq, sum_vu) after one chunk from the state (s0, 0, 0), in longdouble, and the
    scale of sum_vu: sum_i |v_r| |u_{i,r}| (its terms, not its possibly cancelled value)."""
    u, v = ld(U), ld(V)
    sum_u = ld(s0) + u.sum(0)
    sum_sq = (u * u).sum((0, 2))
    sum_vu = (u * v[None]).sum((0, 2))
    scale = np.sqrt((v * v).sum(1)) * np.sqrt((u * u).sum(2)).sum(0)
    return (sum_u, sum_sq, sum_vu), float(np.sqrt((scale * scale).sum()))


def _run(backend, U, V, s0):
    sums = (s0.clone(), torch.zeros(U.shape[1], dtype=torch.float64, device=U.device),
            torch.zeros(U.shape[1], dtype=torch.float64, device=U.device))
    SQHVP_IMPLS[backend](U, V, *sums)
    assert sums[0].dtype == U.dtype and torch.isfinite(sums[0]).all()
    return sums


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("c,b,P", [(1, 1, 37), (7, 3, 1001), (4, 8, 4099), (2, 13, 257), (5, 2, 50)])
def test_sqhvp_within_twice_the_reference_error(backend, dtype, c, b, P, backend_device):
    dev = backend_device
    U = torch.randn(c, b, P, dtype=dtype, device=dev)
    V = torch.randn(b, P, dtype=dtype, device=dev)
    s0 = torch.randn(b, P, dtype=dtype, device=dev)      # nonzero starting state
    truth, vu_scale = sqhvp_truth(U, V, s0)
    got, ref = _run(backend, U, V, s0), _run("torch", U, V, s0)
    for name, g, r, t, scale in zip(("sum_u", "sum_sq", "sum_vu"), got, ref, truth, (None, None, vu_scale)):
        assert_near_truth(f"{backend} sqhvp {name}", rel(g, t, scale), rel(r, t, scale), dtype)


def test_accumulator_chunks_and_merge(backend, backend_device):
    dev = backend_device
    b, P = 2, 300
    U = torch.randn(10, b, P, dtype=torch.float64, device=dev)
    V = torch.randn(b, P, dtype=torch.float64, device=dev)
    a = SquaredHVPAccumulator(b, P, torch.float64, dev, backend=backend).update(U[:3], V).update(U[3:7], V)
    other = SquaredHVPAccumulator(b, P, torch.float64, dev, backend=backend).update(U[7:], V)
    a.merge(other)
    whole = SquaredHVPAccumulator(b, P, torch.float64, dev, backend="torch").update(U, V)
    assert a.count == 10
    assert rel(a.sum_sq, whole.sum_sq) < 1e-13 and rel(a.sum_vu, whole.sum_vu) < 1e-13
    assert rel(a.sum_u, whole.sum_u) < 1e-13
    var = (U.double() ** 2).sum(-1).mean(0) - (U.double().mean(0) ** 2).sum(-1)
    assert rel(a.variance(), var) < 1e-12


def test_accumulator_errors():
    a = SquaredHVPAccumulator(2, 10, torch.float64)
    with pytest.raises(ValueError, match=r"U must have shape \(c, 2, 10\)"):
        a.update(torch.randn(3, 2, 11, dtype=torch.float64), torch.randn(2, 10, dtype=torch.float64))
    with pytest.raises(TypeError, match="V must have dtype torch.float64"):
        a.update(torch.randn(3, 2, 10, dtype=torch.float64), torch.randn(2, 10))
