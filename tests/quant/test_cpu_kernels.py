"""The C++ CPU kernels (`qat.quant.cpu_kernels`) against the pure-torch path (`fused_kernels(False)`):
fake-quant values and masks bit for bit, masked gradients bit for bit, LSQ's input gradient bit for bit and
its scale / zero-point gradients within float32 rounding; the fallback when the build fails; a stale build
lock; and ``QAT_CPU_KERNELS=0``. Skipped where the kernels cannot be built (no compiler)."""
import os
import time
import warnings

import pytest
import torch

from qat.quant import affine, cpu_kernels
from qat.quant.affine import fake_quantize, fake_quantize_with_mask, fused_kernels, masked_gradient
from qat.quant.learnable import lsq_fake_quantize
from qat.quant.spec import QuantSpec


@pytest.fixture(scope="module", autouse=True)
def kernels():
    if cpu_kernels.extension() is None:
        pytest.skip("the CPU kernels are off or could not be built (no compiler?)")
    return cpu_kernels.extension()


def _with_special_values(x: torch.Tensor) -> torch.Tensor:
    """x with NaN, +-Inf, +-0 and exact rounding ties (the grid step is a power of two) in front."""
    flat = x.view(-1) if x.is_contiguous() else x.permute(affine.storage_order(x)).reshape(-1)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 0.375, -0.375, 0.125, 100.0])
    n = min(flat.numel(), special.numel())
    flat[:n] = special[:n]  # a view of x's storage for dense layouts
    return x


LAYOUTS = {  # name -> a float32 tensor laid out that way (channels_last, sizes off the vector width, ...)
    "contiguous": lambda: torch.randn(4, 6, 5, 7),
    "channels_last": lambda: torch.randn(4, 6, 5, 7).contiguous(memory_format=torch.channels_last),
    "odd_length": lambda: torch.randn(1013),
    "tiny": lambda: torch.randn(3),
    "several_chunks": lambda: torch.randn(70001),
}
SPECS = [
    QuantSpec(bits=8, signed=False),
    QuantSpec(bits=8, signed=True),
    QuantSpec(bits=4, signed=False),
    QuantSpec(bits=4, signed=True, symmetric=True, narrow_range=True),
    QuantSpec(bits=2, signed=True),
    QuantSpec(bits=2, signed=False),
]
PER_CHANNEL_SPECS = [
    QuantSpec(bits=8, signed=True, symmetric=True, granularity="per_channel"),
    QuantSpec(bits=4, signed=False, granularity="per_channel"),
]


def _input(layout: str) -> torch.Tensor:
    return _with_special_values(LAYOUTS[layout]() * 4)


