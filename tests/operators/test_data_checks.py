"""Data that changes between passes is refused: a shuffled loader, random augmentation, a changing batch count."""
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

import hessfast

import cases


class Augmented(Dataset):
    """A data set whose samples get fresh random noise every time they are read (random augmentation)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i] + 0.01 * torch.randn_like(self.x[i]), self.y[i]


class Shrinking:
    """An iterable whose second pass yields one batch fewer."""

    def __init__(self, batches):
        self.batches, self.passes = batches, 0

    def __iter__(self):
        self.passes += 1
        return iter(self.batches if self.passes == 1 else self.batches[:-1])


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("mode", ["reverse", "forward", "fd"])
def test_a_shuffled_loader_without_a_cached_graph_is_refused(mode):
    case = cases.mlp_case(n=40)
    loader = DataLoader(TensorDataset(case.x, case.y), batch_size=8, shuffle=True)
    op = hessfast.HessianOperator(case.model, loader, hvp_mode=mode, cache_graph=False)
    v = torch.randn(op.P, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"batch \d+ of the data changed between passes") as info:
        for _ in range(3):   # a reshuffle could, very rarely, put the first batch back in place: try a few passes
            op @ v
    assert "shuffle=False" in str(info.value)


def test_random_augmentation_is_refused_and_a_cached_graph_reads_the_data_once():
    case = cases.mlp_case(n=24)
    loader = DataLoader(Augmented(case.x, case.y), batch_size=8)
    op = hessfast.HessianOperator(case.model, loader, cache_graph=False)
    with pytest.raises(ValueError, match="changed between passes"):
        op @ torch.randn(op.P, dtype=torch.float64)
    with pytest.raises(ValueError, match="changed between passes"):
        hessfast.lanczos(case.model, loader, m=5, cache_graph=False, progress=False)
    # cached: one pass builds every graph, so there is nothing to compare and nothing changes
    shuffled = DataLoader(TensorDataset(case.x, case.y), batch_size=8, shuffle=True)
    cached = hessfast.HessianOperator(case.model, shuffled, cache_graph=True)
    assert cached.cached
    V = torch.randn(2, cached.P, dtype=torch.float64)
    assert rel(cached.matmat(V), V @ cases.dense_hessian(case)) < 1e-10


def test_a_different_number_of_batches_is_refused():
    case = cases.mlp_case(n=24)
    op = hessfast.HessianOperator(case.model, Shrinking(case.loader([8, 8, 8])), cache_graph=False)
    with pytest.raises(ValueError, match="2 batches .* 3 on the first pass"):
        op @ torch.randn(op.P, dtype=torch.float64)


def test_deterministic_loaders_pass_every_time():
    case = cases.mlp_case(n=40)
    truth = cases.dense_hessian(case)
    loader = DataLoader(TensorDataset(case.x, case.y), batch_size=16)
    op = hessfast.HessianOperator(case.model, loader, cache_graph=False)
    V = torch.randn(3, op.P, dtype=torch.float64)
    for _ in range(3):
        assert rel(op.matmat(V), V @ truth) < 1e-10
    spec = hessfast.lanczos(case.model, loader, m=10, cache_graph=False, seed=0, progress=False)
    assert spec.meta["cached_graph"] is False
