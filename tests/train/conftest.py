"""Fixtures of the training-app tests."""
import pytest
import torch


@pytest.fixture
def one_thread():
    """One intra-op thread: on a small shared CPU, two threads contend and run many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
