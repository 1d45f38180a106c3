"""Helpers shared by the evaluation tests: a tiny linear model and a one-thread fixture."""
import pytest
import torch
from torch import nn


def linear(seed: int = 0) -> nn.Module:
    """A linear classifier ``[B, 1, 8, 8] -> [B, 10]`` in eval mode."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread (OpenMP barriers on a loaded 2-core machine cost ~100x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
