"""Shared helpers of the kernel tests: backend parametrization, random int8 data, agreement checks."""
from __future__ import annotations

import os

import pytest
import torch

from qat.kernels import BACKENDS, get_backend
from qat.kernels.fbgemm import saturation_free
from qat.kernels.types import ActQParams, Int8Weight

# TRITON_INTERPRET=1 runs the cuda backend's Triton kernels on CPU tensors: its tests then need no GPU.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CUDA_MARKS = [] if INTERPRET and not torch.cuda.is_available() else [pytest.mark.gpu]
BACKEND_PARAMS = [pytest.param(name, marks=CUDA_MARKS if name == "cuda" else [], id=name) for name in BACKENDS]
DEVICES = {"cuda": "cuda" if torch.cuda.is_available() else "cpu"}  # every other backend runs on the CPU


def device_of(backend_name: str) -> str:
    return DEVICES.get(backend_name, "cpu")


def activation_qmax(backend_name: str) -> int:
    """Full-range uint8 unless fbgemm runs on a CPU without VNNI (int16 pair saturation): then [0, 127]."""
    return 127 if backend_name == "fbgemm" and not saturation_free() else 255


def random_activation(shape, qp: ActQParams, device: str = "cpu") -> torch.Tensor:
    return torch.randint(qp.qmin, qp.qmax + 1, shape, dtype=torch.int16).to(qp.dtype).to(device)


def activation_qparams(signed: bool, qmax: int = 255, scale: float = 0.02) -> ActQParams:
    """Random-ish zero point inside the range; int8 when ``signed``."""
    if signed:
        return ActQParams(scale=scale, zero_point=int(torch.randint(-20, 20, ())), qmin=-128, qmax=127)
    return ActQParams(scale=scale, zero_point=int(torch.randint(0, min(qmax, 160), ())), qmin=0, qmax=qmax)


def random_weight(shape, per_channel: bool = True, channel_axis: int = 0, channels: int | None = None) -> Int8Weight:
    channels = shape[channel_axis] if channels is None else channels
    q = torch.randint(-128, 128, shape, dtype=torch.int8)
    scale = torch.rand(channels) * 0.01 + 0.001 if per_channel else torch.full((channels,), 0.004)
    return Int8Weight(q=q, scale=scale)


def fitted_qparams(y: torch.Tensor, signed: bool = False) -> ActQParams:
    """Output qparams that cover ``y`` (asymmetric, min <= 0 <= max), as an observer would pick them."""
    lo, hi = min(float(y.min()), 0.0), max(float(y.max()), 1e-3)
    qmin, qmax = (-128, 127) if signed else (0, 255)
    scale = (hi - lo) / (qmax - qmin)
    zero_point = int(max(qmin, min(qmax, qmin - round(lo / scale))))
    return ActQParams(scale=scale, zero_point=zero_point, qmin=qmin, qmax=qmax)


def assert_quantized_agree(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Within 1 LSB everywhere and bit-exact on >= 99.9% of elements (at least one mismatch tolerated)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    diff = (actual.cpu().int() - expected.cpu().int()).abs()
    mismatches = int((diff > 0).sum())
    assert int(diff.max()) <= 1, f"max diff {int(diff.max())} LSB"
    assert mismatches <= max(1, diff.numel() // 1000), f"{mismatches}/{diff.numel()} elements off by 1 LSB"


def assert_float_agree(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    torch.testing.assert_close(actual.cpu(), expected.cpu(), rtol=1e-4, atol=1e-4 * float(expected.abs().max()) + 1e-6)


class OnBackend:
    """A backend with its device: ``act`` moves a plain activation in, ``back`` brings a result out (to CPU)."""

    def __init__(self, name: str) -> None:
        self.backend = get_backend(name)
        self.device = device_of(name)

    def act(self, q: torch.Tensor, qp: ActQParams) -> torch.Tensor:
        return self.backend.to_backend(q.to(self.device), qp)

    def back(self, t: torch.Tensor, qp: ActQParams | None) -> torch.Tensor:
        return (t if qp is None else self.backend.from_backend(t, qp)).cpu()
