"""The fused weight side of the folded Conv-BN training step (one Triton launch each way) equals the torch
path: layer outputs, gradients of weight, gamma, beta and LSQ scales, observer ranges and qparams, over a few
steps, for every quantizer state it serves; the states it does not serve take the torch path.

Natively on CUDA; interpreted on CPU tensors elsewhere (fixtures in tests/conftest.py)."""
import copy

import pytest
import torch
from torch import nn

from qat.fx.modules import QConv, QLinear, _fused_weight_quant
from qat.quant.affine import fused_kernels
from qat.quant.config import QuantizerConfig
from qat.quant.spec import QuantSpec

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
W8 = QuantSpec(bits=8, symmetric=True, granularity="per_channel")
W4 = QuantSpec(bits=4, symmetric=True, narrow_range=True, granularity="per_channel")
CONFIGS = {
    "minmax_observing": (QuantizerConfig(W8, "minmax"), "OBSERVE"),
    "ema_observing": (QuantizerConfig(W8, "ema"), "OBSERVE"),
    "minmax_frozen": (QuantizerConfig(W8, "minmax"), "FIXED"),
    "lsq_training": (QuantizerConfig(W4, "lsq"), "LSQ"),
}


def _layer(kind: str, cfg: QuantizerConfig):
    torch.manual_seed(0)
    if kind.startswith("conv"):
        float_layer, bn, x = nn.Conv2d(6, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5), torch.randn(4, 6, 7, 7)
        layer = QConv.from_float(float_layer, cfg, bn, "relu")
    else:
        float_layer, bn, x = nn.Linear(12, 9), nn.BatchNorm1d(9), torch.randn(16, 12)
        layer = QLinear.from_float(float_layer, cfg, bn)
    with torch.no_grad():
        bn.weight.uniform_(-1.5, 1.5)  # gamma of both signs
        bn.running_var.uniform_(0.5, 2.0)
    memory_format = torch.channels_last if kind == "conv_channels_last" else torch.contiguous_format
    layer = layer.to(DEVICE, memory_format=memory_format).train()
    x = x.to(DEVICE, memory_format=memory_format)
    with fused_kernels(False):
        layer(x)  # the first observation shapes the buffers (torch path)
    return layer, x


@pytest.mark.parametrize("kind", ["conv", "conv_channels_last", "linear"])
@pytest.mark.parametrize("name", CONFIGS)
def test_fused_weight_step_equals_torch_path(triton_on_cpu, name, kind):
    cfg, mode = CONFIGS[name]
    layer, x = _layer(kind, cfg)
    if mode == "FIXED":
        layer.weight_fq.disable_observer()
    if mode == "LSQ":
        layer.weight_fq.disable_observer()
    fused, reference = copy.deepcopy(layer), copy.deepcopy(layer)
    assert _fused_weight_quant(fused.weight_fq, fused.weight).mode.name == mode
    assert fused.weight.is_contiguous() == (kind != "conv_channels_last")
    for step in range(3):
        batch = x * (1 + step) + step * 0.1
        outputs = []
        for model, use_fused in ((fused, True), (reference, False)):
            with fused_kernels(use_fused):
                y = model(batch)
            y.square().mean().backward()
            outputs.append(y)
        torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
        for (n, a), (_, b) in zip(fused.named_parameters(), reference.named_parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=f"{name} {kind} {n} step {step}")
        for (n, a), (_, b) in zip(fused.named_buffers(), reference.named_buffers()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=0, msg=f"{name} {kind} {n} step {step}")
        assert fused.bn.weight.grad.abs().sum() > 0
        with torch.no_grad():
            for model in (fused, reference):
                for p in model.parameters():
                    if p.grad is not None:
                        p -= 0.1 * p.grad
                        p.grad = None


def test_unserved_states_take_the_torch_path(triton_on_cpu):
    layer, _ = _layer("conv", QuantizerConfig(W8, "minmax"))
    assert _fused_weight_quant(layer.weight_fq, layer.weight) is not None
    layer.weight_fq.disable_fake_quant()
    assert _fused_weight_quant(layer.weight_fq, layer.weight) is None  # float weight: no quantizer involved
    fresh = QConv.from_float(nn.Conv2d(3, 4, 3), QuantizerConfig(W8, "minmax"), nn.BatchNorm2d(4)).to(DEVICE)
    assert _fused_weight_quant(fresh.weight_fq, fresh.weight) is None  # nothing observed yet: buffers unshaped
    per_tensor = QConv.from_float(nn.Conv2d(3, 4, 3), QuantizerConfig(QuantSpec(bits=8, symmetric=True), "minmax"),
                                  nn.BatchNorm2d(4)).to(DEVICE)
    assert _fused_weight_quant(per_tensor.weight_fq, per_tensor.weight) is None
