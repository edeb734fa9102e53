"""Affine quantization arithmetic: qparams, quantize, dequantize, fake-quantize with a clipped STE.

Conventions (shared with the int8 kernels, so that int8 reproduces fake-quant):
    q     = clamp(round(x * (1 / s)) + z, qmin, qmax)      torch.round: half to even
    x_hat = (q - z) * s
Scale and zero point tensors have the *reduced shape* of the granularity:
    per-tensor ()   per-channel (C,)   per-token x.shape[:-1]   per-group x.shape[:-1] + (n // g,)

>>> spec = QuantSpec(bits=8, signed=True)
>>> x = torch.tensor([-1.0, 0.0, 1.0, 20.0])
>>> s, z = torch.tensor(0.1), torch.tensor(10, dtype=torch.int32)
>>> quantize(x, s, z, spec).tolist()
[0, 10, 20, 127]
>>> [round(v, 4) for v in fake_quantize(x, s, z, spec).tolist()]
[-1.0, 0.0, 1.0, 11.7]
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from qat.quant import cpu_kernels
from qat.quant.spec import Granularity, QuantSpec

SCALE_EPS = torch.finfo(torch.float32).eps
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_use_kernels = True  # switched by `fused_kernels`, e.g. to compare against the reference path


@contextlib.contextmanager
def fused_kernels(enabled: bool) -> Iterator[None]:
    """Within the block, fake-quant uses the fused kernels (True: Triton on CUDA, C++ on the CPU) or the
    pure-torch path (False)."""
    global _use_kernels
    previous, _use_kernels = _use_kernels, bool(enabled)
    try:
        yield
    finally:
        _use_kernels = previous


def _kernel_input(x: torch.Tensor) -> bool:
    """A tensor the Triton kernels take natively: CUDA, float (tests route CPU tensors here, interpreted)."""
    return x.is_cuda and x.dtype in FUSED_DTYPES


def triton_applies(x: torch.Tensor, spec: QuantSpec) -> bool:
    """The fused Triton fake-quant kernels serve CUDA float tensors, per-tensor or per-channel; under
    torch.compile as compiler operators (`qat.quant.triton_fake_quant`), per-tensor only. Per-channel
    fake-quant (weights: small tensors) takes the formula there, which inductor fuses with the weight's range,
    qparams and BN folding, forward and backward, where operators would add kernel launches of their own
    (a compiled ResNet-18 W8A8 step: 262 -> 201 generated kernels and operator calls)."""
    if spec.granularity is Granularity.PER_CHANNEL and torch.compiler.is_compiling():
        return False
    return (
        _kernel_input(x)
        and _use_kernels
        and spec.granularity in (Granularity.PER_TENSOR, Granularity.PER_CHANNEL)
    )


def triton_eager_applies(x: torch.Tensor, spec: QuantSpec) -> bool:
    """`triton_applies` outside torch.compile: the Triton kernels that are not compiler operators (observer
    updates, the folded conv weight) serve eager steps; torch.compile fuses their pure-torch formulas itself."""
    return triton_applies(x, spec) and not torch.compiler.is_compiling()


def is_dense(x: torch.Tensor) -> bool:
    """x's elements fill its storage without gaps (contiguous, channels_last, channels_last_3d): kernels can
    read it as a flat array, with each outermost-dim slice (a weight's output channel) one contiguous run."""
    if x.is_contiguous():
        return True
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    return x.dim() in formats and x.is_contiguous(memory_format=formats[x.dim()])


def _cpu_kernels_take(x: torch.Tensor) -> bool:
    """The C++ CPU kernels (:mod:`qat.quant.cpu_kernels`) take dense float32 CPU tensors in eager mode,
    while `fused_kernels` allows them and they are built."""
    return (
        _use_kernels
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.numel() > 0
        and is_dense(x)
        and not torch.compiler.is_compiling()
        and cpu_kernels.extension() is not None
    )


def _outermost(x: torch.Tensor, axis: int) -> bool:
    """Each index of `axis` is one contiguous run of x's storage (x dense): the rows the C++ kernels read."""
    return x.shape[axis] == 1 or x.stride(axis) * x.shape[axis] == x.numel()


def cpu_kernels_apply(x: torch.Tensor, spec: QuantSpec) -> bool:
    """The C++ CPU kernels serve `x` under `spec`: per-tensor, or per-channel over x's outermost storage dim
    (a weight's output channels)."""
    if spec.granularity is Granularity.PER_CHANNEL:
        return _outermost(x, _channel_axis(x, spec)) and _cpu_kernels_take(x)
    return spec.granularity is Granularity.PER_TENSOR and _cpu_kernels_take(x)


def _cpu_kernels_serve(x: torch.Tensor, scale: torch.Tensor) -> bool:
    """The C++ kernels can fake-quantize x with a broadcast `scale`: one scale, or one per index of x's outermost
    storage dim (the rows they read)."""
    if scale.numel() == 1:
        return _cpu_kernels_take(x)
    axes = [d for d, n in enumerate(scale.shape) if n != 1]
    return scale.dim() == x.dim() and len(axes) == 1 and _outermost(x, axes[0]) and _cpu_kernels_take(x)


def _group_view(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    n, g = x.shape[-1], spec.group_size
    if n % g:
        raise ValueError(f"per-group quantization needs the last dim ({n}) divisible by group_size ({g})")
    return x.reshape(*x.shape[:-1], n // g, g)  # (..., n) -> (..., n/g, g)


def _channel_axis(x: torch.Tensor, spec: QuantSpec) -> int:
    axis = spec.axis if spec.axis >= 0 else spec.axis + x.dim()
    if not 0 <= axis < x.dim():
        raise ValueError(f"per-channel axis {spec.axis} is out of range for a tensor of shape {tuple(x.shape)}")
    return axis


def reduced_minmax(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max (float32) of `x` over everything that shares one (scale, zero_point) under `spec`."""
    lo, hi = reduced_aminmax(x.detach(), spec)
    return lo.float(), hi.float()  # exact: min and max are elements of x, reduced in x's own dtype


# The layouts recognised under torch.compile, where strides may be symbols that cannot be sorted:
# dims -> (memory format, the dims from the largest stride to the smallest)
_CHANNELS_LAST_ORDER = {4: (torch.channels_last, (0, 2, 3, 1)), 5: (torch.channels_last_3d, (0, 2, 3, 4, 1))}


def _compiled_storage_order(x: torch.Tensor) -> tuple[int, ...]:
    """x's dims in memory order for contiguous and channels_last layouts (checks that torch.compile guards on),
    else x's own dim order."""
    layout = _CHANNELS_LAST_ORDER.get(x.dim())
    if layout is not None and not x.is_contiguous() and x.is_contiguous(memory_format=layout[0]):
        return layout[1]
    return tuple(range(x.dim()))


def storage_order(x: torch.Tensor, first: int | None = None) -> tuple[int, ...]:
    """The dims of `x` from the largest stride to the smallest (`first` kept in front): x.permute(order) is
    a contiguous view for dense layouts such as channels_last (under torch.compile: for contiguous and
    channels_last layouts; inductor reduces such a view at memory speed, a channels_last tensor in its own dim
    order about ten times slower).

    >>> storage_order(torch.zeros(2, 3, 4, 5).to(memory_format=torch.channels_last))
    (0, 2, 3, 1)
    """
    if torch.compiler.is_compiling():
        dims = list(_compiled_storage_order(x))
    else:
        dims = sorted(range(x.dim()), key=lambda d: -x.stride(d))
    return tuple(([first] if first is not None else []) + [d for d in dims if d != first])


def reduced_aminmax(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`reduced_minmax`, in x's dtype (no casts)."""
    g = spec.granularity
    if g is Granularity.PER_TENSOR:
        return torch.aminmax(x.permute(storage_order(x)))  # a contiguous view: no copy for channels_last
    if g is Granularity.PER_CHANNEL:
        axis = _channel_axis(x, spec)
        channels_first = x.permute(storage_order(x, first=axis))  # a view when the channel dim is outermost
        return _aminmax_last_dim(channels_first.reshape(x.shape[axis], -1))  # (C, rest)
    if g is Granularity.PER_TOKEN:
        return _aminmax_last_dim(x)
    return _aminmax_last_dim(_group_view(x, spec))


def _aminmax_last_dim(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max over the last dim (NaN propagates). On the CPU as amin + amax, two vectorised passes
    several times faster than torch.aminmax(dim=-1) there (2 threads: ResNet-18's weights per channel 1.6 against
    9.6 ms; a 32x197x768 activation per token 0.8 against 3.7 ms)."""
    if x.is_cuda:
        return torch.aminmax(x, dim=-1)
    return x.amin(dim=-1), x.amax(dim=-1)


def range_steps(spec: QuantSpec) -> float:
    """Grid steps a range spans: scale = (max - min) / this (affine), max(-min, max) / this (symmetric)."""
    return (spec.qmax - spec.qmin) / 2 if spec.symmetric else float(spec.qmax - spec.qmin)


def qparams_from_minmax(
    min_val: torch.Tensor, max_val: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale float32, zero_point int32) for ranges [min_val, max_val] (elementwise, any shape).

    The range is widened to contain 0 so that 0.0 is exactly representable; the scale is at least
    SCALE_EPS, so an all-zero tensor gives a finite scale.

    >>> s, z = qparams_from_minmax(torch.tensor(-1.0), torch.tensor(3.0), QuantSpec(signed=False))
    >>> round(s.item(), 6), z.item()
    (0.015686, 64)
    """
    min_val = torch.clamp(min_val.float(), max=0.0)
    max_val = torch.clamp(max_val.float(), min=0.0)
    if spec.symmetric:
        amax = torch.maximum(-min_val, max_val)
        scale = torch.clamp(amax / range_steps(spec), min=SCALE_EPS)
        zero_point = torch.full_like(scale, spec.fixed_zero_point, dtype=torch.int32)
        return scale, zero_point
    scale = torch.clamp((max_val - min_val) / range_steps(spec), min=SCALE_EPS)
    zero_point = torch.clamp(spec.qmin - torch.round(min_val / scale), spec.qmin, spec.qmax).to(torch.int32)
    return scale, zero_point


def broadcastable(p: torch.Tensor, x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Reshape a reduced-shape qparam so it broadcasts against `x` (or its group view for per-group)."""
    g = spec.granularity
    if g is Granularity.PER_TENSOR:
        return p.reshape(())
    if g is Granularity.PER_CHANNEL:
        shape = [1] * x.dim()
        shape[_channel_axis(x, spec)] = -1
        return p.reshape(shape)  # (C,) -> (1, .., C, .., 1)
    return p.unsqueeze(-1)  # per-token (..., ) -> (..., 1); per-group (..., n/g) -> (..., n/g, 1)


def _as_grid(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    return _group_view(x, spec) if spec.granularity is Granularity.PER_GROUP else x


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Integer codes of `x` as plain int8 (signed spec) or uint8 tensors, same shape as `x`."""
    xg = _as_grid(x.float(), spec)
    s, z = broadcastable(scale.float(), xg, spec), broadcastable(zero_point, xg, spec)
    q = torch.clamp(torch.round(xg * (1.0 / s)) + z, spec.qmin, spec.qmax)
    dtype = torch.int8 if spec.signed else torch.uint8
    return q.reshape(x.shape).to(dtype)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Float32 values of integer codes `q`."""
    qg = _as_grid(q.to(torch.int32), spec)
    s, z = broadcastable(scale.float(), qg, spec), broadcastable(zero_point, qg, spec)
    return ((qg - z).float() * s).reshape(q.shape)


class _FakeQuantizeSTE(torch.autograd.Function):
    """Fake-quantize with the clipped straight-through estimator: d/dx = 1 where the code is in range."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin: int, qmax: int):
        codes = torch.round(x * (1.0 / scale)) + zero_point
        inside = (codes >= qmin) & (codes <= qmax)
        ctx.save_for_backward(inside)
        return (torch.clamp(codes, qmin, qmax) - zero_point) * scale

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None


def fake_quantize_with_mask(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, relu: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_hat, gradient mask) without autograd, for CPU tensors; `scale` float32 and `zero_point` int32,
    0-d (per-tensor) or shaped to broadcast over x's channel axis (per-channel). Computed as
    clamp(round(x * (1 / s)), qmin - z, qmax - z) * s, which equals the reference formula bit for bit
    (integer-valued floats: adding z before and subtracting it after the clamp is exact), in passes that
    torch vectorises; torch's fused fake-quant kernel is a scalar loop. The mask is "the clamp changed
    nothing": (code - clamped code) converted to bool is the outside (NaN included), a cheaper pass on the
    CPU than comparisons that produce bools.

    `relu`: of relu(x), without computing it: codes of relu(x) are max(code, 0), so the lower bound becomes
    max(qmin - z, 0), and ReLU's gradient mask x > 0 joins the fake-quant's.

    >>> out, inside = fake_quantize_with_mask(torch.tensor([-1.0, 0.26, 9.0]), torch.tensor(0.5),
    ...                                       torch.tensor(0, dtype=torch.int32), -8, 7, relu=True)
    >>> out.tolist(), inside.tolist()
    ([0.0, 0.5, 3.5], [False, True, False])

    Where the C++ kernels apply (per-tensor, or per-channel over x's outermost storage dim) one pass
    computes the same values and mask.
    """
    if _cpu_kernels_serve(x, scale):
        return tuple(cpu_kernels.extension().fake_quantize(x, scale.reshape(-1), (1.0 / scale).reshape(-1),
                                                           zero_point.reshape(-1), qmin, qmax, relu, True))
    if zero_point.dim() == 0:  # per-tensor: bounds as Python numbers (a CPU read, no device sync)
        z = int(zero_point)
        lo, hi = qmin - z, qmax - z
        lo = max(lo, 0) if relu else lo
    else:
        lo, hi = qmin - zero_point, qmax - zero_point
        lo = lo.clamp_min(0) if relu else lo
    codes = x * (1.0 / scale)
    codes.round_()
    out = torch.clamp(codes, lo, hi)
    inside = codes.sub_(out).to(torch.bool).logical_not_()
    if relu:
        inside &= x > 0
    return out.mul_(scale), inside


def masked_gradient(grad: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """grad where `inside` (bool), else 0, as grad * mask: on the CPU a branch-free vectorised pass, several
    times faster than torch.where on masks such as ReLU's (half true, in no pattern). One C++ pass where
    the kernels apply and grad is laid out as the mask."""
    if grad.shape == inside.shape and grad.stride() == inside.stride() and _cpu_kernels_take(grad):
        return cpu_kernels.extension().masked_gradient(grad, inside)
    return grad * inside.view(torch.uint8)


class _FakeQuantizeWithMaskCPU(torch.autograd.Function):
    """Fake-quant keeping a bool mask (`fake_quantize_with_mask`); backward `masked_gradient`."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin: int, qmax: int, relu: bool):
        out, inside = fake_quantize_with_mask(x, scale, zero_point, qmin, qmax, relu)
        ctx.save_for_backward(inside)
        return out

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return masked_gradient(grad, inside), None, None, None, None, None


def _fused_op_applies(x: torch.Tensor, spec: QuantSpec) -> bool:
    """The few-pass paths (CPU: `fake_quantize_with_mask`; CUDA: torch's fused kernels) coincide with our
    formula for float32 (under torch.compile the plain formula is used: the compiler fuses it with
    its neighbours)."""
    fused_granularity = spec.granularity in (Granularity.PER_TENSOR, Granularity.PER_CHANNEL)
    return fused_granularity and x.dtype == torch.float32 and not torch.compiler.is_compiling()


def fake_quantize_folds_relu(x: torch.Tensor, spec: QuantSpec) -> bool:
    """`fake_quantize(x, ..., relu=True)` applies the ReLU inside its own passes (the Triton kernels, the CPU
    float32 path), rather than as a torch.relu before them."""
    return triton_applies(x, spec) or (x.device.type == "cpu" and _fused_op_applies(x, spec))


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec, use_fused: bool = True,
    relu: bool = False,
) -> torch.Tensor:
    """quantize + dequantize in one differentiable step (clipped STE); output dtype = input dtype.

    With `use_fused`: on CUDA the fused Triton kernels (`qat.quant.triton_fake_quant`, any float dtype, no
    float32 copy); elsewhere, for float32 per-tensor / per-channel input, `fake_quantize_with_mask` (CPU) or
    torch.fake_quantize_per_{tensor,channel}_affine (CUDA without Triton). The tests prove each bit-equal to
    the plain formula. `relu`: fake-quantize relu(x) (the Triton kernels and the CPU path fold it in:
    values and gradients as torch.relu followed by the fake-quant).
    """
    if use_fused and triton_applies(x, spec):
        from qat.quant import triton_fake_quant

        return triton_fake_quant.fake_quantize(x, scale, zero_point, spec, relu)
    scale = scale.detach().float()
    zero_point = zero_point.detach().to(torch.int32)
    if use_fused and _fused_op_applies(x, spec) and x.device.type == "cpu":
        s, z = broadcastable(scale, x, spec), broadcastable(zero_point, x, spec)  # (C,) -> over x's channel axis
        return _FakeQuantizeWithMaskCPU.apply(x, s, z, spec.qmin, spec.qmax, relu)
    if relu:
        x = torch.relu(x)
    if use_fused and _fused_op_applies(x, spec):
        if spec.granularity is Granularity.PER_TENSOR:
            return torch.fake_quantize_per_tensor_affine(
                x, scale.reshape(()), zero_point.reshape(()), spec.qmin, spec.qmax
            )
        return torch.fake_quantize_per_channel_affine(
            x, scale, zero_point, _channel_axis(x, spec), spec.qmin, spec.qmax
        )
    xg = _as_grid(x.float(), spec)
    s, z = broadcastable(scale, xg, spec), broadcastable(zero_point, xg, spec)
    out = _FakeQuantizeSTE.apply(xg, s, z, spec.qmin, spec.qmax)
    return out.reshape(x.shape).to(x.dtype)


def dynamic_fake_quantize(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Fake-quantize with qparams computed from `x` itself (per-token / per-group activations)."""
    min_val, max_val = reduced_minmax(x, spec)
    scale, zero_point = qparams_from_minmax(min_val, max_val, spec)
    return fake_quantize(x, scale, zero_point, spec)
