import pytest
import torch

from qat.quant.affine import (
    SCALE_EPS,
    dequantize,
    dynamic_fake_quantize,
    fake_quantize,
    qparams_from_minmax,
    quantize,
    reduced_aminmax,
    reduced_minmax,
)
from qat.quant.spec import QuantSpec

PER_CHANNEL = dict(granularity="per_channel", axis=0)


def test_hand_computed_signed_8bit():
    spec = QuantSpec(bits=8, signed=True)
    x = torch.tensor([-1.0, 0.0, 1.0, 20.0])
    s, z = torch.tensor(0.1), torch.tensor(10, dtype=torch.int32)
    q = quantize(x, s, z, spec)
    assert q.dtype == torch.int8 and q.tolist() == [0, 10, 20, 127]
    torch.testing.assert_close(dequantize(q, s, z, spec), torch.tensor([-1.0, 0.0, 1.0, 11.7]))
    torch.testing.assert_close(fake_quantize(x, s, z, spec), torch.tensor([-1.0, 0.0, 1.0, 11.7]))


@pytest.mark.parametrize(
    "bits, lo, hi, scale, zero",
    [
        (8, -1.0, 3.0, 4.0 / 255, 64),  # 0 - round(-1 / (4/255)) = 63.75 -> 64
        (4, -1.0, 3.0, 4.0 / 15, 4),  # round(3.75) = 4
        (8, 0.5, 2.0, 2.0 / 255, 0),  # min widened to 0
        (4, -2.0, -1.0, 2.0 / 15, 15),  # max widened to 0
    ],
)
def test_asymmetric_formula_unsigned(bits, lo, hi, scale, zero):
    s, z = qparams_from_minmax(torch.tensor(lo), torch.tensor(hi), QuantSpec(bits=bits, signed=False))
    assert s.item() == pytest.approx(scale, rel=1e-6) and z.item() == zero


@pytest.mark.parametrize(
    "bits, narrow, scale",
    [(8, False, 3.0 / 127.5), (8, True, 3.0 / 127), (4, False, 3.0 / 7.5), (4, True, 3.0 / 7)],
)
def test_symmetric_formula(bits, narrow, scale):
    spec = QuantSpec(bits=bits, signed=True, symmetric=True, narrow_range=narrow)
    s, z = qparams_from_minmax(torch.tensor(-3.0), torch.tensor(1.0), spec)
    assert s.item() == pytest.approx(scale, rel=1e-6) and z.item() == 0


def test_symmetric_unsigned_zero_point_is_mid_range():
    _, z = qparams_from_minmax(torch.tensor(-1.0), torch.tensor(1.0), QuantSpec(signed=False, symmetric=True))
    assert z.item() == 128


@pytest.mark.parametrize("spec", [QuantSpec(), QuantSpec(signed=False), QuantSpec(symmetric=True)])
def test_zero_is_exact_and_all_zero_is_finite(spec):
    x = torch.randn(1000) * 3 + 1
    s, z = qparams_from_minmax(*reduced_minmax(x, spec), spec)
    assert fake_quantize(torch.zeros(3), s, z, spec).eq(0).all()
    zeros = torch.zeros(10)
    s0, z0 = qparams_from_minmax(*reduced_minmax(zeros, spec), spec)
    assert s0.item() == SCALE_EPS
    out = fake_quantize(zeros, s0, z0, spec)
    assert torch.isfinite(out).all() and out.eq(0).all()


def test_rounding_is_half_to_even():
    spec = QuantSpec(bits=8, signed=True)
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5])
    assert quantize(x, torch.tensor(1.0), torch.tensor(0, dtype=torch.int32), spec).tolist() == [0, 2, 2, 0, -2]


def test_granularity_shapes_and_values():
    w = torch.randn(6, 4, 3, 3)
    spec = QuantSpec(symmetric=True, **PER_CHANNEL)
    lo, hi = reduced_minmax(w, spec)
    assert lo.shape == (6,)
    torch.testing.assert_close(hi, w.flatten(1).amax(1))
    tok = QuantSpec(signed=False, granularity="per_token")
    x = torch.randn(2, 5, 8)
    assert reduced_minmax(x, tok)[0].shape == (2, 5)
    grp = QuantSpec(symmetric=True, granularity="per_group", group_size=4)
    assert reduced_minmax(x, grp)[0].shape == (2, 5, 2)
    with pytest.raises(ValueError, match="divisible by group_size"):
        reduced_minmax(torch.randn(3, 6), grp)