def _qparams(spec: QuantSpec, channels: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A power-of-two per-tensor scale (exact ties), or random per-channel scales; zero points in range."""
    shape = () if channels is None else (channels,)
    scale = torch.full(shape, 0.25) if channels is None else torch.rand(shape) * 0.5 + 0.01
    zero = torch.randint(spec.qmin, spec.qmax + 1, shape, dtype=torch.int32)
    return scale, zero if not spec.symmetric else torch.full(shape, spec.fixed_zero_point, dtype=torch.int32)


def _assert_bit_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape and actual.stride() == expected.stride()
    assert torch.equal(actual.view(torch.int32), expected.view(torch.int32))  # NaN, signs of zero included


def _fake_quant_both_ways(x, scale, zero, spec, relu):
    """(kernels, torch) results of fake_quantize_with_mask at the broadcast shapes fake_quantize passes."""
    s, z = affine.broadcastable(scale, x, spec), affine.broadcastable(zero, x, spec)
    assert affine._cpu_kernels_serve(x, s)  # the kernels serve this case
    with fused_kernels(False):
        expected = fake_quantize_with_mask(x, s, z, spec.qmin, spec.qmax, relu)
    return fake_quantize_with_mask(x, s, z, spec.qmin, spec.qmax, relu), expected


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.short())
def test_per_tensor_fake_quant_is_bit_equal_to_torch(spec, layout, relu):
    x = _input(layout)
    scale, zero = _qparams(spec, None)
    (out, inside), (ref_out, ref_inside) = _fake_quant_both_ways(x, scale, zero, spec, relu)
    _assert_bit_equal(out, ref_out)
    assert torch.equal(inside, ref_inside) and inside.stride() == ref_inside.stride()


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("spec", PER_CHANNEL_SPECS, ids=lambda s: s.short())
def test_per_channel_weight_fake_quant_is_bit_equal_to_torch(spec, memory_format, relu):
    w = _with_special_values(torch.randn(10, 3, 3, 5).contiguous(memory_format=memory_format) * 2)
    scale, zero = _qparams(spec, 10)
    (out, inside), (ref_out, ref_inside) = _fake_quant_both_ways(w, scale, zero, spec, relu)
    _assert_bit_equal(out, ref_out)
    assert torch.equal(inside, ref_inside)


def test_per_channel_over_an_inner_dim_keeps_the_torch_path():
    spec = QuantSpec(bits=8, granularity="per_channel", axis=1)
    x = torch.randn(4, 6, 5, 5)
    scale, zero = _qparams(spec, 6)
    assert not affine.cpu_kernels_apply(x, spec)
    assert not affine._cpu_kernels_serve(x, affine.broadcastable(scale, x, spec))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_masked_gradient_is_bit_equal_to_torch(layout):
    grad = _input(layout)
    inside = torch.rand_like(grad) > 0.5
    with fused_kernels(False):
        expected = masked_gradient(grad, inside)
    _assert_bit_equal(masked_gradient(grad, inside), expected)


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("spec", SPECS[:3] + PER_CHANNEL_SPECS[:1], ids=lambda s: s.short())
def test_fake_quantize_autograd_is_bit_equal_to_torch(spec, relu):
    x = _input("channels_last")
    scale, zero = _qparams(spec, x.shape[0] if spec.is_per_channel else None)
    grad = torch.randn_like(x)
    results = []
    for enabled in (True, False):
        leaf = x.clone().requires_grad_()
        with fused_kernels(enabled):
            out = fake_quantize(leaf, scale, zero, spec, relu=relu)
            out.backward(grad)
        results.append((out.detach(), leaf.grad))
    (out, grad_x), (ref_out, ref_grad_x) = results
    _assert_bit_equal(out, ref_out)
    _assert_bit_equal(grad_x, ref_grad_x)


def _lsq_both_ways(x, spec, relu, learn_zero, grad):
    """[(x_hat, grad_x, grad_scale, grad_zero)] with the kernels, then on the torch path."""
    channels = x.shape[0] if spec.is_per_channel else None
    scale, zero = _qparams(spec, channels)
    results = []
    for enabled in (True, False):
        leaf = x.clone().requires_grad_()
        s = scale.clone().requires_grad_()
        z = zero.float().requires_grad_() if learn_zero else None
        with fused_kernels(enabled):
            assert affine.cpu_kernels_apply(leaf, spec) == enabled
            out = lsq_fake_quantize(leaf, s, z, spec, relu=relu)
            out.backward(grad)
        results.append((out.detach(), leaf.grad, s.grad, z.grad if learn_zero else None))
    return results


@pytest.mark.parametrize("learn_zero", [False, True], ids=["lsq", "lsq_plus"])
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "odd_length", "several_chunks"])
@pytest.mark.parametrize("spec", [SPECS[0], SPECS[3], SPECS[4]] + PER_CHANNEL_SPECS, ids=lambda s: s.short())
def test_lsq_matches_torch(spec, layout, relu, learn_zero):
    """Values and grad_x equal (up to the sign of zero: the kernels clamp x's codes at 0 where torch rounds
    relu(x), and write grad * 0 where torch's ReLU backward writes 0); the scale / zero-point gradients (float64 sums here, float32 dots or sums
    there) to float32 rounding of sums over the tensor."""
    x = LAYOUTS[layout]() * 3
    if spec.is_per_channel and x.dim() == 1:
        x = x[: x.numel() // 7 * 7].reshape(7, -1)
    grad = torch.randn_like(x)
    (out, grad_x, grad_s, grad_z), (ref_out, ref_grad_x, ref_grad_s, ref_grad_z) = _lsq_both_ways(
        x, spec, relu, learn_zero, grad)
    for actual, expected in ((out, ref_out), (grad_x, ref_grad_x)):
        assert torch.equal(actual, expected) and actual.stride() == expected.stride()  # -0.0 == 0.0
    torch.testing.assert_close(grad_s, ref_grad_s, rtol=1e-4, atol=1e-5)
    if learn_zero:
        torch.testing.assert_close(grad_z, ref_grad_z, rtol=1e-4, atol=1e-5)


def test_lsq_sums_do_not_depend_on_the_thread_count():
    x, grad = torch.randn(300001) * 3, torch.randn(300001)
    spec = QuantSpec(bits=4, signed=False)
    threads = torch.get_num_threads()
    try:
        grads = []
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            s, z = torch.tensor(0.1, requires_grad=True), torch.tensor(3.0, requires_grad=True)
            lsq_fake_quantize(x, s, z, spec).backward(grad)
            grads.append((s.grad, z.grad))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_lsq_nan_input_gives_nan_scale_gradient_as_torch():
    x = torch.randn(100)
    x[7] = float("nan")
    (_, grad_x, grad_s, _), (_, ref_grad_x, ref_grad_s, _) = _lsq_both_ways(x, SPECS[0], False, False,
                                                                              torch.ones_like(x))
    assert torch.equal(grad_x, ref_grad_x)
    assert grad_s.isnan() and ref_grad_s.isnan()


def test_large_outputs_reuse_their_memory_with_the_same_values():
    """Outputs of 1 MiB and more come from the kernels' block cache: the values must not care."""
    x = _with_special_values(torch.randn(300_001))
    scale, zero = torch.tensor(0.05), torch.tensor(3, dtype=torch.int32)
    with fused_kernels(False):
        expected = fake_quantize_with_mask(x, scale, zero, 0, 255)[0]
    first = fake_quantize_with_mask(x, scale, zero, 0, 255)[0]
    _assert_bit_equal(first, expected)
    del first
    _assert_bit_equal(fake_quantize_with_mask(x, scale, zero, 0, 255)[0], expected)


@pytest.fixture
def rebuild_afterwards():
    yield
    cpu_kernels._build.cache_clear()  # the next use loads the cached build again


def test_build_failure_warns_once_and_keeps_the_torch_path(monkeypatch, rebuild_afterwards):
    import torch.utils.cpp_extension

    def failing_load(**kwargs):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", failing_load)
    cpu_kernels._build.cache_clear()
    x, scale, zero = torch.randn(1000), torch.tensor(0.1), torch.tensor(0, dtype=torch.int32)
    with pytest.warns(RuntimeWarning, match="could not be built"):
        out, inside = fake_quantize_with_mask(x, scale, zero, -128, 127)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: no second warning
        assert cpu_kernels.extension() is None
    with fused_kernels(False):
        ref_out, ref_inside = fake_quantize_with_mask(x, scale, zero, -128, 127)
    assert torch.equal(out, ref_out) and torch.equal(inside, ref_inside)


@pytest.mark.parametrize("lock_age_s, file_baton, removed", [
    (3600, True, True),  # torch locking by the file's existence: an hour-old lock is an interrupted build's
    (5, True, False),  # a build that may be running now
    (3600, False, False),  # torch holding an OS lock: the file itself blocks nothing, and may be held now
])
def test_stale_build_lock_is_removed_only_where_torch_would_wait_forever(monkeypatch, tmp_path, lock_age_s,
                                                                          file_baton, removed):
    import torch.utils.cpp_extension

    if file_baton:
        monkeypatch.setattr(torch.utils.cpp_extension, "FileBaton", object, raising=False)
    else:
        monkeypatch.delattr(torch.utils.cpp_extension, "FileBaton", raising=False)
    lock = tmp_path / "lock"
    lock.touch()
    os.utime(lock, (time.time() - lock_age_s,) * 2)
    if removed:
        with pytest.warns(RuntimeWarning, match="interrupted build"):
            assert cpu_kernels.clear_stale_build_lock(tmp_path)
    else:
        assert not cpu_kernels.clear_stale_build_lock(tmp_path)
    assert lock.exists() is not removed
    assert not cpu_kernels.clear_stale_build_lock(tmp_path / "never_built")  # no lock: nothing to do


def test_environment_switch_turns_the_kernels_off(monkeypatch):
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    x = torch.randn(100)
    assert cpu_kernels.extension() is None
    assert not affine.cpu_kernels_apply(x, QuantSpec())
    assert not affine._cpu_kernels_serve(x, torch.tensor(0.1))


def _small_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(16 * 8 * 8, 10),
    )


