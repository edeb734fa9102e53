"""ResNet-20 with the shared pretrained weights on real CIFAR-10 images."""
import pytest
import torch
import torch.nn.functional as F

from qat.data import cifar10_test_batches
from qat.fx import LayerOverride, QuantConfig, calibrate, coverage, explain, prepare
from qat.models.cifar_resnet import load_cifar_resnet


@pytest.fixture(scope="module")
def resnet20_and_batches(shared_data):
    model = load_cifar_resnet(20, next((shared_data / "pretrained").glob("resnet20-*.th"))).eval()
    batches = list(cifar10_test_batches(shared_data, n=512, batch_size=128, source="lossless_subset"))
    return model, batches


@pytest.mark.parametrize("preset", ["w8a8", "w8a8_ptq"])
def test_8bit_logits_stay_close_to_float(resnet20_and_batches, preset):
    model, batches = resnet20_and_batches
    prepared = prepare(model, QuantConfig.preset(preset), (batches[0][0],))
    calibrate(prepared, batches[:2])
    x = torch.cat([b[0] for b in batches[2:]])
    with torch.no_grad():
        ref, out = model(x), prepared(x)
    cosine = F.cosine_similarity(out, ref, dim=1).mean().item()
    assert cosine >= 0.99, cosine
    agree = (out.argmax(1) == ref.argmax(1)).float().mean().item()
    assert agree >= 0.95, agree


def test_skip_and_overrides_change_the_plan(resnet20_and_batches):
    model, batches = resnet20_and_batches
    cfg = QuantConfig.preset("w8a8").with_(
        skip=("linear",), name_overrides=(LayerOverride("layer3.*", weight_bits=4),)
    )
    prepared = prepare(model, cfg, (batches[0][0],))
    assert coverage(prepared) == (19, 20)
    bits = {d.module: d.weight.spec.bits for d in prepared.qat_plan.layers}
    assert bits["layer3.0.conv1"] == 4 and bits["layer2.0.conv1"] == 8 and "linear" not in bits
    text = explain(prepared)
    assert "linear" in text and "float (skipped)" in text and "19/20" in text


def test_first_last_8bit_for_low_bit_presets(resnet20_and_batches):
    model, batches = resnet20_and_batches
    prepared = prepare(model, QuantConfig.preset("w4a4_lsq"), (batches[0][0],))
    bits = [(d.module, d.weight.spec.bits, d.activation_cfg.spec.bits) for d in prepared.qat_plan.layers]
    assert bits[0] == ("conv1", 8, 8) and bits[-1] == ("linear", 8, 8)
    assert all(w == a == 4 for _, w, a in bits[1:-1])
    first_input = next(a for a in prepared.qat_plan.activations if a.node == "x")
    assert first_input.config.spec.bits == 8