@pytest.mark.parametrize("granularity", ["per_channel", "per_token", "per_group"])
def test_reduced_ranges_equal_aminmax_with_special_values(granularity):
    """The CPU's amin + amax reductions give torch.aminmax's ranges, NaN and infinities included."""
    x = torch.randn(3, 5, 8)
    x[0, 1, 2], x[1, 2, 3], x[2, 4, 7] = float("nan"), float("inf"), -float("inf")
    options = {"per_channel": dict(axis=0), "per_token": {}, "per_group": dict(group_size=4)}[granularity]
    spec = QuantSpec(signed=True, granularity=granularity, **options)
    lo, hi = reduced_minmax(x, spec)
    rows = {"per_channel": x.reshape(3, -1), "per_token": x, "per_group": x.reshape(3, 5, 2, 4)}[granularity]
    expected_lo, expected_hi = torch.aminmax(rows, dim=-1)
    assert torch.allclose(lo, expected_lo, equal_nan=True, rtol=0, atol=0)
    assert torch.allclose(hi, expected_hi, equal_nan=True, rtol=0, atol=0)
    assert lo.isnan().any() and hi.isinf().any()


@pytest.mark.parametrize("granularity", ["per_token", "per_group"])
def test_dynamic_granularities_quantize_each_row_on_its_own_grid(granularity):
    extra = dict(group_size=4) if granularity == "per_group" else {}
    spec = QuantSpec(bits=4, signed=False, granularity=granularity, **extra)
    x = torch.randn(3, 8) * torch.tensor([[1.0], [10.0], [100.0]])
    out = dynamic_fake_quantize(x, spec)
    rows = x.reshape(-1, 4) if granularity == "per_group" else x
    err = (out.reshape(rows.shape) - rows).abs().amax(-1)
    span = rows.amax(-1).clamp(min=0) - rows.amin(-1).clamp(max=0)
    assert (err <= span / 15 / 2 + 1e-6).all()  # each row within half its own step


def _random_qparams(spec, shape):
    scale = torch.rand(shape) * 0.1 + 1e-3
    zero = torch.randint(spec.qmin, spec.qmax + 1, shape, dtype=torch.int32)
    if spec.symmetric:
        zero = torch.full(shape, spec.fixed_zero_point, dtype=torch.int32)
    return scale, zero


FUSED_SPECS = [
    QuantSpec(bits=8, signed=False),
    QuantSpec(bits=8, signed=True),
    QuantSpec(bits=8, signed=True, symmetric=True, narrow_range=True),
    QuantSpec(bits=4, signed=False),
    QuantSpec(bits=2, signed=True, symmetric=True),
    QuantSpec(bits=8, signed=False, reduce_range=True),
    QuantSpec(bits=8, symmetric=True, **PER_CHANNEL),
    QuantSpec(bits=4, signed=False, **PER_CHANNEL),
    QuantSpec(bits=8, granularity="per_channel", axis=1),
]


FUSED_CASES = [("cpu", torch.float32)] + [
    pytest.param("cuda", dtype, marks=pytest.mark.gpu, id=f"cuda-{dtype}")
    for dtype in (torch.float32, torch.bfloat16, torch.float16)
]


@pytest.mark.parametrize("device, dtype", FUSED_CASES)
@pytest.mark.parametrize("spec", FUSED_SPECS, ids=lambda s: s.short())
def test_fused_op_is_bit_equal_to_formula_values_and_grads(spec, device, dtype):
    """The fused path (torch's kernels; on CUDA per-channel the Triton kernels) equals the formula."""
    x = (torch.randn(8, 6, 5, 5) * 4).to(device, dtype).contiguous(memory_format=torch.channels_last)
    shape = (x.shape[spec.axis],) if spec.is_per_channel else ()
    scale, zero = (t.to(device) for t in _random_qparams(spec, shape))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    fused = fake_quantize(x1, scale, zero, spec, use_fused=True)
    plain = fake_quantize(x2, scale, zero, spec, use_fused=False)
    assert torch.equal(fused, plain)
    g = torch.randn_like(x)
    fused.backward(g)
    plain.backward(g)
    assert torch.equal(x1.grad, x2.grad)


