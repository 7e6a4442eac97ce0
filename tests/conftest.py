"""Tests work on small tensors: one intra-op thread is fastest, and keeps them fast on a loaded machine, where
OpenMP threads waiting on each other at every reduction made the format tests ~100x slower."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
