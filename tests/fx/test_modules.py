"""QAT modules: the simulated BN folding in training equals float Conv + BN on batch statistics."""
import copy

import pytest
import torch
from torch import nn

from qat.fx import QuantConfig, enable_fake_quant, prepare
from qat.fx.modules import QuantizedWeightModule
from qat.models import build_model


def _random_bn_state(model: nn.Module) -> nn.Module:
    """Running statistics and affine parameters away from their defaults (negative gammas included)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.normal_()
                m.bias.normal_()
                m.running_mean.normal_()
                m.running_var.uniform_(0.2, 3.0)
    return model


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def test_folded_training_step_gradient_exact_for_a_near_constant_channel():
    """A channel whose variance is far below eps: BN of the scaled output depends on the fold factor through
    eps * f^2, and that term carries most of gamma's gradient; with it, gamma's gradient equals float BN's."""
    torch.manual_seed(0)
    float_model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)).train()
    with torch.no_grad():
        float_model[0].weight[1] *= 1e-4  # channel 1: variance ~1e-8 against eps 1e-5
        float_model[1].weight.copy_(torch.tensor([1.0, 0.7, -1.3, 2.0]))
        float_model[1].running_var.copy_(torch.tensor([0.5, 2.0, 1.0, 0.3]))
    x = torch.randn(8, 3, 6, 6)
    prepared = prepare(copy.deepcopy(float_model), QuantConfig.preset("w8a8"), example_inputs=(x,)).train()
    enable_fake_quant(prepared, False)
    projection = torch.randn(8, 4, 6, 6)
    (float_model(x) * projection).sum().backward()
    (prepared(x) * projection).sum().backward()
    layer = next(m for m in prepared.modules() if isinstance(m, QuantizedWeightModule))
    torch.testing.assert_close(layer.bn.weight.grad, float_model[1].weight.grad, rtol=1e-5, atol=1e-5)  # CUDA: BatchNorm's statistics/elemt kernels


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_folded_training_step_equals_float_conv_bn(momentum, device, monkeypatch):
    """Fake quantization off, train mode, channels_last: outputs and running statistics match the float
    ResNet-20 to float rounding, gradients to 0.1% of their largest entry (momentum None: the running
    statistics move by 0.1, as nn.BatchNorm2d(momentum=0.1) does)."""
    torch.manual_seed(0)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # float32 convolutions on both sides
    float_model = _random_bn_state(build_model("resnet20", 10)).to(device, memory_format=torch.channels_last).train()
    for m in float_model.modules():
        if isinstance(m, nn.BatchNorm2d) and momentum is None:
            m.momentum = 0.1  # the division form updates with 0.1, like an nn.BatchNorm2d of momentum 0.1
    x = torch.randn(16, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    prepared = prepare(copy.deepcopy(float_model), QuantConfig.preset("w8a8"), example_inputs=(x[:2],)).train()
    enable_fake_quant(prepared, False)
    if momentum is None:
        for m in prepared.modules():
            if isinstance(m, QuantizedWeightModule) and m.bn is not None:
                m.bn.momentum = None
    expected, got = float_model(x), prepared(x)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    projection = torch.randn_like(expected)
    (expected * projection).sum().backward()
    (got * projection).sum().backward()
    float_params = dict(float_model.named_parameters())
    qat_layers = {n: m for n, m in prepared.named_modules() if isinstance(m, QuantizedWeightModule)}
    checked = 0
    for name, layer in qat_layers.items():
        if layer.bn is None:
            continue
        bn_name = name.replace("conv", "bn")
        pairs = [(layer.weight, float_params[f"{name}.weight"]), (layer.bn.weight, float_params[f"{bn_name}.weight"]),
                 (layer.bn.bias, float_params[f"{bn_name}.bias"])]
        for ours, theirs in pairs:  # the folded form drops an eps-sized term of the weight gradient
            assert torch.allclose(ours.grad, theirs.grad, rtol=1e-2, atol=1e-3 * theirs.grad.abs().max().item()), name
        float_bn = dict(float_model.named_modules())[bn_name]
        assert torch.allclose(layer.bn.running_mean, float_bn.running_mean, rtol=1e-5, atol=1e-6), name
        assert torch.allclose(layer.bn.running_var, float_bn.running_var, rtol=1e-4, atol=1e-6), name
        checked += 1
    assert checked == 19
