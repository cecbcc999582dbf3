"""Probes drawn entry range by entry range equal the slices of the full draw (the FSDP ranks' probes)."""
import pytest
import torch

from hessfast.engine import probe_vectors


@pytest.mark.parametrize("chunk", [16, 64, 1 << 20])
def test_ranges_give_the_slices_of_the_full_draw(chunk):
    P = 1003                       # prime: ranges and pieces end at awkward places
    full = probe_vectors(3, P, 7, torch.float64, torch.device("cpu"))
    ranges = [(0, 5), (5, 5), (17, 300), (301, 302), (640, 1003)]   # adjacent, empty, crossing pieces, the end
    local = probe_vectors(3, P, 7, torch.float64, torch.device("cpu"), ranges=ranges, chunk=chunk)
    want = torch.cat([full[:, a:b] for a, b in ranges], 1)
    assert local.shape == want.shape == (3, 5 + 283 + 1 + 363)
    assert torch.equal(local, want)     # bit for bit: the same float64 stream, kept in pieces
    one = probe_vectors(1, P, 7, torch.float32, torch.device("cpu"))
    assert torch.equal(probe_vectors(1, P, 7, torch.float32, torch.device("cpu"), ranges=[(0, P)], chunk=chunk), one)


def test_bad_ranges_and_chunks_are_refused():
    with pytest.raises(ValueError, match="sorted, disjoint"):
        probe_vectors(1, 10, 0, torch.float64, torch.device("cpu"), ranges=[(5, 8), (2, 3)])
    with pytest.raises(ValueError, match="sorted, disjoint"):
        probe_vectors(1, 10, 0, torch.float64, torch.device("cpu"), ranges=[(5, 11)])
    with pytest.raises(ValueError, match="multiple of 16"):
        probe_vectors(1, 10, 0, torch.float64, torch.device("cpu"), ranges=[(0, 3)], chunk=24)
