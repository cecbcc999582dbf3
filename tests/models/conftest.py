"""Tiny transformer models run fastest on one thread; with several, thread contention on a busy
2-core machine made a 10 ms product take 0.5 s. The setting is restored after each module."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
