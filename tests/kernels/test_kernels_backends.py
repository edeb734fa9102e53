"""Every backend of the table against the reference backend, on random int8 data."""
from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from kernel_cases import (
    BACKEND_PARAMS,
    OnBackend,
    activation_qmax,
    activation_qparams,
    assert_float_agree,
    assert_quantized_agree,
    fitted_qparams,
    random_activation,
    random_weight,
)

from qat.kernels.reference import ReferenceBackend, requantize
from qat.kernels.types import ActQParams, AttentionGrids, ConvGeometry, Int8Weight

REF = ReferenceBackend()
OUTPUTS = ["float", "float_relu", "quant", "quant_relu"]

# (activation shape, out features, per-channel weight, bias)
LINEAR_CASES = [((1, 16), 8, True, True), ((5, 13), 7, True, False), ((33, 64), 40, False, True),
                ((64, 100), 30, True, True), ((2, 3, 24), 9, True, True), ((17, 8), 1, True, False)]

# (N, C, H, W, out, kernel, stride, padding, dilation, groups, channels_last)
CONV_CASES = [
    (2, 3, 17, 17, 16, 7, 2, 3, 1, 1, False),  # resnet stem, C=3
    (1, 8, 9, 9, 8, 3, 1, 1, 1, 1, True),
    (2, 13, 10, 10, 6, 3, 2, 1, 1, 1, False),  # channels not multiple of 8, stride 2
    (1, 16, 12, 12, 24, 1, 1, 0, 1, 1, True),  # 1x1
    (1, 16, 12, 12, 24, 1, 2, 0, 1, 1, False),  # 1x1 stride 2 (downsample)
    (1, 12, 11, 11, 12, 3, 1, 2, 2, 1, True),  # dilation
    (1, 12, 10, 10, 18, 3, 1, 1, 1, 3, False),  # groups
    (2, 16, 10, 10, 16, 3, 2, 1, 1, 16, True),  # depthwise
    (1, 5, 8, 8, 7, 5, 1, 2, 1, 1, False),  # 5x5, odd channels
    (1, 40, 7, 7, 20, 3, 2, 1, 1, 1, True),  # tap-major, channels padded per tap (40 -> 64)
    (2, 64, 6, 5, 72, 3, 1, 1, 1, 1, True),  # tap-major, channels a multiple of every K step
    (1, 24, 5, 5, 10, 1, 1, 0, 1, 1, False),  # 1x1 stride 1 on NCHW input: the conv kernel, not the GEMM
    (1, 8, 9, 9, 12, 3, 1, 1, 1, 4, True),  # groups with 3 outputs per group
    (1, 6, 9, 9, 6, 5, 1, 4, 2, 6, False),  # depthwise 5x5, dilation 2, NCHW
    (2, 3, 32, 32, 8, 16, 16, 0, 1, 1, True),  # ViT patch embedding: row-packed, 64-byte kernel rows
    (1, 16, 12, 12, 8, 9, 1, 4, 1, 1, True),  # few channels but 9 x 16-channel taps per row: tap-major
    (2, 32, 9, 9, 20, 1, 2, 0, 1, 1, True),  # 1x1 stride 2 on channels_last: subsampled rows, GEMM
]

# (N, C, H, W, out, kernel, stride, padding, output_padding, groups, per-channel)
CONV_TRANSPOSE_CASES = [(1, 8, 5, 5, 6, 3, 2, 1, 1, 1, False), (2, 8, 6, 6, 4, 4, 2, 1, 0, 2, True),
                        (1, 4, 7, 7, 8, 3, 1, 1, 0, 1, True)]


