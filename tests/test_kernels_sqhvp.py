"""Streamed squared-HVP accumulation against its reference, chunked and merged."""
import pytest
import torch

from hessfast.kernels import SquaredHVPAccumulator
from hessfast.kernels.reference import sqhvp_reference
from hessfast.kernels.sqhvp import SQHVP_IMPLS
from test_kernels import BACKENDS, TOL, _device, rel


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("c,b,P", [(1, 1, 37), (7, 3, 1001), (4, 8, 4099)])
def test_sqhvp_matches_reference(backend, dtype, c, b, P):
    dev = _device(backend)
    U = torch.randn(c, b, P, dtype=dtype, device=dev)
    V = torch.randn(b, P, dtype=dtype, device=dev)
    s0 = torch.randn(b, P, dtype=dtype, device=dev)      # nonzero starting state
    sq_ref, su_ref, vu_ref = sqhvp_reference(U.double(), V.double())
    sum_u, sum_sq, sum_vu = s0.clone(), torch.zeros(b, dtype=torch.float64, device=dev), torch.zeros(
        b, dtype=torch.float64, device=dev)
    SQHVP_IMPLS[backend](U, V, sum_u, sum_sq, sum_vu)
    assert rel(sum_u, su_ref + s0.double()) <= TOL[dtype]
    assert rel(sum_sq, sq_ref) <= TOL[dtype]
    assert rel(sum_vu, vu_ref) <= TOL[dtype] * 10   # v.u sums cancel; scale by the sum of |v||u|


@pytest.mark.parametrize("backend", BACKENDS)
def test_accumulator_chunks_and_merge(backend):
    dev = _device(backend)
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
