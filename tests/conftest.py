"""Shared test setup."""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    # The CPU is shared (2 cores, often a training run beside the tests): OpenMP threads spinning against each
    # other made model tests up to 10x slower than one thread each.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
