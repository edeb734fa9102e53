"""The fused observer kernel equals the plain observer + qparams path: running ranges, scales, zero points,
fake-quant outputs, over several batches, for every running-range observer and spec; NaN still reported.

Natively on CUDA; interpreted on CPU tensors elsewhere (fixtures in conftest.py)."""
import pytest
import torch

from qat.quant.affine import fused_kernels, qparams_from_minmax
from qat.quant.fake_quantize import FakeQuantize
from qat.quant.observers import MinMaxObserver, MovingAverageMinMaxObserver
from qat.quant.spec import QuantSpec

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

SPECS = {
    "u8_tensor": QuantSpec(bits=8, signed=False),
    "s8_sym_tensor": QuantSpec(bits=8, signed=True, symmetric=True),
    "s8_sym_ch0": QuantSpec(bits=8, symmetric=True, narrow_range=True, granularity="per_channel", axis=0),
    "u4_ch1": QuantSpec(bits=4, signed=False, granularity="per_channel", axis=1),
}
OBSERVERS = {  # the EMA weights cover both branches of torch.lerp's formula
    "minmax": MinMaxObserver,
    "ema_0.01": lambda spec: MovingAverageMinMaxObserver(spec, momentum=0.01),
    "ema_0.7": lambda spec: MovingAverageMinMaxObserver(spec, momentum=0.7),
}


