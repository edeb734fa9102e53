"""prepare() over every registry model x every preset: trainable, faithful with fake-quant off, full coverage."""
import pytest
import torch
import torch.nn.functional as F

from qat.fx import QuantConfig, calibrate, coverage, enable_fake_quant, prepare
from qat.fx.config import PRESETS
from qat.models.registry import MODELS, build_model
from qat.quant.fake_quantize import LearnableFakeQuantize

HEAVY = {"resnet50", "densenet121", "convnext_tiny", "vit_b_16", "swin_t", "resnet18", "efficientnet_b0",
         "resnet32", "resnet44", "resnet56", "mobilenet_v3_large", "regnet_x_400mf"}
MODEL_PARAMS = [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in MODELS]


def _build(name):
    entry = MODELS[name]
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, **dict(entry.small_kwargs))
    if name == "vit_b_16":  # torchvision zero-initialises the head, which zeroes every upstream gradient
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)
    return model, entry.example_input(4, small=True)


@pytest.mark.parametrize("name", MODEL_PARAMS)
def test_fake_quant_off_equals_float_in_eval(name):
    model, x = _build(name)
    prepared = prepare(model.train(), QuantConfig.preset("w8a8"), (x,))  # traced in train mode
    enable_fake_quant(prepared, False)
    model.eval(), prepared.eval()
    with torch.no_grad():
        ref, out = model(x), prepared(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5 * max(1.0, ref.abs().max().item()))
    quantized, total = coverage(prepared)
    assert quantized == total == len(prepared.qat_plan.layers) + _inside_leaves(prepared)


def _inside_leaves(prepared):
    swapped = prepared.qat_plan.leaves + prepared.qat_plan.swapped_leaves
    return sum(1 for path in swapped for _, m in prepared.get_submodule(path).named_modules()
               if type(m).__name__ in ("QConv", "QLinear", "QConvTranspose2d"))


FULL_PRESET_MODELS = {"resnet20"}  # every preset in the default run; other models: w8a8 there
# One step of 2-bit QAT on the tiny example batch diverges for RegNet: deep BNs see constant channels and
# scale their gradient by 1/sqrt(eps) each (float BN does the same), a BN weight gets a ~1e27 gradient and the
# next forward is NaN. Fake-quant used to map NaN to the range bounds (torch's CPU kernel, the Triton min/max),
# which hid it; both paths now propagate NaN as the formula does.
DIVERGES = {
    ("regnet_x_400mf", "w2a2_lsq"): pytest.mark.xfail(strict=True, reason="2-bit step diverges (BN on constant channels)"),
}
STEP_PARAMS = [
    pytest.param(n, p, marks=[pytest.mark.slow] + ([DIVERGES[n, p]] if (n, p) in DIVERGES else []))
    if n in HEAVY or (n not in FULL_PRESET_MODELS and p != "w8a8") else (n, p)
    for n in MODELS for p in PRESETS
]


@pytest.mark.parametrize("name, preset", STEP_PARAMS)
def test_one_sgd_step_trains_weights_and_scales(name, preset):
    model, x = _build(name)
    prepared = prepare(model.train(), QuantConfig.preset(preset), (x,))
    calibrate(prepared, [x])  # PTQ init, then QAT
    prepared.train()
    opt = torch.optim.SGD(prepared.parameters(), lr=1e-3)
    loss = F.cross_entropy(prepared(x), torch.arange(4) % 10)
    loss.backward()
    assert torch.isfinite(loss)
    weights = [m.weight for m in prepared.modules() if type(m).__name__ in ("QConv", "QLinear")]
    assert weights and all(w.grad is not None and torch.isfinite(w.grad).all() for w in weights)
    learned = [p for m in prepared.modules() if isinstance(m, LearnableFakeQuantize) for p in m.parameters()]
    if "lsq" in preset:
        assert learned and all(p.grad is not None and torch.isfinite(p.grad).all() for p in learned)
        assert sum(p.grad.abs().sum() for p in learned) > 0
    opt.step()
    assert torch.isfinite(prepared(x)).all()


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["w8a8", "w4a4_lsq"])
def test_prepare_on_cuda_model_keeps_everything_on_cuda(preset):
    model, x = _build("resnet20")
    model, x = model.cuda(), x.cuda()
    prepared = prepare(model, QuantConfig.preset(preset), (x,))
    calibrate(prepared, [x])
    assert {t.device.type for t in list(prepared.parameters()) + list(prepared.buffers())} == {"cuda"}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = F.cross_entropy(prepared.train()(x), torch.arange(4, device="cuda") % 10)
    loss.backward()
    assert torch.isfinite(loss)
