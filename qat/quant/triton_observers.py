"""One Triton launch per step for a running-range observer and its quantizer's qparams on CUDA.

A training step of an observed quantizer used to be a dozen small torch ops after the min/max reduction
(lerp or min/max with the running range, clamps, divisions, rounding, copies into the buffers), each a
kernel launch and a host-side dispatch. This kernel does all of it on the (rows,) reduced tensors:

    running' = min/max(running, batch)  or  running + m (batch - running)     (the observer's rule)
    scale, zero_point = qparams_from_minmax(running')                          (the same float32 arithmetic)

and writes running', scale and zero_point into the buffers in place. NaN/Inf propagate into the running
range as with the torch ops, where ``Observer.check_finite`` reports them. Bit for bit the torch ops'
results: torch divides a CUDA tensor by a Python number by multiplying with the number's float32 reciprocal
(a CPU tensor by a correctly rounded division), so the kernel does what torch does on the tensors' device.
Imported lazily for CUDA tensors; tests run it on the CPU with ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import numpy as np
import triton
import triton.language as tl
from torch import Tensor

from qat.quant.affine import SCALE_EPS, range_steps
from qat.quant.observers import RunningRule
from qat.quant.spec import QuantSpec
from qat.quant.triton_fake_quant import NO_FMA, round_half_even

_BLOCK = 1024


@triton.jit
def _per_steps(span, steps, RECIPROCAL: tl.constexpr):
    """span / steps as torch computes a tensor divided by a Python number on the device (RECIPROCAL: `steps`
    holds the float32 reciprocal already)."""
    if RECIPROCAL:
        return span * steps
    return tl.div_rn(span, steps)


@triton.jit
def _update_range_kernel(batch_lo_ptr, batch_hi_ptr, min_ptr, max_ptr, scale_ptr, zero_ptr, rows, momentum,
                         qmin, qmax, steps, eps, fixed_zero, RULE: tl.constexpr, SYMMETRIC: tl.constexpr,
                         RECIPROCAL: tl.constexpr, RELU: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < rows
    lo = tl.load(batch_lo_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    hi = tl.load(batch_hi_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    if RELU:  # the batch range of relu(x) from that of x
        lo = tl.maximum(lo, 0.0, propagate_nan=tl.PropagateNan.ALL)
        hi = tl.maximum(hi, 0.0, propagate_nan=tl.PropagateNan.ALL)
    old_lo = tl.load(min_ptr + offs, mask=valid, other=0.0)
    old_hi = tl.load(max_ptr + offs, mask=valid, other=0.0)
    if RULE == 0:
        lo = tl.minimum(lo, old_lo, propagate_nan=tl.PropagateNan.ALL)
        hi = tl.maximum(hi, old_hi, propagate_nan=tl.PropagateNan.ALL)
    else:  # torch.lerp's formula: the weight below one half multiplies (end - start) from the start
        if momentum < 0.5:
            lo = old_lo + momentum * (lo - old_lo)
            hi = old_hi + momentum * (hi - old_hi)
        else:
            lo = lo - (lo - old_lo) * (1.0 - momentum)
            hi = hi - (hi - old_hi) * (1.0 - momentum)
    tl.store(min_ptr + offs, lo, mask=valid)
    tl.store(max_ptr + offs, hi, mask=valid)
    # qparams_from_minmax: the range widened to contain 0, then the grid's step and zero point
    lo = tl.minimum(lo, 0.0, propagate_nan=tl.PropagateNan.ALL)
    hi = tl.maximum(hi, 0.0, propagate_nan=tl.PropagateNan.ALL)
    if SYMMETRIC:
        scale = _per_steps(tl.maximum(-lo, hi, propagate_nan=tl.PropagateNan.ALL), steps, RECIPROCAL)
        scale = tl.maximum(scale, eps, propagate_nan=tl.PropagateNan.ALL)
        zero = tl.zeros_like(scale) + fixed_zero
    else:
        scale = tl.maximum(_per_steps(hi - lo, steps, RECIPROCAL), eps, propagate_nan=tl.PropagateNan.ALL)
        zero = qmin - round_half_even(tl.div_rn(lo, scale))
        zero = tl.minimum(tl.maximum(zero, qmin), qmax)
    tl.store(scale_ptr + offs, scale, mask=valid)
    tl.store(zero_ptr + offs, zero.to(tl.int32), mask=valid)


def update_range_and_qparams(batch_lo: Tensor, batch_hi: Tensor, min_val: Tensor, max_val: Tensor, scale: Tensor,
                             zero_point: Tensor, spec: QuantSpec, rule: RunningRule, momentum: float,
                             relu: bool = False) -> None:
    """In place: the running range (min_val, max_val: float32) takes in the batch range (any float dtype) by
    `rule` (EMA weight `momentum`), and scale (float32) / zero_point (int32) become its qparams.
    Every tensor holds the spec's reduced shape, contiguous. `relu`: the batch range is that of x, the
    range observed is relu(x)'s (both ends clamped at 0)."""
    rows = min_val.numel()
    steps = range_steps(spec)
    if batch_lo.is_cuda:  # torch's reciprocal: 1 / steps divided in float32
        steps = float(np.float32(1.0) / np.float32(steps))
    _update_range_kernel[(triton.cdiv(rows, _BLOCK),)](
        batch_lo, batch_hi, min_val, max_val, scale, zero_point, rows, float(momentum),
        float(spec.qmin), float(spec.qmax), steps, SCALE_EPS,
        float(spec.fixed_zero_point), RULE=rule.value, SYMMETRIC=spec.symmetric, RECIPROCAL=batch_lo.is_cuda,
        RELU=relu, BLOCK=_BLOCK, **NO_FMA,
    )