@pytest.mark.parametrize("zero_at", [None, "below_qmin", "above_qmax"], ids=["z_in_range", "z_below_qmin", "z_above_qmax"])
@pytest.mark.parametrize("device, dtype", FUSED_CASES)
@pytest.mark.parametrize("spec", FUSED_SPECS, ids=lambda s: s.short())
def test_fused_op_with_relu_equals_relu_then_formula(spec, device, dtype, zero_at):
    """relu=True on the fused paths (CPU passes, Triton kernels) equals torch.relu then the formula: values,
    the input gradient (ReLU's and the fake-quant's masks), for zeros and NaN, and for zero points outside
    [qmin, qmax] (which a caller of the function may pass) where the grid's lower bound is above 0 or its
    upper bound below it."""
    x = (torch.randn(8, 6, 5, 5) * 4).to(device, dtype).contiguous(memory_format=torch.channels_last)
    x[0, 0, 0, :3] = torch.tensor([0.0, -0.0, float("nan")])
    shape = (x.shape[spec.axis],) if spec.is_per_channel else ()
    scale, zero = (t.to(device) for t in _random_qparams(spec, shape))
    if zero_at is not None:  # codes of x > 0 then fall below the grid (qmin - z = 3) or all above it
        zero = torch.full_like(zero, spec.qmin - 3 if zero_at == "below_qmin" else spec.qmax + 3)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    fused = fake_quantize(x1, scale, zero, spec, use_fused=True, relu=True)
    plain = fake_quantize(torch.relu(x2), scale, zero, spec, use_fused=False)
    torch.testing.assert_close(fused, plain, rtol=0, atol=0, equal_nan=True)
    g = torch.randn_like(x)
    fused.backward(g)
    plain.backward(g)
    assert torch.equal(x1.grad, x2.grad)


def test_clipped_ste_gradient_closed_form():
    spec = QuantSpec(bits=4, signed=False)
    x = torch.tensor([-1.0, 0.0, 0.7, 1.4, 1.6, 5.0], requires_grad=True)
    s, z = torch.tensor(0.1), torch.tensor(0, dtype=torch.int32)
    fake_quantize(x, s, z, spec, use_fused=False).sum().backward()
    # codes: -10 (out), 0, 7, 14, 16 (out, > 15), 50 (out)
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def test_bfloat16_input_keeps_dtype_and_matches_float():
    spec = QuantSpec(signed=False)
    x = torch.randn(64).bfloat16()
    s, z = torch.tensor(0.02), torch.tensor(100, dtype=torch.int32)
    out = fake_quantize(x, s, z, spec)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, fake_quantize(x.float(), s, z, spec).bfloat16())


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_compiled_per_tensor_range_reads_memory_in_order(memory_format):
    """Under torch.compile (dynamic shapes, fullgraph) the per-tensor range reduces x permuted into its memory
    order, which inductor reduces at memory speed (a channels_last tensor in its own dim order was ~10x slower
    on the GPU), with eager's values for every batch size."""
    spec = QuantSpec(bits=8, signed=False)
    permutes = []

    def backend(graph, example_inputs):
        permutes.extend(tuple(node.args[1]) for node in graph.graph.nodes if node.target == "permute")
        return graph.forward

    compiled = torch.compile(lambda x: reduced_aminmax(x, spec), backend=backend, dynamic=True, fullgraph=True)
    for batch in (8, 5, 3):
        x = torch.randn(batch, 6, 7, 9).contiguous(memory_format=memory_format)
        for got, want in zip(compiled(x), reduced_aminmax(x, spec), strict=True):
            assert torch.equal(got, want)
    want_order = (0, 2, 3, 1) if memory_format is torch.channels_last else (0, 1, 2, 3)
    assert permutes == [want_order]