def _batches(dtype: torch.dtype) -> list[torch.Tensor]:
    shifts = (0.0, 1.5, -2.0, 0.3)  # the range moves, so every rule changes it
    return [(torch.randn(6, 5, 4, 3, device=DEVICE) * (1 + i) + s).to(dtype) for i, s in enumerate(shifts)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("observer", OBSERVERS.values(), ids=OBSERVERS.keys())
@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_fused_observer_equals_plain(triton_on_cpu, spec, observer, dtype):
    fused, plain = FakeQuantize(spec, observer(spec)).to(DEVICE), FakeQuantize(spec, observer(spec)).to(DEVICE)
    for x in _batches(dtype):
        y_fused = fused(x)
        with fused_kernels(False):
            y_plain = plain(x)
        assert not fused._stale  # the fused kernel wrote the qparams (after the first batch, which sets shapes)
        # lerp may round once differently (a fused multiply-add in torch's kernel): ranges within float32 ulps
        torch.testing.assert_close(fused.observer.min_val, plain.observer.min_val, rtol=1e-6, atol=0)
        torch.testing.assert_close(fused.observer.max_val, plain.observer.max_val, rtol=1e-6, atol=0)
        scale, zero_point = qparams_from_minmax(fused.observer.min_val, fused.observer.max_val, spec)
        assert torch.equal(fused.scale, scale) and torch.equal(fused.zero_point, zero_point)  # same arithmetic
        # ranges one ulp apart (lerp) may move a rounding tie by one step; the output dtype rounds again
        lsb_and_rounding = float(plain.scale.max()) * 1.01 + float(y_plain.abs().max()) * torch.finfo(dtype).eps
        torch.testing.assert_close(y_fused.float(), y_plain.float(), rtol=0, atol=lsb_and_rounding)
    if observer is MinMaxObserver:
        assert torch.equal(fused.observer.min_val, plain.observer.min_val)  # min and max round nothing


def test_fused_observer_keeps_nan_for_check_finite(triton_on_cpu):
    spec = SPECS["u8_tensor"]
    fq = FakeQuantize(spec, MovingAverageMinMaxObserver(spec)).to(DEVICE)
    fq(torch.randn(64, device=DEVICE))
    bad = torch.randn(64, device=DEVICE)
    bad[3] = float("nan")
    fq(bad)
    assert torch.isnan(fq.observer.min_val) or torch.isnan(fq.observer.max_val)
    with pytest.raises(FloatingPointError, match="non-finite"):
        fq.observer.check_finite()


def test_fused_observer_off_without_history_or_with_other_shapes(triton_on_cpu):
    spec = SPECS["s8_sym_ch0"]
    fq = FakeQuantize(spec, MinMaxObserver(spec)).to(DEVICE)
    assert not fq.observer.observe_into_qparams(torch.randn(4, 3, device=DEVICE), fq.scale, fq.zero_point)  # no data
    fq(torch.randn(4, 3, device=DEVICE))  # plain path: buffers take shape (4,)
    assert not fq.observer.observe_into_qparams(torch.randn(5, 3, device=DEVICE), fq.scale, fq.zero_point)
    assert fq.observer.observe_into_qparams(torch.randn(4, 3, device=DEVICE), fq.scale, fq.zero_point)


@pytest.mark.parametrize("observer", OBSERVERS.values(), ids=OBSERVERS.keys())
@pytest.mark.parametrize("spec", [SPECS["u8_tensor"], SPECS["u4_ch1"]], ids=["u8_tensor", "u4_ch1"])
def test_quantizer_applying_relu_equals_relu_then_quantizer(triton_on_cpu, spec, observer):
    """applies_relu, folded into the fused observer and fake-quant kernels, equals a separate torch.relu:
    the range observed is relu(x)'s, outputs and input gradients equal."""
    folded, plain = FakeQuantize(spec, observer(spec)).to(DEVICE), FakeQuantize(spec, observer(spec)).to(DEVICE)
    folded.applies_relu = True
    for x in _batches(torch.float32):
        x_folded, x_plain = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_folded = folded(x_folded)
        with fused_kernels(False):
            y_plain = plain(torch.relu(x_plain))
        assert torch.equal(folded.observer.min_val, plain.observer.min_val) or observer is not MinMaxObserver
        torch.testing.assert_close(folded.observer.max_val, plain.observer.max_val, rtol=1e-6, atol=0)
        assert float(folded.observer.min_val.min()) >= 0.0  # relu(x)'s range, not x's
        torch.testing.assert_close(y_folded, y_plain, rtol=0, atol=float(plain.scale.max()) * 1.01)
        y_folded.backward(torch.ones_like(y_folded))
        y_plain.backward(torch.ones_like(y_plain))
        assert torch.equal(x_folded.grad, x_plain.grad)
    folded.disable_fake_quant()
    x = _batches(torch.float32)[0]
    assert torch.equal(folded(x), torch.relu(x))  # fake-quant off: the ReLU still applies


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("programs", [1, 3, 4], ids=lambda p: f"{p}_programs")
def test_per_tensor_min_max_pass_equals_aminmax(monkeypatch, fused_module, programs, dtype):
    """The Triton min/max pass (programs looping over blocks, partials reduced by the update kernel) gives
    torch.aminmax's range exactly, NaN included; small blocks here so that every program loops."""
    from qat.quant import triton_observers

    monkeypatch.setattr(triton_observers, "_MINMAX_BLOCK", 16)
    monkeypatch.setattr(triton_observers, "MAX_PARTIALS", programs)
    spec = SPECS["u8_tensor"]
    x = (torch.randn(3, 5, 7, 11, device=DEVICE) * 4 + 1).to(dtype).contiguous(memory_format=torch.channels_last)
    for batch in (x, torch.where(x > 6, float("nan"), x)):  # the second holds a NaN or more
        partials = triton_observers.tensor_minmax_partials(batch)
        assert partials.numel() == 2 * programs
        min_val, max_val = torch.full((), float("inf"), device=DEVICE), torch.full((), float("-inf"), device=DEVICE)
        scale, zero = torch.ones((), device=DEVICE), torch.zeros((), device=DEVICE, dtype=torch.int32)
        triton_observers.update_range_and_qparams(partials, None, min_val, max_val, scale, zero, spec,
                                                  *MinMaxObserver(spec).running_rule())
        lo, hi = torch.aminmax(batch.float())
        torch.testing.assert_close(min_val, lo, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(max_val, hi, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(min_val) and torch.isnan(max_val)
