"""Tests work on small tensors: one intra-op thread is fastest, and keeps them fast on a loaded machine, where
OpenMP threads waiting on each other at every reduction made the format tests ~100x slower."""
import os

import pytest
import torch

# Kernel choices follow fixed rules in tests (no timing: deterministic and fast); tests of the speed guard turn
# timing on themselves, with a fake clock and a temporary cache.
os.environ.setdefault("MODELPRESS_TUNE", "0")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
