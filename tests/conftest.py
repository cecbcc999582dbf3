"""Shared test configuration.

TRITON_INTERPRET must be set before triton is first imported so that Triton kernels run on CPU tensors.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
