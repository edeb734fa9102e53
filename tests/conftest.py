"""Shared test fixtures: markers, seeds and the location of ../shared/data."""
import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(os.environ.get("QAT_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
os.environ.setdefault("QAT_DATA_ROOT", str(SHARED_DATA))  # the app (train.py runs in subprocesses) reads the same data
if not torch.cuda.is_available():
    # No GPU: Triton kernels run in Triton's interpreter on CPU tensors. Set before anything imports triton
    # (torch.fx does), since triton reads it when kernels and its own library functions are defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests check numerics, not speed: one Triton tile per kernel (every tile is forced in test_kernels_triton_tiles).
os.environ.setdefault("QAT_TRITON_AUTOTUNE", "0")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (set QAT_SHARED_DATA)")
    return SHARED_DATA
