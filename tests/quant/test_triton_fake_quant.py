"""The fused Triton fake-quant equals the pure-torch reference: values, gradients of x, scale and zero point,
and a few training steps of a prepared model. Under torch.compile its compiler operators (opcheck) give the
eager results, with no graph break and with dynamic batch sizes.

On CUDA the kernels run natively: forward bit-exact in float32 and bfloat16. Without CUDA they run in
Triton's interpreter (TRITON_INTERPRET=1) on tiny CPU tensors; the interpreter stores bfloat16 by
truncation instead of rounding to nearest, so there bfloat16 outputs are compared within one bfloat16 ulp.
"""
import copy
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import qat
from qat.quant.affine import fake_quantize, fused_kernels, storage_order
from qat.quant.fake_quantize import QuantizerBase
from qat.quant.learnable import lsq_fake_quantize, lsq_grad_scale
from qat.quant.spec import Granularity, QuantSpec

pytest.importorskip("triton")
ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
BF16_ULP = 2.0**-7  # one bfloat16 ulp, relative to the value (at most)

AFFINE_SPECS = {
    "u8_tensor": QuantSpec(bits=8, signed=False),
    "s8_sym_tensor": QuantSpec(bits=8, signed=True, symmetric=True),
    "s8_sym_ch0": QuantSpec(bits=8, symmetric=True, narrow_range=True, granularity="per_channel", axis=0),
    "u8_ch1": QuantSpec(bits=8, signed=False, granularity="per_channel", axis=1),  # channel axis inner in memory
}
LSQ_SPECS = {
    "s4_sym_ch0": (QuantSpec(bits=4, symmetric=True, narrow_range=True, granularity="per_channel"), False),
    "u4_tensor_lsq_plus": (QuantSpec(bits=4, signed=False), True),
    "u8_tensor_lsq_plus": (QuantSpec(bits=8, signed=False), True),
    "s2_tensor": (QuantSpec(bits=2, signed=True), False),
}


def _input(shape, scale: torch.Tensor, spec: QuantSpec, dtype) -> torch.Tensor:
    """Values across and beyond the grid, with exact ties (k + 0.5) * s to exercise round-half-to-even."""
    x = torch.randn(shape) * 200 * float(scale.max())
    if spec.is_per_channel:
        s = scale.reshape([-1 if d == spec.axis else 1 for d in range(len(shape))])  # (C,) -> broadcast
    else:
        s = scale
    ties = (torch.randint(-130, 130, shape) + 0.5) * s
    x = torch.where(torch.rand(shape) < 0.3, ties, x)
    return x.to(DEVICE, dtype).contiguous(memory_format=torch.channels_last)


