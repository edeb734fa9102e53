"""The weight side of a folded Conv-BN QAT training step on CUDA: one Triton launch forward, one backward.

The step quantizes the weight folded with BatchNorm's running statistics, w_f = w * f with
f = gamma * rsqrt(running_var + eps) per output channel. As torch ops that is a dozen small ops and autograd
nodes per layer (the factor, the product, the per-channel min/max, the observer's update, the fake-quant, the
autocast cast, and their backward nodes), each a host-side dispatch; here one program per output channel:

    forward:  f, w_f = w * f, [range of w_f merged into the observer, scale and zero point written],
              y = fake_quant(w_f) stored in the dtype the layer computes in (bf16 under autocast)
    backward: grad_w = grad_y * mask * f, grad_gamma = (sum(grad_y * mask * w) + grad_f) * rsqrt(var + eps),
              LSQ: grad_scale = sum(grad_y * d y / d s) * grad scale

with the arithmetic of the unfused path (``qat.quant.triton_fake_quant``, ``qat.quant.triton_observers``):
the same values, gradients equal up to summation order. Quantizer states served: a per-channel (axis 0)
FakeQuantize observing with a running rule (min/max, EMA) or frozen, and a per-channel LSQ weight (no zero
point) being trained; anything else takes the torch path. Imported lazily for CUDA tensors; tests run it on
the CPU with ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import torch
import triton
import triton.language as tl
from torch import Tensor

from qat.quant import affine
from qat.quant.affine import SCALE_EPS
from qat.quant.fake_quantize import FakeQuantize, LearnableFakeQuantize, QuantizerBase
from qat.quant.learnable import lsq_grad_scale
from qat.quant.observers import RunningRule
from qat.quant.spec import Granularity, QuantSpec
from qat.quant.triton_fake_quant import NO_FMA, round_half_even, same_layout
from qat.quant.triton_observers import device_steps, max_nan, merge_range_into_qparams, min_nan

_BLOCK = 1024


class Mode(IntEnum):
    """Where the weight's qparams come from (the kernels' MODE)."""

    FIXED = 0  # the quantizer's scale / zero point buffers (observer off)
    OBSERVE = 1  # merged from this weight's range into the observer, then written to the buffers
    LSQ = 2  # a learned per-channel scale (clamped at SCALE_EPS), zero point fixed by the spec


@triton.jit
def _forward_kernel(w_ptr, y_ptr, factor_ptr, inv_std_ptr, var_ptr, gamma_ptr, scale_ptr, zero_ptr, min_ptr, max_ptr,
                    row_len, bn_eps, momentum, qmin, qmax, steps, scale_eps, fixed_zero, HAS_GAMMA: tl.constexpr,
                    MODE: tl.constexpr, RULE: tl.constexpr, SYMMETRIC: tl.constexpr, RECIPROCAL: tl.constexpr,
                    BLOCK: tl.constexpr):
    row = tl.program_id(0)
    inv_std = tl.math.rsqrt(tl.load(var_ptr + row) + bn_eps)  # libdevice rsqrtf, as torch.rsqrt
    f = inv_std * tl.load(gamma_ptr + row).to(tl.float32) if HAS_GAMMA else inv_std
    tl.store(inv_std_ptr + row, inv_std)
    tl.store(factor_ptr + row, f)
    base = row.to(tl.int64) * row_len
    if MODE == 1:
        lo = tl.full((BLOCK,), float("inf"), tl.float32)
        hi = tl.full((BLOCK,), float("-inf"), tl.float32)
        for start in range(0, row_len, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            inside = offs < row_len
            wf = tl.load(w_ptr + base + offs, mask=inside, other=0.0) * f
            lo = min_nan(lo, tl.where(inside, wf, float("inf")))
            hi = max_nan(hi, tl.where(inside, wf, float("-inf")))
        lo, hi, s, z = merge_range_into_qparams(
            tl.reduce(lo, 0, min_nan), tl.reduce(hi, 0, max_nan), tl.load(min_ptr + row), tl.load(max_ptr + row),
            momentum, qmin, qmax, steps, scale_eps, fixed_zero, RULE, SYMMETRIC, RECIPROCAL)
        tl.store(min_ptr + row, lo)
        tl.store(max_ptr + row, hi)
        tl.store(scale_ptr + row, s)
        tl.store(zero_ptr + row, z.to(tl.int32))
    elif MODE == 0:
        s = tl.load(scale_ptr + row)
        z = tl.load(zero_ptr + row).to(tl.float32)
    else:
        s = tl.maximum(tl.load(scale_ptr + row).to(tl.float32), scale_eps)
        z = fixed_zero
    inv_s = tl.math.div_rn(1.0, s)
    for start in range(0, row_len, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < row_len
        wf = tl.load(w_ptr + base + offs, mask=inside, other=0.0) * f
        codes = round_half_even(wf * inv_s) + z
        clamped = tl.minimum(tl.maximum(codes, qmin, propagate_nan=tl.PropagateNan.ALL), qmax,
                             propagate_nan=tl.PropagateNan.ALL)
        tl.store(y_ptr + base + offs, ((clamped - z) * s).to(y_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _backward_kernel(grad_ptr, w_ptr, grad_w_ptr, factor_ptr, inv_std_ptr, scale_ptr, zero_ptr, grad_factor_ptr,
                     grad_gamma_ptr, grad_scale_ptr, row_len, qmin, qmax, scale_eps, fixed_zero, lsq_grad_scale,
                     MODE: tl.constexpr, GAMMA_GRAD: tl.constexpr, HAS_GRAD_FACTOR: tl.constexpr,
                     SCALE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    f = tl.load(factor_ptr + row)
    if MODE == 2:
        raw_s = tl.load(scale_ptr + row).to(tl.float32)
        s = tl.maximum(raw_s, scale_eps)
        z = fixed_zero
    else:
        s = tl.load(scale_ptr + row)
        z = tl.load(zero_ptr + row).to(tl.float32)
    inv_s = tl.math.div_rn(1.0, s)
    base = row.to(tl.int64) * row_len
    acc_f = tl.zeros((BLOCK,), tl.float32)
    acc_s = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, row_len, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < row_len
        g = tl.load(grad_ptr + base + offs, mask=inside, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + base + offs, mask=inside, other=0.0)
        v = (w * f) * inv_s
        rounded = round_half_even(v)
        codes = rounded + z
        in_range = (codes >= qmin) & (codes <= qmax)
        g_wf = g * in_range.to(tl.float32)
        tl.store(grad_w_ptr + base + offs, g_wf * f, mask=inside)
        acc_f += g_wf * w
        if SCALE_GRAD:
            acc_s += g * tl.where(in_range, rounded - v, tl.where(codes < qmin, qmin - z, qmax - z))
    if GAMMA_GRAD:  # f = gamma * inv_std: d f / d gamma = inv_std
        grad_f = tl.sum(acc_f, axis=0)
        if HAS_GRAD_FACTOR:
            grad_f += tl.load(grad_factor_ptr + row)
        tl.store(grad_gamma_ptr + row, grad_f * tl.load(inv_std_ptr + row))
    if SCALE_GRAD:
        unclamped = (raw_s >= scale_eps).to(tl.float32)
        tl.store(grad_scale_ptr + row, tl.sum(acc_s, axis=0) * (lsq_grad_scale * unclamped))


@dataclass(frozen=True)
class WeightQuant:
    """A weight quantizer's state as the kernels read it (tensors are the quantizer's own buffers/parameters)."""

    mode: Mode
    quantizer: QuantizerBase
    scale: Tensor  # buffer (FIXED, OBSERVE) or learned parameter (LSQ), (C,)
    zero_point: Tensor | None  # int32 buffer (FIXED, OBSERVE)
    lsq_grad_scale: float = 0.0
    rule: tuple[RunningRule, float] | None = None  # the observer's running rule and momentum (OBSERVE)

    @property
    def spec(self) -> QuantSpec:
        return self.quantizer.spec


def weight_quant(quantizer: QuantizerBase, weight: Tensor) -> WeightQuant | None:
    """The fused path's view of `quantizer` for `weight`, or None when the torch path must run (another
    spec or quantizer type, fake-quant off, the first observation that shapes the buffers, stale qparams)."""
    spec, channels = quantizer.spec, weight.shape[0]
    if not (weight.dtype == torch.float32 and affine.is_dense(weight)  # rows: output channels (any inner order)
            and quantizer.fake_quant_enabled and spec.granularity is Granularity.PER_CHANNEL and spec.axis == 0
            and affine.triton_eager_applies(weight, spec)):
        return None
    if isinstance(quantizer, FakeQuantize):
        if quantizer.observer_enabled:
            rule = quantizer.observer.fused_update_rule((channels,), quantizer.scale, quantizer.zero_point)
            if rule is None:
                return None
            return WeightQuant(Mode.OBSERVE, quantizer, quantizer.scale, quantizer.zero_point, rule=rule)
        if quantizer._stale or not quantizer.scale.shape == quantizer.zero_point.shape == (channels,):
            return None
        return WeightQuant(Mode.FIXED, quantizer, quantizer.scale, quantizer.zero_point)
    if isinstance(quantizer, LearnableFakeQuantize) and quantizer.method == "lsq":
        ready = quantizer.initialized and not quantizer.observer_enabled and not quantizer._stale
        if ready and quantizer.scale.shape == (channels,):
            return WeightQuant(Mode.LSQ, quantizer, quantizer.scale, None, lsq_grad_scale(weight, spec))
    return None


class _FoldedWeightFakeQuantize(torch.autograd.Function):
    """(fake_quant(w * f) in out_dtype, f) with f = gamma * rsqrt(running_var + eps), per output channel."""

    @staticmethod
    def forward(ctx, weight, gamma, lsq_scale, running_var, eps: float, quant: WeightQuant, out_dtype):
        spec, channels = quant.spec, weight.shape[0]
        y = torch.empty_like(weight, dtype=out_dtype)  # weight's memory format: the same flat rows
        factor = torch.empty(channels, device=weight.device, dtype=torch.float32)
        inv_std = torch.empty_like(factor)
        observer = quant.quantizer.observer if quant.mode is Mode.OBSERVE else None
        rule, momentum = quant.rule if quant.rule is not None else (None, 0.0)
        steps, reciprocal = device_steps(spec, weight.is_cuda)
        zero = quant.zero_point if quant.zero_point is not None else quant.scale
        _forward_kernel[(channels,)](
            weight, y, factor, inv_std, running_var, gamma if gamma is not None else running_var, quant.scale, zero,
            observer.min_val if observer is not None else factor, observer.max_val if observer is not None else factor,
            weight.numel() // channels, float(eps), float(momentum), float(spec.qmin), float(spec.qmax), steps,
            SCALE_EPS, float(spec.fixed_zero_point), HAS_GAMMA=gamma is not None, MODE=int(quant.mode),
            RULE=rule.value if rule is not None else 0, SYMMETRIC=spec.symmetric, RECIPROCAL=reciprocal,
            BLOCK=_BLOCK, num_warps=4, **NO_FMA,
        )
        if quant.mode is Mode.OBSERVE:
            quant.quantizer._stale = False  # the kernel wrote the qparams
        ctx.save_for_backward(weight, factor, inv_std, quant.scale, quant.zero_point)
        ctx.quant = quant
        ctx.set_materialize_grads(False)
        if gamma is None:
            ctx.mark_non_differentiable(factor)
        return y, factor

    @staticmethod
    def backward(ctx, grad_y, grad_factor):
        weight, factor, inv_std, scale, zero_point = ctx.saved_tensors
        quant, spec, channels = ctx.quant, ctx.quant.spec, weight.shape[0]
        gamma_grad, scale_grad = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        if grad_y is None:
            grad_y = torch.zeros_like(weight)
        grad_y = same_layout(grad_y, weight)  # flat rows as the weight's
        grad_w = torch.empty_like(weight)
        grad_gamma = torch.empty_like(factor) if gamma_grad else None
        grad_scale = torch.empty(channels, device=weight.device, dtype=torch.float32) if scale_grad else None
        _backward_kernel[(channels,)](
            grad_y, weight, grad_w, factor, inv_std, scale, zero_point if zero_point is not None else scale,
            grad_factor if grad_factor is not None else factor, grad_gamma if gamma_grad else factor,
            grad_scale if scale_grad else factor, weight.numel() // channels, float(spec.qmin), float(spec.qmax),
            SCALE_EPS, float(spec.fixed_zero_point), quant.lsq_grad_scale, MODE=int(quant.mode), GAMMA_GRAD=gamma_grad,
            HAS_GRAD_FACTOR=grad_factor is not None, SCALE_GRAD=scale_grad, BLOCK=_BLOCK, num_warps=4, **NO_FMA,
        )
        if scale_grad:
            grad_scale = grad_scale.reshape(scale.shape).to(scale.dtype)
        return grad_w, grad_gamma, grad_scale, None, None, None, None


def folded_weight_fake_quantize(weight: Tensor, gamma: Tensor | None, running_var: Tensor, eps: float,
                                quant: WeightQuant) -> tuple[Tensor, Tensor]:
    """(fake-quantized folded weight, in the autocast dtype when autocast is on, and the fold factor f)."""
    out_dtype = torch.get_autocast_dtype(weight.device.type) if torch.is_autocast_enabled(weight.device.type) \
        else weight.dtype
    lsq_scale = quant.scale if quant.mode is Mode.LSQ else None
    return _FoldedWeightFakeQuantize.apply(weight, gamma, lsq_scale, running_var, eps, quant, out_dtype)
