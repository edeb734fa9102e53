import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F

from qat.quant.affine import fake_quantize
from qat.quant.config import OBSERVERS, QuantizerConfig
from qat.quant.fake_quantize import FakeQuantize, LearnableFakeQuantize
from qat.quant.observers import MinMaxObserver
from qat.quant.spec import QuantSpec

ACT = QuantSpec(bits=8, signed=False)
WEIGHT = QuantSpec(bits=8, symmetric=True, granularity="per_channel")
W4 = QuantSpec(bits=4, symmetric=True, narrow_range=True, granularity="per_channel")

CONFIGS = [QuantizerConfig(ACT, m) for m in OBSERVERS] + [
    QuantizerConfig(WEIGHT, "minmax"),
    QuantizerConfig(WEIGHT, "mse"),
    QuantizerConfig(ACT, "lsq"),
    QuantizerConfig(ACT, "lsq_plus"),
    QuantizerConfig(ACT, "pact"),
    QuantizerConfig(W4, "lsq"),
    QuantizerConfig(QuantSpec(bits=8, granularity="per_token"), "minmax"),
]
IDS = [c.short() for c in CONFIGS]


def _input_for(cfg):
    return torch.randn(16, 8, 4, 4) if not cfg.spec.is_per_channel else torch.randn(8, 4, 3, 3)


def test_switches_follow_torch_ao_names():
    fq = FakeQuantize(ACT, MinMaxObserver(ACT))
    x = torch.rand(100) * 2
    y = fq(x)
    assert fq.observer.max_val.item() == x.max().item()
    torch.testing.assert_close(y, fake_quantize(x, fq.scale, fq.zero_point, ACT))
    fq.disable_observer()
    fq(x * 10)
    assert fq.observer.max_val.item() == x.max().item()  # observer frozen
    assert torch.equal(fq.disable_fake_quant()(x), x)  # identity
    fq.enable_fake_quant(True).enable_observer(True)
    assert fq.fake_quant_enabled and fq.observer_enabled


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_state_dict_round_trip_before_any_forward(cfg):
    fq = cfg.build()
    x = _input_for(cfg)
    fq(x)
    fq.disable_observer()
    fresh = cfg.build()
    fresh.load_state_dict(fq.state_dict())
    assert torch.equal(fresh(x), fq(x))
    for a, b in zip(fresh.qparams(), fq.qparams()) if not cfg.spec.is_dynamic else ():
        assert torch.equal(a, b)
    assert fresh.observer_enabled == fq.observer_enabled is False


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_modules_deepcopy_and_pickle(cfg):
    fq = cfg.build()
    x = _input_for(cfg)
    fq(x)
    for clone in (copy.deepcopy(fq), pickle.loads(pickle.dumps(fq))):
        assert torch.equal(clone(x), fq(x))


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c.learnable], ids=lambda c: c.short())
def test_learnable_init_from_observer_then_trains(cfg):
    fq = cfg.build()
    assert isinstance(fq, LearnableFakeQuantize)
    x = _input_for(cfg).abs() if cfg.range_method == "pact" else _input_for(cfg)
    fq(x)
    fq.disable_observer()
    scale, _ = fq.observer.calculate_qparams()
    if cfg.range_method == "pact":
        assert fq.alpha.item() == pytest.approx(x.max().item())
    else:
        torch.testing.assert_close(fq.scale.detach(), scale)
    params = dict(fq.named_parameters())
    assert params and all(p.requires_grad for p in params.values())
    if cfg.range_method == "pact":
        with torch.no_grad():
            fq.alpha.mul_(0.5)  # clip part of x, so alpha gets a gradient
    opt = torch.optim.SGD(fq.parameters(), lr=0.1)
    before = {k: v.detach().clone() for k, v in params.items()}
    loss = (fq(x) - 0.5 * x).pow(2).sum()
    loss.backward()
    opt.step()
    assert all(torch.isfinite(p.grad).all() for p in params.values())
    assert any(not torch.equal(before[k], v) for k, v in params.items())


def test_learnable_qparams_reproduce_its_forward():
    fq = QuantizerConfig(ACT, "lsq_plus").build()
    x = torch.randn(1000)
    fq(x)
    fq.disable_observer()
    with torch.no_grad():
        fq.zero_point.add_(0.4)
    scale, zero = fq.qparams()
    assert torch.equal(fq(x), fake_quantize(x, scale, zero, ACT))


def test_under_bf16_autocast_conv_output():
    fq = FakeQuantize(ACT, MinMaxObserver(ACT))
    x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = F.conv2d(x, w)
        out = fq(y)
    assert y.dtype == out.dtype == torch.bfloat16
    torch.testing.assert_close(out, fake_quantize(y.float(), fq.scale, fq.zero_point, ACT).bfloat16())


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_cuda_matches_cpu(cfg):
    x = _input_for(cfg)
    cpu = cfg.build()
    gpu = copy.deepcopy(cpu).cuda()
    out_cpu, out_gpu = cpu(x), gpu(x.cuda())
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, atol=float(cpu.qparams()[0].max()) if not cfg.spec.is_dynamic else 1e-2, rtol=0)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = gpu(x.cuda().bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_extra_state_survives_torch_save():
    fq = QuantizerConfig(ACT, "lsq").build()
    fq(torch.randn(10))
    fq.disable_observer().disable_fake_quant()
    buf = io.BytesIO()
    torch.save(fq.state_dict(), buf)
    buf.seek(0)
    fresh = QuantizerConfig(ACT, "lsq").build()
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert (fresh.observer_enabled, fresh.fake_quant_enabled, fresh.initialized) == (False, False, True)


@pytest.mark.parametrize("saved, loading, missing", [("minmax", "lsq", "initialized"),
                                                     ("minmax", "minmax", "observer_enabled")])
def test_extra_state_of_another_quantizer_kind_is_named(saved, loading, missing):
    """An observed quantizer's state loaded into a learned one (or a damaged extra state): a ValueError naming the
    loading kind and the missing field, where load_state_dict raised a bare KeyError."""
    state = QuantizerConfig(ACT, saved).build().state_dict()
    if saved == loading:
        state["_extra_state"] = {"fake_quant_enabled": True}
    fresh = QuantizerConfig(ACT, loading).build()
    with pytest.raises(ValueError, match=rf"{type(fresh).__name__} cannot load an extra state without {missing} "
                                         r"\(it has .*\): it was saved by another quantizer kind"):
        fresh.load_state_dict(state, strict=False)


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_quantizer_taking_the_relu_equals_relu_then_quantizer(cfg):
    """applies_relu on the CPU (folded into the fake-quant passes and the running observers' ranges where they
    serve the quantizer, torch.relu elsewhere) equals torch.relu followed by the same quantizer: observer
    statistics, outputs and input gradients, while observing and once frozen."""
    folded, plain = cfg.build(), cfg.build()
    folded.applies_relu = True
    for step in range(4):
        if step == 2:
            folded.disable_observer(), plain.disable_observer()
        x = _input_for(cfg) * 3
        x_folded, x_plain = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_folded, y_plain = folded(x_folded), plain(torch.relu(x_plain))
        assert torch.equal(y_folded, y_plain)
        g = torch.randn_like(x)
        y_folded.backward(g), y_plain.backward(g)
        assert torch.equal(x_folded.grad, x_plain.grad)
        for name, buffer in plain.state_dict().items():
            torch.testing.assert_close(folded.state_dict()[name], buffer, rtol=0, atol=0, equal_nan=True)