def _assert_same_output(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.dtype == expected.dtype and got.shape == expected.shape
    if got.dtype == torch.float32 or ON_CUDA:
        assert torch.equal(got, expected)
    else:  # interpreter: bfloat16 stores truncate
        torch.testing.assert_close(got.float(), expected.float(), rtol=BF16_ULP, atol=0)


def _leaf(t: torch.Tensor, requires_grad: bool = True) -> torch.Tensor:
    return t.detach().clone().requires_grad_(requires_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", AFFINE_SPECS)
def test_fixed_qparams_match_reference(fused_module, name, dtype):
    spec = AFFINE_SPECS[name]
    shape = (6, 5, 3, 4)
    channels = shape[spec.axis] if spec.is_per_channel else 1
    scale = (torch.rand(channels) * 0.05 + 0.01).reshape(-1 if spec.is_per_channel else ())
    zero = torch.randint(spec.qmin, spec.qmax + 1, scale.shape, dtype=torch.int32) if not spec.symmetric else \
        torch.zeros(scale.shape, dtype=torch.int32)
    x = _input(shape, scale, spec, dtype)
    scale, zero = scale.to(DEVICE), zero.to(DEVICE)
    x_fused, x_ref = _leaf(x), _leaf(x)
    y_fused = fused_module.fake_quantize(x_fused, scale, zero, spec)
    y_ref = fake_quantize(x_ref, scale, zero, spec, use_fused=False)
    _assert_same_output(y_fused, y_ref)
    if spec.axis != 1:  # channel rows contiguous in memory: no copy, channels_last in and out
        assert y_fused.stride() == x.stride()
    grad = torch.randn(y_ref.shape, device=DEVICE, dtype=dtype)  # contiguous, x channels_last: a copy in backward
    y_fused.backward(grad)
    y_ref.backward(grad)
    assert torch.equal(x_fused.grad, x_ref.grad) and x_fused.grad.stride() == x.stride()
    assert 0 < int((x_ref.grad == 0).sum()) < x.numel()  # the test clips some values and keeps others


@pytest.fixture(params=["spans", "blocks"])
def lsq_launch(request, monkeypatch, fused_module) -> str:
    """Both launches of the LSQ backward kernels: spans of several blocks per program (large tensors) and one
    block per program (tensors that would give fewer than LSQ_BACKWARD_MIN_SPANS programs)."""
    monkeypatch.setattr(fused_module, "LSQ_BACKWARD_MIN_SPANS", 0 if request.param == "spans" else 2**62)
    return request.param


def _assert_launch(fused_module, x: torch.Tensor, rows: int, launch: str) -> None:
    """The launch `lsq_launch` asked for; spans here loop over several blocks, the last one partly masked."""
    spans = fused_module._Spans.of(x, rows)
    assert (spans.tiles > 1) == (launch == "spans") and spans.row_len % (spans.block * spans.tiles) != 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", LSQ_SPECS)
def test_lsq_matches_reference(fused_module, lsq_launch, name, dtype):
    spec, learned_zero = LSQ_SPECS[name]
    shape = (4, 3, 15, 15) if spec.is_per_channel else (2, 3, 40, 50)  # per-tensor: 12000 = several blocks
    channels = shape[0] if spec.is_per_channel else 1
    scale = (torch.rand(channels) * 0.3 + 0.05).reshape(-1 if spec.is_per_channel else ())
    zero = torch.full(scale.shape, 3.4) if learned_zero else None
    x = _input(shape, scale, spec, dtype) * 0.02
    _assert_launch(fused_module, x, channels, lsq_launch)
    scale = scale.to(DEVICE)
    fused_args = (_leaf(x), _leaf(scale), None if zero is None else _leaf(zero.to(DEVICE)))
    ref_args = (_leaf(x), _leaf(scale), None if zero is None else _leaf(zero.to(DEVICE)))
    g = lsq_grad_scale(x, spec)
    y_fused = fused_module.lsq_fake_quantize(*fused_args, spec, g)
    with fused_kernels(False):
        y_ref = lsq_fake_quantize(*ref_args, spec)
    _assert_same_output(y_fused, y_ref)
    grad = torch.randn_like(y_ref)
    y_fused.backward(grad)
    y_ref.backward(grad)
    assert torch.equal(fused_args[0].grad, ref_args[0].grad)
    torch.testing.assert_close(fused_args[1].grad, ref_args[1].grad, rtol=1e-4, atol=1e-6)
    if learned_zero:
        torch.testing.assert_close(fused_args[2].grad, ref_args[2].grad, rtol=1e-4, atol=1e-6)
        assert fused_args[2].grad.abs().sum() > 0  # some codes clip, so the offset learns


@pytest.mark.parametrize("learned", [False, True], ids=["fixed", "lsq"])
def test_nan_and_inf_come_out_as_the_reference_gives_them(fused_module, learned):
    """NaN stays NaN (a diverging step shows in the loss instead of being clamped to a range bound); +-inf clamp."""
    spec = QuantSpec(bits=8, signed=False)
    x = torch.tensor([0.5, float("nan"), float("inf"), -float("inf"), 3.0], device=DEVICE)
    scale, zero = torch.tensor([0.02], device=DEVICE), torch.tensor([10], device=DEVICE, dtype=torch.int32)
    if learned:
        got = fused_module.lsq_fake_quantize(x, scale, zero.float(), spec, 1.0)
        with fused_kernels(False):
            want = lsq_fake_quantize(x, scale, zero.float(), spec, 1.0)
    else:
        got = fused_module.fake_quantize(x, scale, zero, spec)
        want = fake_quantize(x, scale, zero, spec, use_fused=False)
    torch.testing.assert_close(got, want, equal_nan=True)
    assert torch.isnan(got[1])


def test_lsq_scale_clamped_at_eps_gets_no_gradient(fused_module):
    spec = QuantSpec(bits=4, signed=False)
    x = torch.randn(300, device=DEVICE)
    scale = torch.tensor(-0.5, device=DEVICE, requires_grad=True)  # below eps: clamped, as in the reference
    fused_module.lsq_fake_quantize(x, scale, None, spec, 1.0).sum().backward()
    assert scale.grad.item() == 0.0


def _prepared_net(preset: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """(a small Conv-BN-ReLU net prepared with `preset` and calibrated, a batch of 8, its targets)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )
    x, target = torch.randn(8, 3, 8, 8, device=DEVICE), torch.randint(0, 4, (8,), device=DEVICE)
    prepared = qat.prepare(model.to(DEVICE), qat.QuantConfig.preset(preset), example_inputs=(x,))
    qat.calibrate(prepared, [x], freeze=preset != "w8a8")
    return prepared, x, target


def _sgd_losses(net: nn.Module, forward, x: torch.Tensor, target: torch.Tensor, batches: list[int]) -> list[float]:
    """The losses of SGD steps on net's parameters, `forward` run on the first `batch` rows of x per step."""
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for batch in batches:
        loss = nn.functional.cross_entropy(forward(x[:batch]), target[:batch])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("preset", ["w8a8", "w4a4_lsq"])
def test_training_steps_fused_match_reference(triton_on_cpu, preset):
    """A few SGD steps of a small prepared Conv-BN-ReLU net: the losses of both paths agree."""
    prepared, x, target = _prepared_net(preset)
    losses = {}
    for fused in (True, False):
        net = copy.deepcopy(prepared).train()
        with fused_kernels(fused), torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=ON_CUDA):
            losses[fused] = _sgd_losses(net, net, x, target, batches=[8] * 6)
    assert losses[True][-1] < losses[True][0]  # it trains
    # float32 on the CPU: equal up to the summation order of LSQ's scale gradients; bf16 convs on CUDA drift more
    rtol, atol = (2e-3, 1e-4) if ON_CUDA else (1e-5, 1e-6)
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("learned", [False, True], ids=["fixed", "lsq_plus"])
def test_folded_relu_equals_relu_then_fake_quant(fused_module, learned, dtype):
    """relu=True: the values and every gradient of torch.relu followed by the fake-quant (exact zeros and
    NaN included: relu's gradient is zero at 0, NaN stays NaN)."""
    spec = QuantSpec(bits=4 if learned else 8, signed=False)
    scale = torch.tensor(0.05)
    x = _input((4, 3, 6, 7), scale, spec, dtype) * (0.1 if learned else 0.01)
    zeros = (torch.arange(x.numel()) < 20).reshape(x.shape).to(DEVICE)
    nan = (torch.arange(x.numel()) == 25).reshape(x.shape).to(DEVICE)
    x = torch.where(zeros, 0.0, torch.where(nan, float("nan"), x)).to(dtype)
    scale = scale.to(DEVICE)
    zero = torch.tensor(2.6, device=DEVICE) if learned else torch.tensor(3, device=DEVICE, dtype=torch.int32)
    results = {}
    for folded in (True, False):
        xl, sl, zl = _leaf(x), _leaf(scale, learned), _leaf(zero, learned)
        if learned:
            args = (xl, sl, zl, spec, 0.3)
            y = fused_module.lsq_fake_quantize(*args, relu=True) if folded else fused_module.lsq_fake_quantize(
                torch.relu(xl), *args[1:])
        else:
            y = fused_module.fake_quantize(xl, sl, zl, spec, relu=True) if folded else fused_module.fake_quantize(
                torch.relu(xl), sl, zl, spec)
        y.backward(torch.linspace(-1, 1, y.numel(), device=DEVICE).reshape(y.shape).to(dtype))
        results[folded] = (y, xl.grad, sl.grad, zl.grad)
    (y, gx, gs, gz), (y_ref, gx_ref, gs_ref, gz_ref) = results[True], results[False]
    torch.testing.assert_close(y, y_ref, equal_nan=True, rtol=0, atol=0)
    assert bool(torch.isnan(y[nan]).all()) and torch.equal(gx, gx_ref)
    assert int((x < 0).sum()) > 0 and bool((gx[zeros] == 0).all()) and bool((gx[x > 0] != 0).any())
    if learned:
        assert torch.equal(gs, gs_ref) and torch.equal(gz, gz_ref)  # the same partial sums in the same order


CHAIN_CASES = {  # (first spec, its zero point or None, second spec, its zero point or None)
    "u8_then_u4_lsq_plus": (QuantSpec(bits=8, signed=False), 3.4, QuantSpec(bits=4, signed=False), 1.6),
    "s8_then_s4_lsq": (QuantSpec(bits=8, symmetric=True), None, QuantSpec(bits=4, symmetric=True), None),
    "u8_then_u2_mixed": (QuantSpec(bits=8, signed=False), None, QuantSpec(bits=2, signed=False), 0.7),
}


def _chain_results(fused_module, x, params, specs, relu: bool, chained: bool):
    """(y1, y2, grad_x, the four qparam gradients) of the chain, or of its two quantizers called in a row."""
    x = _leaf(x)
    params = [None if p is None else _leaf(p) for p in params]
    grids = [fused_module.LearnedGrid(params[2 * i], params[2 * i + 1], specs[i], 0.05 * (i + 1)) for i in (0, 1)]
    if chained:
        y1, y2 = fused_module.lsq_chain_fake_quantize(x, *grids, relu=relu)
    else:
        y1 = fused_module.lsq_fake_quantize(x, grids[0].scale, grids[0].zero_point, specs[0], 0.05, relu=relu)
        y2 = fused_module.lsq_fake_quantize(y1, grids[1].scale, grids[1].zero_point, specs[1], 0.1)
    ramp = torch.linspace(-1, 1, x.numel(), device=DEVICE).reshape(x.shape)
    (y1.float() * ramp).sum().add((y2.float() * ramp.flip(0)).sum()).backward()
    return y1, y2, x.grad, [None if p is None else p.grad for p in params]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("case", CHAIN_CASES)
def test_lsq_chain_is_the_two_quantizers_in_a_row(fused_module, lsq_launch, case, relu, dtype):
    """The chain's outputs and input gradient (y1's two gradients summed in y1's dtype, as autograd sums them)
    are those of the two LSQ calls in a row, bit for bit; the four qparam gradients up to the order in which
    the same block sums are added."""
    spec1, zero1, spec2, zero2 = CHAIN_CASES[case]
    scale1, scale2 = torch.tensor(0.03), torch.tensor(0.45)
    x = _input((4, 6, 5, 7), scale1, spec1, dtype)  # across both grids, both clamps reached
    _assert_launch(fused_module, x, 1, lsq_launch)
    params = [scale1, zero1, scale2, zero2]
    params = [None if p is None else torch.as_tensor(p).to(DEVICE) for p in params]
    chained, in_a_row = (_chain_results(fused_module, x, params, (spec1, spec2), relu, c) for c in (True, False))
    for got, want in zip(chained[:3], in_a_row[:3]):
        _assert_same_output(got, want)
    for got, want in zip(chained[3], in_a_row[3]):
        assert (got is None) == (want is None)
        if got is not None:  # the same block sums, summed up in another order (interpreter: bfloat16 truncation)
            torch.testing.assert_close(got, want, rtol=1e-5 if dtype == torch.float32 or ON_CUDA else 2e-2, atol=1e-7)
    assert bool((in_a_row[2] == 0).any()) and bool((in_a_row[2] != 0).any())


@pytest.mark.parametrize("read", ["y1", "y2"])
def test_lsq_chain_with_one_output_read(fused_module, read):
    """Where only one output is read (y1 read by nothing but fq2: a block's output before a downsampling block),
    the chain gives the two calls' gradients without a tensor of zeros for the other."""
    spec1, zero1, spec2, zero2 = CHAIN_CASES["u8_then_u4_lsq_plus"]
    x = _input((2, 6, 5, 7), torch.tensor(0.03), spec1, torch.float32)
    results = []
    for chained in (True, False):
        xl = _leaf(x)
        params = [_leaf(torch.tensor(v, device=DEVICE)) for v in (0.03, zero1, 0.45, zero2)]
        grids = [fused_module.LearnedGrid(params[0], params[1], spec1, 0.05),
                 fused_module.LearnedGrid(params[2], params[3], spec2, 0.1)]
        if chained:
            y1, y2 = fused_module.lsq_chain_fake_quantize(xl, *grids)
        else:
            y1 = fused_module.lsq_fake_quantize(xl, params[0], params[1], spec1, 0.05)
            y2 = fused_module.lsq_fake_quantize(y1, params[2], params[3], spec2, 0.1)
        (y1 if read == "y1" else y2).square().sum().backward()
        results.append([xl.grad] + [p.grad for p in params])
    for got, want in zip(*results):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert bool((results[0][0] != 0).any())


def test_lsq_chain_takes_per_tensor_grids_only(fused_module):
    spec = QuantSpec(bits=4, symmetric=True, granularity="per_channel")
    grid = fused_module.LearnedGrid(torch.full((3,), 0.1, device=DEVICE), None, spec, 0.1)
    with pytest.raises(ValueError, match="per-tensor grids, got per_channel"):
        fused_module.lsq_chain_fake_quantize(torch.randn(3, 4, device=DEVICE), grid, grid)


def _assert_compiled_equals_eager(function, x: torch.Tensor, params: list[torch.Tensor], forward_kernels: list[str],
                                  backward_kernels: list[str]) -> None:
    """`function` compiled (fullgraph) gives eager's output and input gradient bit for bit and the parameters'
    gradients up to summation order, running `forward_kernels` and `backward_kernels` (by name)."""
    def outputs_and_gradients(run):
        y, grad_x = _output_and_gradient(run, x)
        grads = [p.grad for p in params]
        for p in params:
            p.grad = None
        return y, grad_x, grads

    graphs = []
    compiled = torch.compile(function, backend=_recording_backend(graphs), fullgraph=True)
    (y, grad_x, grads), (y_eager, grad_x_eager, grads_eager) = map(outputs_and_gradients, (compiled, function))
    assert torch.equal(y, y_eager) and torch.equal(grad_x, grad_x_eager)
    for got, want in zip(grads, grads_eager, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    forward, backward = graphs
    assert _fused_calls(forward) == forward_kernels
    assert _fused_calls(backward) == backward_kernels


def test_compiled_lsq_chain_is_the_fused_kernels(fused_module):
    """Under torch.compile (fullgraph) the chain runs its two kernels, with eager's values and input gradient
    and its qparam gradients up to the summation order."""
    spec1, zero1, spec2, zero2 = CHAIN_CASES["u8_then_u4_lsq_plus"]
    x = _input((4, 3, 5, 5), torch.tensor(0.03), spec1, torch.float32)
    params = [_leaf(torch.tensor(v, device=DEVICE)) for v in (0.03, zero1, 0.45, zero2)]
    grids = [fused_module.LearnedGrid(params[0], params[1], spec1, 0.05),
             fused_module.LearnedGrid(params[2], params[3], spec2, 0.1)]

    def function(x):
        y1, y2 = fused_module.lsq_chain_fake_quantize(x, *grids, relu=True)
        return y1 + 2 * y2

    _assert_compiled_equals_eager(function, x, params, ["_chain_forward_kernel"], ["_chain_backward_kernel"])


def _op_samples() -> dict[str, tuple]:
    """Arguments for each torch.compile operator of the fused kernels (channels_last x; a folded ReLU)."""
    x = torch.randn(4, 3, 5, 5, device=DEVICE).contiguous(memory_format=torch.channels_last)
    x16 = torch.randn(4, 16, 5, 5, device=DEVICE).contiguous(memory_format=torch.channels_last)  # whole bytes
    scale, zero = torch.tensor([0.05], device=DEVICE), torch.tensor([10], device=DEVICE, dtype=torch.int32)
    channel_scale = torch.full((4,), 0.03, device=DEVICE)
    channel_zero = torch.zeros(4, device=DEVICE, dtype=torch.int32)
    y, bits = torch.ops.qat.fused_fake_quantize(x, scale, zero, 1, 0, 255, True)
    learned_zero = torch.tensor([9.6], device=DEVICE)
    return {
        "per_tensor_relu": (torch.ops.qat.fused_fake_quantize, (_leaf(x), scale, zero, 1, 0, 255, True)),
        "per_tensor_16_channels": (torch.ops.qat.fused_fake_quantize, (_leaf(x16), scale, zero, 1, 0, 255, False)),
        "per_channel": (torch.ops.qat.fused_fake_quantize, (_leaf(x), channel_scale, channel_zero, 4, -7, 7, False)),
        "bits_backward": (torch.ops.qat.fused_fake_quantize_bits_backward,
                          (torch.randn(4, 3, 5, 5, device=DEVICE), bits, 1, False)),
        "lsq_plus_per_tensor_relu": (torch.ops.qat.fused_lsq_fake_quantize,
                                     (_leaf(x), _leaf(scale), _leaf(learned_zero), 1, 0, 15, 0.0, 0.1, True)),
        "lsq_per_channel": (torch.ops.qat.fused_lsq_fake_quantize,
                            (_leaf(x), _leaf(channel_scale), None, 4, -8, 7, 0.0, 0.2, False)),
        "lsq_backward": (torch.ops.qat.fused_lsq_backward,
                         (torch.randn_like(x), x, scale, learned_zero, 1, 0, 15, 0.0, 0.1, False)),
        "lsq_chain_relu": (torch.ops.qat.fused_lsq_chain,
                           (_leaf(x), _leaf(scale), _leaf(learned_zero), _leaf(scale * 8), _leaf(learned_zero / 8),
                            0, 255, 0.0, 0.1, 0, 15, 0.0, 0.2, True)),
        "lsq_chain_no_zeros": (torch.ops.qat.fused_lsq_chain,
                               (_leaf(x), _leaf(scale), None, _leaf(scale * 8), None, -128, 127, 0.0, 0.1, -8, 7, 0.0,
                                0.2, False)),
        "lsq_chain_backward": (torch.ops.qat.fused_lsq_chain_backward,
                               (torch.randn_like(x), torch.randn_like(x), x, scale, learned_zero, scale * 8,
                                learned_zero / 8, 0, 255, 0.0, 0.1, 0, 15, 0.0, 0.2, False)),
    }


@pytest.mark.parametrize("case", ["per_tensor_relu", "per_tensor_16_channels", "per_channel", "bits_backward",
                                  "lsq_plus_per_tensor_relu",
                                  "lsq_per_channel", "lsq_backward", "lsq_chain_relu", "lsq_chain_no_zeros",
                                  "lsq_chain_backward"])
def test_compiler_operators_pass_opcheck(fused_module, case):
    """The operators torch.compile sees: schema, fake (meta) results, autograd registration, and AOT tracing
    with dynamic shapes give the eager results."""
    op, args = _op_samples()[case]
    results = torch.library.opcheck(op, args)
    assert set(results.values()) == {"SUCCESS"}, results


def _recording_backend(graphs: list):
    """AOT autograd keeping the forward and backward graphs it compiles (run as they are, like aot_eager)."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    def keep(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=keep, bw_compiler=keep)


KERNEL_OF_OPERATOR = {
    "qat.fused_fake_quantize.default": "_forward_kernel",
    "qat.fused_fake_quantize_bits_backward.default": "_bits_backward_kernel",
    "qat.fused_lsq_fake_quantize.default": "_forward_kernel",
    "qat.fused_lsq_backward.default": "_backward_kernel",
    "qat.fused_lsq_chain.default": "_chain_forward_kernel",
    "qat.fused_lsq_chain_backward.default": "_chain_backward_kernel",
}


def _fused_calls(graph: torch.fx.GraphModule) -> list[str]:
    """The fused kernels a traced graph runs: our operators (opaque on the CPU), or on CUDA their Triton launches
    traced into the graph, named by kernel."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    calls = []
    for node in graph.graph.nodes:
        target = str(node.target)
        if target in KERNEL_OF_OPERATOR:
            calls.append(KERNEL_OF_OPERATOR[target])
        elif target.startswith("triton_kernel_wrapper"):
            calls.append(kernel_side_table.get_kernel(node.kwargs["kernel_idx"]).fn.__name__)
    return calls


def _output_and_gradient(function, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(function(x), the gradient of x for an output gradient ramping from -1 to 1)."""
    x_leaf = _leaf(x)
    y = function(x_leaf)
    y.backward(torch.linspace(-1, 1, y.numel(), device=DEVICE).reshape(y.shape))
    return y, x_leaf.grad


@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (4, 16, 5, 5), (4, 16, 1, 1)], ids=["c3", "c16", "c16_1x1"])
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("name", AFFINE_SPECS)
def test_compiled_fake_quant_is_the_fused_kernels(fused_module, name, relu, shape):
    """Under torch.compile (fullgraph: no graph break) the forward graph runs the fused kernel, with the eager
    values and gradients, bit for bit. The backward unpacks the saved mask bits with torch ops where the
    innermost dim in memory (of size > 1) fills whole bytes (channels_last with 16 channels; "u8_ch1" moves its
    channels first into a contiguous copy, whose innermost dim has 5 or 4), else runs the bits-backward kernel."""
    spec = AFFINE_SPECS[name]
    channels = shape[1]
    rows = shape[spec.axis] if spec.is_per_channel else 1
    scale = (torch.rand(rows) * 0.05 + 0.01).reshape(-1 if spec.is_per_channel else ())
    x = _input(shape, scale, spec, torch.float32)
    scale = scale.to(DEVICE)
    zero = torch.randint(0, 5, scale.shape, dtype=torch.int32, device=DEVICE) if not spec.symmetric else \
        torch.zeros(scale.shape, dtype=torch.int32, device=DEVICE)

    def function(x):
        return fused_module.fake_quantize(x, scale, zero, spec, relu=relu)

    graphs = []
    torch._dynamo.reset()  # static shapes: after another shape of `function`, dynamo would mark the changed dims dynamic
    compiled = torch.compile(function, backend=_recording_backend(graphs), fullgraph=True, dynamic=False)
    (y, grad_x), (y_eager, grad_x_eager) = _output_and_gradient(compiled, x), _output_and_gradient(function, x)
    assert torch.equal(y, y_eager) and torch.equal(grad_x, grad_x_eager)
    assert 0 < int((grad_x_eager == 0).sum()) < x.numel()  # some values clip, others pass
    forward, backward = graphs
    assert _fused_calls(forward) == ["_forward_kernel"]
    by_torch_ops = channels % 8 == 0 and name != "u8_ch1"
    assert _fused_calls(backward) == ([] if by_torch_ops else ["_bits_backward_kernel"])
    shifts = any(node.target is torch.ops.aten.__rshift__.Tensor for node in backward.graph.nodes)
    assert shifts == by_torch_ops


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("rows", [1, 4])
def test_unpacked_bits_are_the_mask_of_the_bits_backward(fused_module, memory_format, rows):
    """The compiled backward's mask (torch ops on the forward's bits) is the mask the eager bits-backward kernel
    applies, in both dense layouts (innermost dims of 8 and 16), also where rows of 192 elements are padded to
    blocks of 256."""
    x = torch.randn(2, 16, 3, 8, device=DEVICE).contiguous(memory_format=memory_format)
    scale = torch.full((rows,), 0.1, device=DEVICE)
    zero = torch.full((rows,), 3, dtype=torch.int32, device=DEVICE)
    _, bits = torch.ops.qat.fused_fake_quantize(x, scale, zero, rows, 0, 15, True)
    layout = fused_module._Layout.of(x)
    kernel_mask = fused_module._bits_backward(torch.ones_like(x), bits, layout, rows) != 0
    mask = fused_module.unpacked_bits(bits, x.shape, storage_order(x), rows)
    assert torch.equal(mask, kernel_mask)
    assert bool(mask[x > 0.1].any()) and not bool(mask[x <= 0].any()) and not bool(mask[x > 1.3].any())


@pytest.mark.parametrize("name", LSQ_SPECS)
def test_compiled_lsq_is_the_fused_kernels(fused_module, name):
    """LSQ / LSQ+ under torch.compile (fullgraph) runs the fused forward and backward kernels, with eager's
    values and input gradient, and its qparam gradients up to the summation order."""
    spec, learned_zero = LSQ_SPECS[name]
    shape = (4, 3, 5, 5)
    channels = shape[spec.axis] if spec.is_per_channel else 1
    scale = _leaf(torch.linspace(0.02, 0.05, channels).reshape(-1 if spec.is_per_channel else ()).to(DEVICE))
    qparams = [scale, _leaf(torch.full(scale.shape, 3.4, device=DEVICE))] if learned_zero else [scale]
    x = _input(shape, scale.detach().cpu(), spec, torch.float32)
    g = lsq_grad_scale(x, spec)

    def function(x):
        return fused_module.lsq_fake_quantize(x, scale, qparams[1] if learned_zero else None, spec, g,
                                              relu=learned_zero)

    _assert_compiled_equals_eager(function, x, qparams, ["_forward_kernel"], ["_backward_kernel"])


def test_compiled_with_changing_batch_sizes_equals_eager(fused_module):
    """Compiled for dynamic shapes (as after a smaller last batch), the operators size the mask bits from the
    symbolic batch: values and gradients equal eager's for every batch size."""
    spec = QuantSpec(bits=8, signed=False)
    scale = torch.tensor(0.05, device=DEVICE)
    zero = torch.tensor(10, dtype=torch.int32, device=DEVICE)

    def function(x):
        return fused_module.fake_quantize(x, scale, zero, spec, relu=True)

    compiled = torch.compile(function, backend="aot_eager", dynamic=True, fullgraph=True)
    for batch in (8, 5, 3):
        x = _input((batch, 3, 5, 7), scale.cpu(), spec, torch.float32)
        (y, grad_x), (y_eager, grad_x_eager) = _output_and_gradient(compiled, x), _output_and_gradient(function, x)
        assert torch.equal(y, y_eager) and torch.equal(grad_x, grad_x_eager)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_backward_buffers_of_equal_layouts_survive_cse(fused_module, memory_format):
    """AOT autograd's CSE merges equal `empty_strided` calls; the bits backward's output buffers (one per
    quantizer, equal for equally shaped activations) must stay apart, in x's memory format."""
    from torch._functorch.aot_autograd import aot_function
    from torch._functorch.compile_utils import fx_graph_cse
    from torch._inductor.decomposition import select_decomp_table

    x = torch.randn(4, 3, 5, 5).contiguous(memory_format=memory_format)
    layout = fused_module._Layout.of(x)
    allocations = []

    def two_buffers(x):
        first, second = layout.empty(), layout.empty()
        assert first.stride() == second.stride() == x.stride()
        return first.copy_(x) + 1, second.copy_(x) + 2

    def count_allocations(graph_module, _):
        graph = fx_graph_cse(graph_module.graph)
        allocations.append(sum(node.op == "call_function" and "empty" in str(node.target) for node in graph.nodes))
        return graph_module

    aot_function(two_buffers, fw_compiler=count_allocations, decompositions=select_decomp_table())(x)
    assert allocations == [2]


@pytest.fixture
def inductor_clones(monkeypatch) -> Iterator[list[tuple[str, list[str]]]]:
    """(kernel, its arguments inductor clones before the kernel writes them) for each of our Triton launches
    that inductor compiles while the test runs (caches off, so that every graph is compiled). A kernel writing a
    fresh output buffer needs no clone: a clone is a wasted copy, and torch 2.11's inductor fails to make one
    with a dynamic batch."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from torch._inductor.fx_passes import post_grad

    clones = []
    decompose = post_grad.decompose_triton_kernel_wrapper_functional

    def recording_decompose(graph):
        for node in graph.find_nodes(op="call_function",
                                     target=torch.ops.higher_order.triton_kernel_wrapper_functional):
            if node.kwargs["tensors_to_clone"]:
                kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"]).fn.__name__
                clones.append((kernel, list(node.kwargs["tensors_to_clone"])))
        return decompose(graph)

    monkeypatch.setattr(post_grad, "decompose_triton_kernel_wrapper_functional", recording_decompose)
    with torch._inductor.config.patch(force_disable_caches=True):
        yield clones


@pytest.mark.parametrize("preset, dynamic", [("w8a8", True), ("w4a4_lsq", True), ("w8a8", None)],
                         ids=["w8a8", "w4a4_lsq", "w8a8_dynamic_batch"])
def test_compiled_training_steps_match_eager(triton_on_cpu, inductor_clones, preset, dynamic):
    """A prepared Conv-BN-ReLU net compiled whole (fullgraph; every dim dynamic, or as dynamo chooses: the batch
    once it changes; inductor on CUDA, AOT autograd without code generation on the CPU) trains as it does
    eagerly: the same losses over a few SGD steps on batches of changing size."""
    prepared, x, target = _prepared_net(preset)
    graphs = []
    losses = {}
    for compiled in (False, True):
        net = copy.deepcopy(prepared).train()
        backend = "inductor" if ON_CUDA else _recording_backend(graphs)
        run = torch.compile(net, backend=backend, fullgraph=True, dynamic=dynamic) if compiled else net
        losses[compiled] = _sgd_losses(net, run, x, target, batches=[8, 5, 8, 3, 8])
    assert losses[False][-1] < losses[False][0]  # it trains
    # the CPU runs the same kernels (weights: the formula, equal to them) without code generation; inductor on
    # CUDA reorders the float arithmetic around them (BN, the convs), and at 4 bits a value that lands on the other
    # side of a rounding boundary moves the next losses by ~1e-3 (measured on an H200: 2.9e-3 at step 5)
    rtol, atol = {"w8a8": (2e-3, 1e-4), "w4a4_lsq": (1e-2, 1e-3)}[preset] if ON_CUDA else (1e-5, 1e-6)
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=rtol, atol=atol)
    # CUDA: no output buffer of our kernels is cloned (equally shaped activations, as the two ReLUs', keep their own)
    assert inductor_clones == []
    if not ON_CUDA:  # one operator per per-tensor (activation) quantizer; per-channel weights take the formula
        quantizers = [m for m in prepared.modules() if isinstance(m, QuantizerBase)]
        per_tensor = sum(q.spec.granularity is Granularity.PER_TENSOR for q in quantizers)
        assert per_tensor >= 3 and len(quantizers) > per_tensor
        assert _fused_calls(graphs[0]).count("_forward_kernel") == per_tensor
        # the fixed-qparams backward: the bits-backward kernel with every dim symbolic, else torch ops (the
        # activations' innermost dim, W = 8, fills whole bytes)
        bits_kernels = sum(_fused_calls(graph).count("_bits_backward_kernel") for graph in graphs)
        assert (bits_kernels > 0) == (preset == "w8a8" and dynamic is True)
