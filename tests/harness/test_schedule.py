"""The learning-rate schedule of equation 21 at and around its break points."""
import pytest

from hessfast.harness.schedule import eq21, lr_at


@pytest.mark.parametrize("frac,expected", [
    (0.0, 1.0), (0.25, 1.0), (0.5, 1.0),      # flat up to t/T = 0.5 (inclusive)
    (0.7, 1.0 - 0.99 * 0.5),                  # half-way through the linear decay
    (0.9, 0.01),                              # reaches r at t/T = 0.9
    (0.95, 0.01), (1.0, 0.01),                # flat at r afterwards
])
def test_eq21_break_points(frac, expected):
    assert eq21(frac * 200, 200, 1.0, r=0.01) == pytest.approx(expected, rel=1e-12)


def test_eq21_is_continuous_and_scales_with_lr0():
    T, lr0, r = 10.0, 0.05, 0.1
    eps = 1e-9
    for b in (0.5, 0.9):
        assert eq21(b * T - eps, T, lr0, r) == pytest.approx(eq21(b * T + eps, T, lr0, r), abs=1e-8)
    assert eq21(6.0, T, lr0, r) == pytest.approx(lr0 * (1 - 0.9 * 0.25))
    assert lr_at("constant", 9.0, T, lr0) == lr0


def test_eq21_rejects_bad_arguments():
    with pytest.raises(ValueError, match="T must be positive"):
        eq21(1, 0, 0.1)
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_at("cosine", 1, 10, 0.1)
