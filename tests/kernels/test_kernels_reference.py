"""The reference backend against hand-computed numbers and an independent float64 evaluation of the formula;
the backend table, the dataclasses' validation."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from kernel_cases import activation_qparams, assert_quantized_agree, fitted_qparams, random_activation, random_weight

from qat.kernels import BACKENDS, default_backend, get_backend
from qat.kernels.reference import ReferenceBackend, dequantize_activation, quantize_activation, requantize
from qat.kernels.types import ActQParams, ConvGeometry, Int8Weight

REF = ReferenceBackend()


@pytest.mark.parametrize("qp", [ActQParams(0.1, 128, 0, 255), ActQParams(0.0371, 3, 0, 127),
                                ActQParams(0.013, -7, -128, 127), ActQParams(1 / 3, 0, -127, 127)])
def test_quantize_matches_fake_quantize_bit_for_bit(qp):
    x = torch.randn(100_000) * 4
    x[:5] = torch.tensor([0.5, 1.5, -0.5, 2.5, -2.5]) * qp.scale  # ties: half to even
    q = quantize_activation(x, qp)
    assert q.dtype == qp.dtype
    fake = torch.fake_quantize_per_tensor_affine(x, qp.scale, qp.zero_point, qp.qmin, qp.qmax)
    assert torch.equal(dequantize_activation(q, qp), fake)


def test_hand_computed_conv_and_requantization():
    x_qp = ActQParams(scale=0.5, zero_point=1, qmin=0, qmax=255)
    x = torch.tensor([[[[1, 2], [3, 4]]]], dtype=torch.uint8)  # x - z = [[0, 1], [2, 3]]
    weight = Int8Weight(q=torch.tensor([[[[1, -1], [2, 0]]]], dtype=torch.int8), scale=torch.tensor([0.25]))
    packed = REF.pack_conv2d(weight, torch.tensor([0.1]), ConvGeometry())
    # acc = 0*1 + 1*(-1) + 2*2 + 3*0 = 3;  y = 3 * (0.5 * 0.25) + 0.1 = 0.475
    y = REF.conv2d(x, x_qp, packed)
    assert y.shape == (1, 1, 1, 1) and abs(float(y) - 0.475) < 1e-7
    out_qp = ActQParams(scale=0.1, zero_point=2, qmin=0, qmax=255)
    assert int(REF.conv2d(x, x_qp, packed, out_qp)) == 7  # round(4.75) + 2
    assert int(REF.conv2d(x, x_qp, packed, ActQParams(scale=0.1, zero_point=2, qmin=0, qmax=5))) == 5


def test_hand_computed_elementwise_and_matmul():
    a_qp, b_qp = ActQParams(0.5, 10, 0, 255), ActQParams(0.25, -4, -128, 127)
    a = torch.tensor([[12, 6]], dtype=torch.uint8)  # [1.0, -2.0]
    b = torch.tensor([[0], [4]], dtype=torch.int8)  # [1.0, 2.0]
    out_qp = ActQParams(0.5, 0, -128, 127)
    assert REF.add(a, a_qp, b.T, b_qp, out_qp).tolist() == [[4, 0]]  # [2.0, 0.0]
    assert REF.add(a, a_qp, b.T, b_qp, ActQParams(0.5, 3, 0, 255), relu=True).tolist() == [[7, 3]]
    assert REF.mul(a, a_qp, b.T, b_qp, out_qp).tolist() == [[2, -8]]  # [1.0, -4.0]
    assert REF.matmul(a, a_qp, b, b_qp).tolist() == [[-3.0]]  # 1*1 + (-2)*2
    assert REF.cat([a, b.T], [a_qp, b_qp], 1, out_qp).tolist() == [[2, -4, 2, 4]]


def _float64_requant(y64, qp, relu=False):
    low = qp.relu_floor if relu else qp.qmin
    return (torch.round(y64 / qp.scale) + qp.zero_point).clamp(low, qp.qmax).to(qp.dtype)


@pytest.mark.parametrize("relu", [False, True])
def test_reference_linear_and_conv_equal_float64_formula(relu):
    x_qp = activation_qparams(False)
    x = random_activation((3, 40, 9, 9), x_qp)
    weight, bias = random_weight((24, 40, 3, 3)), torch.randn(24)
    x64 = (x.double() - x_qp.zero_point) * x_qp.scale
    w64 = weight.q.double() * weight.scale.double().view(-1, 1, 1, 1)
    y64 = F.conv2d(x64, w64, bias.double(), padding=1)
    packed = REF.pack_conv2d(weight, bias, ConvGeometry(padding=1))
    torch.testing.assert_close(REF.conv2d(x, x_qp, packed).double(), y64, rtol=1e-6, atol=1e-6)
    out_qp = fitted_qparams(y64.float())
    assert_quantized_agree(REF.conv2d(x, x_qp, packed, out_qp, relu), _float64_requant(y64, out_qp, relu))

    rows = x.permute(0, 2, 3, 1).reshape(-1, 40)  # [243, 40]
    lin_w = Int8Weight(q=weight.q[:, :, 0, 0].contiguous(), scale=weight.scale)
    y64 = ((rows.double() - x_qp.zero_point) * x_qp.scale) @ (lin_w.q.double() * lin_w.scale.double()[:, None]).T
    y64 = y64 + bias.double()
    got = REF.linear(rows, x_qp, REF.pack_linear(lin_w, bias), out_qp, relu)
    assert_quantized_agree(got, _float64_requant(y64, out_qp, relu))


def test_requantize_relu_floor_and_rounding():
    qp = ActQParams(scale=1.0, zero_point=3, qmin=0, qmax=10)
    y = torch.tensor([-5.0, -0.5, 0.5, 1.5, 2.5, 100.0])
    assert requantize(y, qp).tolist() == [0, 3, 3, 5, 5, 10]
    assert requantize(y, qp, relu=True).tolist() == [3, 3, 3, 5, 5, 10]


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError) as info:
        get_backend("tensorrt")
    message = str(info.value)
    assert "tensorrt" in message and all(name in message for name in BACKENDS)


def test_default_backend_by_device():
    assert default_backend("cpu") == "fbgemm"
    assert default_backend(torch.device("cuda", 0)) == "cuda"
    assert set(BACKENDS) == {"reference", "fbgemm", "cuda"}


@pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="checks the error raised without CUDA (and without the Triton interpreter)")
def test_cuda_backend_without_cuda_raises_clearly():
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        get_backend("cuda")


@pytest.mark.parametrize("kwargs", [dict(scale=0.0, zero_point=0, qmin=0, qmax=255),
                                    dict(scale=0.1, zero_point=300, qmin=0, qmax=255),
                                    dict(scale=0.1, zero_point=0, qmin=0, qmax=256),
                                    dict(scale=0.1, zero_point=0, qmin=-129, qmax=127),
                                    dict(scale=0.1, zero_point=5, qmin=5, qmax=5)])
def test_act_qparams_rejects_invalid(kwargs):
    with pytest.raises(ValueError):
        ActQParams(**kwargs)


def test_act_qparams_derived_values():
    qp = ActQParams(scale=0.1, zero_point=-3, qmin=-127, qmax=127)
    assert qp.dtype == torch.int8 and not qp.full_range and qp.relu_floor == -3
    assert qp.scale == float(torch.tensor(0.1, dtype=torch.float32))
    assert qp.inv_scale == float(1.0 / torch.tensor(0.1, dtype=torch.float32))
    assert ActQParams(0.1, 0, 0, 255).full_range


def test_geometry_and_weight_validation():
    assert ConvGeometry(stride=2, padding=(1, 0), dilation=1, groups=2).padding == (1, 0)
    with pytest.raises(ValueError):
        ConvGeometry(stride=0)
    with pytest.raises(ValueError):
        ConvGeometry(padding=(1, 2, 3))
    with pytest.raises(ValueError):
        Int8Weight(q=torch.zeros(4, 3), scale=torch.ones(4))
    with pytest.raises(ValueError):
        Int8Weight(q=torch.zeros(4, 3, dtype=torch.int8), scale=torch.ones(4, dtype=torch.float64))
    weight = Int8Weight(q=torch.zeros(4, 3, dtype=torch.int8), scale=torch.ones(4))
    with pytest.raises(ValueError, match="bias"):
        REF.pack_linear(weight, torch.zeros(5))
    with pytest.raises(ValueError, match="output channels"):
        REF.pack_conv2d(Int8Weight(q=torch.zeros(4, 3, 1, 1, dtype=torch.int8), scale=torch.ones(2)), None,
                        ConvGeometry())