def _finish_case(on, op, inputs, out, signed, **kwargs):
    """Run ``op`` on the reference (CPU) and on ``on`` with output qparams fitted to the float result."""
    ref_op, be_op = getattr(REF, op), getattr(on.backend, op)
    relu = out.endswith("relu")
    y_ref = ref_op(*inputs["ref"], out_qp=None, relu=relu, **kwargs)
    if out.startswith("float"):
        assert_float_agree(on.back(be_op(*inputs["backend"], out_qp=None, relu=relu, **kwargs), None), y_ref)
        return
    out_qp = fitted_qparams(y_ref, signed)
    expected = ref_op(*inputs["ref"], out_qp=out_qp, relu=relu, **kwargs)
    got = on.back(be_op(*inputs["backend"], out_qp=out_qp, relu=relu, **kwargs), out_qp)
    assert_quantized_agree(got, expected)


@pytest.mark.parametrize("out", OUTPUTS)
@pytest.mark.parametrize("signed", [False, True], ids=["u8", "s8"])
@pytest.mark.parametrize("x_shape,n,per_channel,with_bias", LINEAR_CASES)
@pytest.mark.parametrize("backend_name", BACKEND_PARAMS)
def test_linear(backend_name, x_shape, n, per_channel, with_bias, signed, out):
    on = OnBackend(backend_name)
    x_qp = activation_qparams(signed, activation_qmax(backend_name))
    x = random_activation(x_shape, x_qp)
    weight = random_weight((n, x_shape[-1]), per_channel)
    bias = torch.randn(n) if with_bias else None
    inputs = {"ref": (x, x_qp, REF.pack_linear(weight, bias)),
              "backend": (on.act(x, x_qp), x_qp, on.backend.pack_linear(weight, bias))}
    _finish_case(on, "linear", inputs, out, signed)