@pytest.mark.parametrize("preset, observers_on", [("w8a8", True), ("w4a4_lsq", False)])
def test_qat_steps_match_the_torch_path(preset, observers_on):
    """A few SGD steps of a prepared Conv-BN-ReLU net: W8A8 identical to the torch path, LSQ's learned ranges
    within float32 rounding of its scale gradients."""
    import qat

    x = torch.randn(4, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 10, (4,))
    params = []
    for enabled in (True, False):
        model = qat.prepare(_small_net(), qat.QuantConfig.preset(preset), example_inputs=(x[:2],))
        qat.calibrate(model, [x], freeze=not observers_on)
        optimizer = torch.optim.SGD(model.train().parameters(), lr=1e-2, momentum=0.9)
        with fused_kernels(enabled):
            for _ in range(3):
                torch.nn.functional.cross_entropy(model(x), target).backward()
                optimizer.step()
                optimizer.zero_grad()
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    if preset == "w8a8":
        assert torch.equal(params[0], params[1])
    else:
        torch.testing.assert_close(params[0], params[1], rtol=1e-4, atol=1e-4)


def test_release_cached_blocks_frees_kept_outputs_only():
    """A freed output of 1 MiB and more is kept for the next one; releasing frees it, not live outputs."""
    spec = QuantSpec(bits=8, signed=True)
    x = torch.randn(1 << 19)  # 2 MiB of float32
    scale, zero = torch.tensor(0.05), torch.tensor(0, dtype=torch.int32)
    cpu_kernels.release_cached_blocks()
    kept = fake_quantize(x, scale, zero, spec)
    expected = kept.clone()
    out = fake_quantize(x, scale, zero, spec)
    del out
    assert cpu_kernels.release_cached_blocks() >= x.numel() * 4  # the freed output (and its mask's block, if any)
    assert cpu_kernels.release_cached_blocks() == 0
    assert torch.equal(kept, expected)  # a live output is untouched
