"""Shared test fixtures: markers, seeds, the location of ../shared/data, and the fused-kernel fixtures (the
Triton modules natively on CUDA, interpreted on the CPU)."""
import importlib
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


@pytest.fixture(scope="module")
def fused_module():
    """qat.quant.triton_fake_quant: native kernels on CUDA, interpreted on the CPU (tests/conftest.py sets
    TRITON_INTERPRET=1 before triton is imported when there is no GPU)."""
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA and TRITON_INTERPRET is not 1")
    return importlib.import_module("qat.quant.triton_fake_quant")


@pytest.fixture
def triton_on_cpu(monkeypatch, fused_module):
    """Route CPU tensors through the fused kernels too (interpreted), so model-level tests run everywhere."""
    from qat.quant import affine  # after TRITON_INTERPRET is set above

    if not torch.cuda.is_available():
        monkeypatch.setattr(affine, "_kernel_input", lambda x: True)