@pytest.mark.parametrize("out", OUTPUTS)
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "x".join(map(str, c[:10])))
@pytest.mark.parametrize("backend_name", BACKEND_PARAMS)
def test_conv2d(backend_name, case, out):
    n, c, h, w, k, kernel, stride, padding, dilation, groups, channels_last = case
    on = OnBackend(backend_name)
    x_qp = activation_qparams(False, activation_qmax(backend_name))
    x = random_activation((n, c, h, w), x_qp)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = random_weight((k, c // groups, kernel, kernel))
    bias = torch.randn(k)
    geometry = ConvGeometry(stride=stride, padding=padding, dilation=dilation, groups=groups)
    inputs = {"ref": (x, x_qp, REF.pack_conv2d(weight, bias, geometry)),
              "backend": (on.act(x, x_qp), x_qp, on.backend.pack_conv2d(weight, bias, geometry))}
    _finish_case(on, "conv2d", inputs, out, signed=False)


@pytest.mark.parametrize("out", OUTPUTS)
@pytest.mark.parametrize("case", CONV_TRANSPOSE_CASES, ids=lambda c: "x".join(map(str, c[:10])))
@pytest.mark.parametrize("backend_name", BACKEND_PARAMS)
def test_conv_transpose2d(backend_name, case, out):
    n, c, h, w, k, kernel, stride, padding, output_padding, groups, per_channel = case
    on = OnBackend(backend_name)
    x_qp = activation_qparams(False, activation_qmax(backend_name))
    x = random_activation((n, c, h, w), x_qp)
    weight = random_weight((c, k // groups, kernel, kernel), per_channel, channels=k)
    geometry = ConvGeometry(stride=stride, padding=padding, groups=groups, output_padding=output_padding)
    bias = torch.randn(k)
    inputs = {"ref": (x, x_qp, REF.pack_conv_transpose2d(weight, bias, geometry)),
              "backend": (on.act(x, x_qp), x_qp, on.backend.pack_conv_transpose2d(weight, bias, geometry))}
    _finish_case(on, "conv_transpose2d", inputs, out, signed=False)


BINARY_SHAPES = [((2, 8, 6, 6), (2, 8, 6, 6)), ((3, 50), (3, 50)), ((2, 8, 5, 5), (2, 8, 1, 1))]


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("signed", [False, True], ids=["u8", "s8"])
@pytest.mark.parametrize("shapes", BINARY_SHAPES, ids=str)
@pytest.mark.parametrize("op", ["add", "mul"])
@pytest.mark.parametrize("backend_name", BACKEND_PARAMS)
def test_add_mul(backend_name, op, shapes, signed, relu):
    on = OnBackend(backend_name)
    a_qp, b_qp = activation_qparams(signed, scale=0.03), activation_qparams(signed, scale=0.05)
    a, b = random_activation(shapes[0], a_qp), random_activation(shapes[1], b_qp)
    out_qp = fitted_qparams(_float_binary(op, a, a_qp, b, b_qp), signed)
    expected = getattr(REF, op)(a, a_qp, b, b_qp, out_qp, relu)
    got = getattr(on.backend, op)(on.act(a, a_qp), a_qp, on.act(b, b_qp), b_qp, out_qp, relu)
    assert_quantized_agree(on.back(got, out_qp), expected)


def _float_binary(op, a, a_qp, b, b_qp):
    fa, fb = REF.dequantize(a, a_qp), REF.dequantize(b, b_qp)
    return fa * fb if op == "mul" else fa + fb


@pytest.mark.parametrize("same_qparams", [False, True])
@pytest.mark.parametrize("backend_name", BACKEND_PARAMS)
def test_cat(backend_name, same_qparams):
    on = OnBackend(backend_name)
    shapes = [(2, 3, 4, 5), (2, 6, 4, 5), (2, 1, 4, 5)]
    qps = [activation_qparams(False, scale=0.02 if same_qparams else 0.01 * (i + 1)) for i in range(3)]
    if same_qparams:
        qps = [qps[0]] * 3
    tensors = [random_activation(s, qp) for s, qp in zip(shapes, qps)]
    out_qp = qps[0] if same_qparams else activation_qparams(False, scale=0.025)
    expected = REF.cat(tensors, qps, 1, out_qp)
    got = on.backend.cat([on.act(t, qp) for t, qp in zip(tensors, qps)], qps, 1, out_qp)
    assert_quantized_agree(on.back(got, out_qp), expected)


MATMUL_SHAPES = [((2, 3, 20, 24), (2, 3, 24, 18)), ((40, 33), (33, 7)), ((20, 16), (4, 16, 18)),
                 ((2, 2, 3, 5, 8), (2, 1, 3, 8, 4))]


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # (N, L, E) -> (N, H, L, E/H) view


@pytest.mark.parametrize("backend_name", BACKEND_PARAMS)
def test_attention_matmuls_on_head_views(backend_name):
    """q @ k^T and weights @ v on head-split views of (N, L, E) tensors (transposed, non-contiguous, as
    attention makes them) equal the reference; weights @ v comes back in v's layout, so merging the heads
    back, (N, H, L, D) -> (N, L, E), is a view."""
    on = OnBackend(backend_name)
    qp, w_qp = activation_qparams(False, scale=0.05), activation_qparams(False, scale=0.004)
    q, k, v = (random_activation((2, 7, 12), qp) for _ in range(3))
    weights = random_activation((2, 3, 7, 7), w_qp)
    for a, a_qp, b in ((_heads(q, 3), qp, _heads(k, 3).transpose(-2, -1)), (weights, w_qp, _heads(v, 3))):
        got = on.backend.matmul(on.act(a, a_qp), a_qp, on.act(b, qp), qp, None)
        assert_float_agree(on.back(got, None), REF.matmul(a, a_qp, b, qp))
    if backend_name == "cuda":
        merged = got.transpose(1, 2)
        assert merged.reshape(2, 7, 12).data_ptr() == got.data_ptr() and merged.is_contiguous()


@pytest.mark.parametrize("out", ["float", "quant"])
@pytest.mark.parametrize("signs", [(False, False), (True, False), (True, True)], ids=["u8u8", "s8u8", "s8s8"])
@pytest.mark.parametrize("shapes", MATMUL_SHAPES, ids=str)
@pytest.mark.parametrize("backend_name", BACKEND_PARAMS)
def test_matmul(backend_name, shapes, signs, out):
    on = OnBackend(backend_name)
    a_qp, b_qp = activation_qparams(signs[0], scale=0.03), activation_qparams(signs[1], scale=0.02)
    a, b = random_activation(shapes[0], a_qp), random_activation(shapes[1], b_qp)
    y_ref = REF.matmul(a, a_qp, b, b_qp)
    out_qp = None if out == "float" else fitted_qparams(y_ref, signs[0])
    got = on.back(on.backend.matmul(on.act(a, a_qp), a_qp, on.act(b, b_qp), b_qp, out_qp), out_qp)
    if out_qp is None:
        assert_float_agree(got, y_ref)
    else:
        assert_quantized_agree(got, REF.matmul(a, a_qp, b, b_qp, out_qp))


# (batch dims, query rows, keys, head dim): ViT-B/16's 197 keys on head-split views of (N, L, E); short odd
# rows; a head dim no power of two; no batch dims; more keys than one program holds (the unfused path)
ATTENTION_CASES = [((2, 3), 197, 197, 64), ((1, 2), 7, 7, 12), ((3,), 5, 9, 40), ((), 17, 17, 8),
                   ((2, 1), 3, 300, 16)]


def _attention_inputs(batch, rows, keys, d, signed):
    qp = [activation_qparams(signed, scale=s) for s in (0.05, 0.04, 0.03)]
    if len(batch) == 2 and rows == keys:  # head-split views of (N, L, E) tensors, as attention makes them
        q, k, v = (_heads(random_activation((batch[0], rows, batch[1] * d), a_qp), batch[1]) for a_qp in qp)
    else:
        q, k, v = (random_activation((*batch, n, d), a_qp) for n, a_qp in zip((rows, keys, keys), qp))
    return (q, k.transpose(-2, -1), v), qp


@pytest.mark.parametrize("out", ["float", "quant"])
@pytest.mark.parametrize("signed", [False, True], ids=["u8", "s8"])
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=str)
@pytest.mark.parametrize("backend_name", BACKEND_PARAMS)
def test_attention(backend_name, case, signed, out):
    """softmax(q @ k^T relabelled by 1/8) @ v equals the unfused reference graph (within 1 LSB: the fused
    kernel's softmax sums in another order); probabilities on uint8, or int8 with zero point -128."""
    on = OnBackend(backend_name)
    (q, k_t, v), (q_qp, k_qp, v_qp) = _attention_inputs(*case, signed)
    scores = fitted_qparams(REF.matmul(q, q_qp, k_t, k_qp), signed)
    probs = ActQParams(1 / 127, -128, -128, 127) if signed else ActQParams(1 / 255, 0, 0, 255)
    grids = AttentionGrids(q_qp, k_qp, scores, dataclasses.replace(scores, scale=scores.scale / 8), probs, v_qp)
    y_ref = REF.attention(q, k_t, v, grids)
    out_qp = None if out == "float" else fitted_qparams(y_ref, signed)
    expected = REF.attention(q, k_t, v, grids, out_qp)
    got = on.back(on.backend.attention(on.act(q, q_qp), on.act(k_t, k_qp), on.act(v, v_qp), grids, out_qp), out_qp)
    if out_qp is None:
        assert_float_agree(got, expected)
    else:
        assert_quantized_agree(got, expected)
    if backend_name == "cuda" and len(case[0]) == 2 and case[1] == case[2]:  # heads merge back without a copy
        assert got.transpose(1, 2).is_contiguous()


ROUND_TRIP_QPARAMS = [ActQParams(0.05, 7, 0, 255), ActQParams(0.05, 0, 0, 127), ActQParams(0.1, -3, -127, 127)]


@pytest.mark.parametrize("qp", ROUND_TRIP_QPARAMS, ids=["u8", "u8_reduce_range", "s8_narrow"])
@pytest.mark.parametrize("backend_name", BACKEND_PARAMS)
def test_quantize_dequantize_round_trip(backend_name, qp):
    on = OnBackend(backend_name)
    x = torch.randn(2, 3, 5, 5) * 6
    q = on.backend.quantize(x.to(on.device), qp)
    assert torch.equal(on.back(q, qp), REF.quantize(x, qp))
    assert torch.equal(on.backend.dequantize(q, qp).cpu(), REF.dequantize(REF.quantize(x, qp), qp))


@pytest.mark.parametrize("backend_name", BACKEND_PARAMS)
def test_narrow_output_range_is_clamped(backend_name):
    """A reduce-range output ([0, 127]) must be clamped to 127 even where the dtype would allow more."""
    on = OnBackend(backend_name)
    x_qp = activation_qparams(False, activation_qmax(backend_name))
    x = random_activation((40, 32), x_qp)
    weight, bias = random_weight((16, 32)), torch.randn(16)
    y = REF.linear(x, x_qp, REF.pack_linear(weight, bias))
    out_qp = ActQParams(scale=float(y.abs().max()) / 200, zero_point=40, qmin=0, qmax=127)  # saturates often
    expected = REF.linear(x, x_qp, REF.pack_linear(weight, bias), out_qp)
    got = on.back(on.backend.linear(on.act(x, x_qp), x_qp, on.backend.pack_linear(weight, bias), out_qp), out_qp)
    assert int(expected.max()) == 127 and int(got.max()) == 127
    assert_quantized_agree(got, expected)


@pytest.mark.parametrize("backend_name", BACKEND_PARAMS)
def test_exact_ties_round_half_to_even(backend_name):
    """s_x = 1, s_w = 0.5, s_out = 1: every odd accumulator lands exactly on .5 and must round to even."""
    on = OnBackend(backend_name)
    x_qp = ActQParams(scale=1.0, zero_point=0, qmin=0, qmax=255)
    x = torch.randint(0, 4, (64, 24), dtype=torch.uint8)
    weight = Int8Weight(q=torch.randint(-3, 4, (16, 24), dtype=torch.int8), scale=torch.full((16,), 0.5))
    out_qp = ActQParams(scale=1.0, zero_point=100, qmin=0, qmax=255)
    expected = REF.linear(x, x_qp, REF.pack_linear(weight, None), out_qp)
    acc = x.int() @ weight.q.int().T
    assert bool((acc % 2 == 1).any())  # the case really has ties
    assert torch.equal(expected.int(), torch.round(acc / 2).int() + 100)
    got = on.back(on.backend.linear(on.act(x, x_qp), x_qp, on.backend.pack_linear(weight, None), out_qp), out_qp)
    assert torch.equal(got, expected)


def test_fbgemm_depthwise_full_range_inputs_do_not_saturate():
    """fbgemm's own depthwise kernel saturates int16 pairs for u8 inputs near 255; the backend must not."""
    from qat.kernels import ActQParams, ConvGeometry, Int8Weight, get_backend

    ref, fb = get_backend("reference"), get_backend("fbgemm")
    channels = 144
    gen = torch.Generator().manual_seed(0)
    weight = Int8Weight(torch.randint(-127, 128, (channels, 1, 3, 3), dtype=torch.int8, generator=gen),
                        torch.rand(channels, generator=gen) * 0.01 + 1e-3)
    geometry = ConvGeometry(1, 1, 1, channels)
    x = torch.randint(200, 256, (4, channels, 8, 8), dtype=torch.uint8, generator=gen)
    x_qp, out_qp = ActQParams(0.02, 0, 0, 255), ActQParams(0.05, 0, 0, 255)
    expected = ref.conv2d(x, x_qp, ref.pack_conv2d(weight, None, geometry), out_qp)
    got = fb.from_backend(fb.conv2d(fb.to_backend(x, x_qp), x_qp, fb.pack_conv2d(weight, None, geometry), out_qp), out_qp)
    assert (expected.int() - got.int()).abs().max().item() <= 1


# (N, C, H, W, out, kernel, stride, padding, groups, other channels_last)
CONV_ADD_CASES = [
    (2, 16, 6, 6, 24, 1, 1, 0, 1, True),  # 1x1 bottleneck expansion: the GEMM path
    (1, 40, 7, 7, 36, 3, 1, 1, 1, True),  # 3x3: the implicit-GEMM path
    (1, 3, 9, 9, 8, 3, 2, 1, 1, False),  # row-packed few-channel conv, residual in NCHW memory
    (1, 8, 6, 6, 8, 3, 1, 1, 8, True),  # depthwise: composed, not fused
]


@pytest.mark.parametrize("relus", [(False, False), (False, True), (True, True)], ids=["plain", "relu", "both"])
@pytest.mark.parametrize("case", CONV_ADD_CASES, ids=lambda c: "x".join(map(str, c[:9])))
@pytest.mark.parametrize("backend_name", BACKEND_PARAMS)
def test_conv2d_add_matches_unfused_graph(backend_name, case, relus):
    """conv2d_add == conv2d requantized to conv_qp, then add requantized to out_qp (the reference's composition)."""
    n, c, h, w, k, kernel, stride, padding, groups, other_channels_last = case
    conv_relu, relu = relus
    on = OnBackend(backend_name)
    x_qp = activation_qparams(False, activation_qmax(backend_name))
    x = random_activation((n, c, h, w), x_qp).contiguous(memory_format=torch.channels_last)
    weight, bias = random_weight((k, c // groups, kernel, kernel)), torch.randn(k)
    packed_ref = REF.pack_conv2d(weight, bias, ConvGeometry(stride=stride, padding=padding, groups=groups))
    y = REF.conv2d(x, x_qp, packed_ref)
    conv_qp = fitted_qparams(y)
    other_qp = activation_qparams(False, activation_qmax(backend_name), scale=0.03)
    other = random_activation(y.shape, other_qp)
    if other_channels_last:
        other = other.contiguous(memory_format=torch.channels_last)
    out_qp = fitted_qparams(REF.dequantize(REF.conv2d(x, x_qp, packed_ref, conv_qp), conv_qp) * 2, signed=False)
    expected = REF.conv2d_add(x, x_qp, packed_ref, conv_qp, other, other_qp, out_qp, relu, conv_relu)
    packed = on.backend.pack_conv2d(weight, bias, packed_ref.geometry)
    got = on.backend.conv2d_add(on.act(x, x_qp), x_qp, packed, conv_qp, on.act(other, other_qp), other_qp, out_qp,
                                relu, conv_relu)
    assert_quantized_agree(on.back(got, out_qp), expected)
    if relu:
        assert int(expected.min()) >= out_qp.zero_point


# (input shape, out features, residual shape): tokens of a transformer block; a residual broadcast over the rows
# (composed, not fused)
LINEAR_ADD_CASES = [((2, 9, 40), 24, (2, 9, 24)), ((5, 16), 16, (5, 16)), ((3, 7, 12), 20, (20,))]


@pytest.mark.parametrize("relus", [(False, False), (False, True), (True, True)], ids=["plain", "relu", "both"])
@pytest.mark.parametrize("case", LINEAR_ADD_CASES, ids=str)
@pytest.mark.parametrize("backend_name", BACKEND_PARAMS)
def test_linear_add_matches_unfused_graph(backend_name, case, relus):
    """linear_add == linear requantized to linear_qp, then add requantized to out_qp (the reference's composition)."""
    x_shape, k, other_shape = case
    linear_relu, relu = relus
    on = OnBackend(backend_name)
    x_qp = activation_qparams(False, activation_qmax(backend_name))
    x = random_activation(x_shape, x_qp)
    weight, bias = random_weight((k, x_shape[-1])), torch.randn(k)
    packed_ref = REF.pack_linear(weight, bias)
    linear_qp = fitted_qparams(REF.linear(x, x_qp, packed_ref))
    other_qp = activation_qparams(False, activation_qmax(backend_name), scale=0.03)
    other = random_activation(other_shape, other_qp)
    out_qp = fitted_qparams(REF.dequantize(REF.linear(x, x_qp, packed_ref, linear_qp), linear_qp) * 2, signed=False)
    expected = REF.linear_add(x, x_qp, packed_ref, linear_qp, other, other_qp, out_qp, relu, linear_relu)
    got = on.backend.linear_add(on.act(x, x_qp), x_qp, on.backend.pack_linear(weight, bias), linear_qp,
                                on.act(other, other_qp), other_qp, out_qp, relu, linear_relu)
    assert_quantized_agree(on.back(got, out_qp), expected)
    if relu:
        assert int(expected.min()) >= out_qp.zero_point


# (MaxPool2d arguments, channels_last input)
MAX_POOL_CASES = [(dict(kernel_size=3, stride=2, padding=1), True), (dict(kernel_size=2), True),
                  (dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), ceil_mode=True), True),
                  (dict(kernel_size=3, stride=1, padding=1, dilation=2), False)]


def test_pool_output_size_is_torchs():
    """The cuda max-pool's output extent, ceil_mode included, against torch's on every small geometry."""
    from qat.kernels.cuda import _pool_output_size

    for size, k, s, p, d, ceil in itertools.product(range(1, 12), range(1, 5), range(1, 4), range(3), (1, 2),
                                                    (False, True)):
        if p <= k // 2 and d * (k - 1) + 1 <= size + 2 * p:
            expected = torch.nn.functional.max_pool1d(torch.zeros(1, 1, size), k, s, p, d, ceil).shape[-1]
            assert _pool_output_size(size, k, s, p, d, ceil) == expected, (size, k, s, p, d, ceil)


@pytest.mark.parametrize("signed", [False, True], ids=["u8", "s8"])
@pytest.mark.parametrize("case", MAX_POOL_CASES, ids=str)
@pytest.mark.parametrize("backend_name", BACKEND_PARAMS)
def test_max_pool_on_codes_matches_dequantize_pool_quantize(backend_name, case, signed):
    """Max-pooling the codes equals dequantize, pool, quantize (padding taking no part), any geometry."""
    on = OnBackend(backend_name)
    kwargs, channels_last = case
    qp = activation_qparams(signed, activation_qmax(backend_name))
    x = random_activation((2, 70, 9, 10), qp)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    pool = torch.nn.MaxPool2d(**kwargs)
    expected = REF.quantize(pool(REF.dequantize(x, qp)), qp)
    t = on.act(x, qp)
    got = on.backend.grid_op(pool, t, (), {})
    got = on.backend.quantize(pool(on.backend.dequantize(t, qp)), qp) if got is None else got
    assert torch.equal(on.back(got, qp), expected)


# (shape, affine); widths in power-of-two column chunks: 48 and 768 exactly, 20 one chunk past the row, 33 two,
# 100 three (only the last chunk masks its columns)
LAYER_NORM_CASES = [((2, 7, 48), True), ((6, 20), False), ((5, 100), True), ((3, 33), False), ((1, 4, 768), True),
                    ((37, 9, 768), True)]  # the last: 42 loop steps of 8 rows, more than the interpreter's 8 programs


@pytest.mark.parametrize("out", ["float", "quant"])
@pytest.mark.parametrize("signed", [False, True], ids=["u8", "s8"])
@pytest.mark.parametrize("shape, affine", LAYER_NORM_CASES, ids=str)
@pytest.mark.parametrize("backend_name", BACKEND_PARAMS)
def test_layer_norm(backend_name, shape, affine, signed, out):
    """LayerNorm of the dequantized codes (over the last dim, odd widths included), requantized or float."""
    on = OnBackend(backend_name)
    in_qp = activation_qparams(signed, scale=0.05)
    q = random_activation(shape, in_qp)
    weight, bias = (torch.randn(shape[-1]), torch.randn(shape[-1])) if affine else (None, None)
    on_device = [None if t is None else t.to(on.device) for t in (weight, bias)]
    y_ref = REF.layer_norm(q, in_qp, weight, bias, 1e-6, None)
    if out == "float":
        assert_float_agree(on.back(on.backend.layer_norm(on.act(q, in_qp), in_qp, *on_device, 1e-6, None), None), y_ref)
        return
    out_qp = fitted_qparams(y_ref, signed)
    got = on.back(on.backend.layer_norm(on.act(q, in_qp), in_qp, *on_device, 1e-6, out_qp), out_qp)
    assert_quantized_agree(got, REF.layer_norm(q, in_qp, weight, bias, 1e-6, out_qp))


@pytest.mark.parametrize("backend_name", BACKEND_PARAMS)
def test_layer_norm_of_constant_rows_is_the_bias(backend_name):
    """A row of one code has zero variance: every output is the bias (no NaN from the variance's rounding)."""
    on = OnBackend(backend_name)
    in_qp, out_qp = ActQParams(0.05, 3, -128, 127), ActQParams(0.02, 0, -128, 127)
    q = torch.tensor([[-128] * 100, [127] * 100, [3] * 100], dtype=torch.int8)
    bias = torch.linspace(-1.0, 1.0, 100)
    got = on.back(on.backend.layer_norm(on.act(q, in_qp), in_qp, torch.ones(100, device=on.device),
                                        bias.to(on.device), 1e-6, out_qp), out_qp)
    assert torch.equal(got, requantize(bias, out_qp).expand(3, 100))


# (shape): attention rows (197 keys), a short odd row, a wide row, one row
SOFTMAX_SHAPES = [(2, 3, 5, 197), (7, 13), (3, 1000), (1, 1)]


@pytest.mark.parametrize("out", ["float", "quant"])
@pytest.mark.parametrize("signed", [False, True], ids=["u8", "s8"])
@pytest.mark.parametrize("shape", SOFTMAX_SHAPES, ids=str)
@pytest.mark.parametrize("backend_name", BACKEND_PARAMS)
def test_softmax(backend_name, shape, signed, out):
    """Softmax over the last dim of the dequantized codes, requantized (probabilities on uint8) or float."""
    on = OnBackend(backend_name)
    in_qp = activation_qparams(signed, scale=0.08)
    q = random_activation(shape, in_qp)
    y_ref = REF.softmax(q, in_qp, None)
    torch.testing.assert_close(y_ref.sum(-1), torch.ones(shape[:-1]))
    if out == "float":
        assert_float_agree(on.back(on.backend.softmax(on.act(q, in_qp), in_qp, None), None), y_ref)
        return
    out_qp = ActQParams(scale=1 / 255, zero_point=0, qmin=0, qmax=255)
    expected = REF.softmax(q, in_qp, out_qp)
    assert torch.equal(expected, REF.quantize(y_ref, out_qp))
    assert_quantized_agree(on.back(on.backend.softmax(on.act(q, in_qp), in_qp, out_qp), out_qp), expected)


@pytest.mark.parametrize("out", ["float", "quant"])
@pytest.mark.parametrize("signed", [False, True], ids=["u8", "s8"])
@pytest.mark.parametrize("backend_name", BACKEND_PARAMS)
def test_lookup(backend_name, signed, out):
    """Every code reads the table entry its 8 bits index (int8 -1 reads entry 255), in the input's layout: a
    GELU table equals GELU of the dequantized codes."""
    on = OnBackend(backend_name)
    in_qp = activation_qparams(signed)
    q = random_activation((2, 6, 5, 7), in_qp)
    q.view(-1)[:2] = torch.tensor([in_qp.qmin, in_qp.qmax], dtype=in_qp.dtype)
    q = q.contiguous(memory_format=torch.channels_last)
    values = torch.nn.functional.gelu(REF.dequantize(torch.arange(256, dtype=torch.uint8).view(in_qp.dtype), in_qp))
    out_qp = None if out == "float" else activation_qparams(signed)
    table = values if out_qp is None else REF.quantize(values, out_qp)
    got = on.back(on.backend.lookup(on.act(q, in_qp), in_qp, table.to(on.device), out_qp), out_qp)
    expected = torch.nn.functional.gelu(REF.dequantize(q, in_qp))  # torch's GELU loops differ by ~1e-7
    if out_qp is None:
        assert_float_agree(got, expected)
    else:
        assert_quantized_agree(got, REF.quantize(expected, out_qp))
    assert got.stride() == q.stride()
