"""Learned-range fake quantization: LSQ, LSQ+ (learned offset) and PACT (learned clip).

The forward pass is the same affine grid as :func:`qat.quant.affine.fake_quantize` (codes computed as
round(x * (1/s)) + round(z)), so a learned quantizer converts to int8 like any other. Only the gradients
differ:

LSQ (Esser et al. 2020), with v = x / s, grad scale g = 1 / sqrt(N * qmax):
    d x_hat / d s = round(v) - v        inside the grid
                  = qmin - z | qmax - z  below | above
    d x_hat / d z = -s outside the grid, 0 inside (LSQ+ only)
PACT (Choi et al. 2018): x is clipped to [0, alpha] (or [-alpha, alpha] when signed) before quantizing
with z = 0 and s = alpha / qmax; d/d alpha is 1 above
the clip (-1 below the negative clip), and the rounding is straight-through.

>>> x = torch.tensor([-3.0, 0.26, 9.0], requires_grad=True)
>>> s = torch.tensor(0.5, requires_grad=True)
>>> y = lsq_fake_quantize(x, s, None, QuantSpec(bits=4, signed=True), grad_scale=1.0)
>>> y.tolist()
[-3.0, 0.5, 3.5]
>>> y.sum().backward(); round(s.grad.item(), 4)  # codes -6 (exact: 0), 1 (1 - 0.52), 18 > 7 (qmax - 0)
7.48
"""
from __future__ import annotations

import math

import torch

from qat.quant import cpu_kernels
from qat.quant.affine import (
    SCALE_EPS,
    _as_grid,
    broadcastable,
    cpu_kernels_apply,
    fake_quantize_with_mask,
    masked_gradient,
    storage_order,
    triton_applies,
)
from qat.quant.spec import Granularity, QuantSpec


def lsq_grad_scale(x: torch.Tensor, spec: QuantSpec) -> float:
    """Esser et al.'s step-size gradient scale 1/sqrt(N * qmax), N = elements sharing one scale."""
    per_scale = x.numel()
    if spec.granularity is Granularity.PER_CHANNEL:
        per_scale //= x.shape[spec.axis]
    elif spec.granularity in (Granularity.PER_TOKEN, Granularity.PER_GROUP):
        per_scale = x.shape[-1] if spec.granularity is Granularity.PER_TOKEN else spec.group_size
    return 1.0 / math.sqrt(max(per_scale, 1) * max(spec.qmax, 1))


