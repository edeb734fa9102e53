"""Fixtures of the fused-kernel tests: the Triton modules natively on CUDA, interpreted on the CPU."""
import importlib
import os

import pytest
import torch

from qat.quant import affine, learnable, observers

ON_CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def fused_module():
    """qat.quant.triton_fake_quant: native kernels on CUDA, interpreted on the CPU (tests/conftest.py sets
    TRITON_INTERPRET=1 before triton is imported when there is no GPU)."""
    if not ON_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA and TRITON_INTERPRET is not 1")
    return importlib.import_module("qat.quant.triton_fake_quant")


@pytest.fixture
def triton_on_cpu(monkeypatch, fused_module):
    """Route CPU tensors through the fused kernels too (interpreted), so model-level tests run everywhere."""
    if not ON_CUDA:
        def applies(x, spec):
            return affine._use_triton and spec.granularity.value in ("per_tensor", "per_channel")

        monkeypatch.setattr(affine, "triton_applies", applies)
        monkeypatch.setattr(learnable, "triton_applies", applies)
        monkeypatch.setattr(observers, "triton_applies", applies)