def _sum_to(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reduce a broadcast gradient back to the shape of the (broadcast) parameter view `like`."""
    return grad.sum_to_size(like.shape)


class _LSQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin: int, qmax: int, grad_scale: float):
        z = torch.round(torch.clamp(zero_point, qmin, qmax))
        v = x * (1.0 / scale)
        codes = torch.round(v) + z
        below, above = codes < qmin, codes > qmax
        ctx.save_for_backward(v, z, below, above, scale)
        ctx.qrange, ctx.grad_scale = (qmin, qmax), grad_scale
        return (torch.clamp(codes, qmin, qmax) - z) * scale

    @staticmethod
    def backward(ctx, grad):
        v, z, below, above, scale = ctx.saved_tensors
        qmin, qmax = ctx.qrange
        inside = ~(below | above)
        d_scale = torch.where(inside, torch.round(v) - v, torch.where(below, qmin - z, qmax - z))
        d_zero = torch.where(inside, torch.zeros_like(v), -scale.expand_as(v))
        g = ctx.grad_scale
        grad_scale = _sum_to(grad * d_scale, scale) * g if ctx.needs_input_grad[1] else None
        grad_zero = _sum_to(grad * d_zero, scale) * g if ctx.needs_input_grad[2] else None
        return grad * inside, grad_scale, grad_zero, None, None, None


def _flat(t: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    return t.permute(order).reshape(-1)  # a view when t is laid out in `order` (e.g. channels_last)


class _LSQPerTensorCPU(torch.autograd.Function):
    """Per-tensor LSQ/LSQ+ on the CPU in few passes: the forward is `fake_quantize_with_mask` (codes
    round(x * (1/s)) + z, as in _LSQ; it also returns the in-range mask); the backward selects grad_x
    through the mask and gets the scale / zero-point gradients from dot products, using
    d x_hat / d s = x_hat / s - [inside] x / s   and   d x_hat / d z = -s [outside]."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin: int, qmax: int, grad_scale: float):
        z = torch.round(torch.clamp(zero_point, qmin, qmax)).to(torch.int32)
        out, inside = fake_quantize_with_mask(x, scale, z, qmin, qmax)
        ctx.save_for_backward(x, inside, scale, z)  # not `out`: the network may modify it in place
        ctx.grad_scale, ctx.qrange = grad_scale, (qmin, qmax)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, inside, scale, z = ctx.saved_tensors
        out, _ = fake_quantize_with_mask(x, scale, z, *ctx.qrange)  # recomputed: one pass
        grad_x = masked_gradient(grad, inside)
        order = storage_order(x)
        flat_grad, flat_grad_x = _flat(grad, order), _flat(grad_x, order)
        g = ctx.grad_scale
        grad_scale = grad_zero = None
        if ctx.needs_input_grad[1]:
            dot = torch.dot(flat_grad, _flat(out, order)) - torch.dot(flat_grad_x, _flat(x, order))
            grad_scale = dot * (g / scale)
        if ctx.needs_input_grad[2]:
            grad_zero = (flat_grad_x.sum() - flat_grad.sum()) * (g * scale)
        return grad_x, grad_scale, grad_zero, None, None, None


class _LSQKernelCPU(torch.autograd.Function):
    """LSQ/LSQ+ in the C++ CPU kernels (`cpu_kernels_apply`), the ReLU optionally folded in: the forward one
    pass writing x_hat (codes as in _LSQ); the backward one pass writing grad_x and summing, per scale, the
    scale and zero-point gradients' terms in float64 in a fixed order (so they do not depend on the thread
    count; they agree with _LSQ's float32 sums to float32 rounding)."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin: int, qmax: int, grad_scale: float, relu: bool):
        z = torch.round(torch.clamp(zero_point, qmin, qmax)).to(torch.int32).reshape(-1)
        flat_scale, inv_scale = scale.reshape(-1), (1.0 / scale).reshape(-1)
        out, _ = cpu_kernels.extension().fake_quantize(x, flat_scale, inv_scale, z, qmin, qmax, relu, False)
        ctx.save_for_backward(x, flat_scale, inv_scale, z)  # not `out`: the network may modify it in place
        ctx.grad_scale, ctx.qrange, ctx.relu, ctx.param_shape = grad_scale, (qmin, qmax), relu, scale.shape
        return out

    @staticmethod
    def backward(ctx, grad):
        x, scale, inv_scale, z = ctx.saved_tensors
        if grad.stride() != x.stride() or grad.dtype != x.dtype:
            grad = torch.empty_like(x).copy_(grad)  # the kernel reads both in one layout
        grad_x, d_scale, d_zero = cpu_kernels.extension().lsq_backward(grad, x, scale, inv_scale, z, *ctx.qrange,
                                                                      ctx.relu)
        g, scale64 = ctx.grad_scale, scale.double()
        grad_scale = (d_scale * g / scale64).float().reshape(ctx.param_shape) if ctx.needs_input_grad[1] else None
        grad_zero = (d_zero * g * scale64).float().reshape(ctx.param_shape) if ctx.needs_input_grad[2] else None
        return grad_x, grad_scale, grad_zero, None, None, None, None


def lsq_folds_relu(x: torch.Tensor, spec: QuantSpec) -> bool:
    """`lsq_fake_quantize(x, ..., relu=True)` applies the ReLU inside its kernels (Triton or C++), rather than
    as a torch.relu before them."""
    return triton_applies(x, spec) or cpu_kernels_apply(x, spec)


def lsq_fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    spec: QuantSpec,
    grad_scale: float | None = None,
    relu: bool = False,
) -> torch.Tensor:
    """LSQ fake-quant with a learnable `scale` (reduced shape) and optional learnable float `zero_point`.

    On CUDA (per-tensor / per-channel) the fused Triton kernels compute the same values and gradients, on
    the CPU the C++ kernels where `cpu_kernels_apply`. `relu`: fake-quantize relu(x) (folded into both).
    Under torch.compile the Triton kernels run as compiler operators.
    """
    g = lsq_grad_scale(x, spec) if grad_scale is None else grad_scale
    if triton_applies(x, spec):
        from qat.quant import triton_fake_quant

        return triton_fake_quant.lsq_fake_quantize(x, scale, zero_point, spec, g, relu)
    if cpu_kernels_apply(x, spec):
        s = broadcastable(torch.clamp(scale.float(), min=SCALE_EPS), x, spec)
        z = torch.full_like(s, float(spec.fixed_zero_point)) if zero_point is None else zero_point.float()
        return _LSQKernelCPU.apply(x, s, broadcastable(z, x, spec), spec.qmin, spec.qmax, g, relu)
    if relu:
        x = torch.relu(x)
    xg = _as_grid(x.float(), spec)
    s = broadcastable(torch.clamp(scale.float(), min=SCALE_EPS), xg, spec)
    if zero_point is None:
        zero_point = torch.full_like(scale, float(spec.fixed_zero_point)).detach()
    z = broadcastable(zero_point.float(), xg, spec)
    per_tensor_cpu = spec.granularity is Granularity.PER_TENSOR and xg.device.type == "cpu"
    if per_tensor_cpu and not torch.compiler.is_compiling():
        return _LSQPerTensorCPU.apply(xg, s, z, spec.qmin, spec.qmax, g).to(x.dtype)
    out = _LSQ.apply(xg, s, z, spec.qmin, spec.qmax, g)
    return out.reshape(x.shape).to(x.dtype)


class _PACTClip(torch.autograd.Function):
    """clamp(x, lo*alpha, alpha) with d/dx = 1 inside and d/dalpha = 1 above, lo (0 or -1) below."""

    @staticmethod
    def forward(ctx, x, alpha, signed: bool):
        low = -alpha if signed else torch.zeros_like(alpha)
        below, above = x < low, x > alpha
        ctx.save_for_backward(below, above, alpha)
        ctx.signed = signed
        return torch.minimum(torch.maximum(x, low), alpha)

    @staticmethod
    def backward(ctx, grad):
        below, above, alpha = ctx.saved_tensors
        d_alpha = grad * above - (grad * below if ctx.signed else 0)
        return grad * ~(below | above), _sum_to(d_alpha, alpha), None


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def pact_scale(alpha: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Grid step for a clip value alpha: the clipped range [0 or -alpha, alpha] spans the code range."""
    alpha = torch.clamp(alpha.float(), min=SCALE_EPS)
    return alpha / spec.qmax


def pact_fake_quantize(x: torch.Tensor, alpha: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """PACT: clip to alpha (learned), then quantize on the grid that alpha defines (z = 0 or qmin)."""
    if spec.signed and not spec.symmetric:
        raise ValueError("PACT with signed=True needs symmetric=True (clip to [-alpha, alpha])")
    xg = _as_grid(x.float(), spec)
    a = broadcastable(torch.clamp(alpha.float(), min=SCALE_EPS), xg, spec)
    clipped = _PACTClip.apply(xg, a, spec.signed)
    s = broadcastable(pact_scale(alpha, spec), xg, spec).detach()  # PACT: alpha's gradient comes from the clip
    codes = _RoundSTE.apply(clipped * (1.0 / s))  # zero point 0; the clip keeps codes in range
    codes = codes + (torch.clamp(codes, spec.qmin, spec.qmax) - codes).detach()  # float-rounding guard, no grad
    return (codes * s).reshape(x.shape).to(x.dtype)
