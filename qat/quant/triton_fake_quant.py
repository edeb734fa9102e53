"""Fused fake quantization for training on CUDA: one Triton kernel forward, one backward.

Imported lazily by :mod:`qat.quant.affine` and :mod:`qat.quant.learnable` for CUDA tensors (tests run it
on CPU tensors with ``TRITON_INTERPRET=1``). The arithmetic is the reference's, in float32 whatever the
input dtype (bf16 under autocast is read and written as bf16, never copied to float32):

    s = scale (LSQ: max(scale, eps))   z = zero_point (LSQ+: round(clamp(zero_point, qmin, qmax)))
    codes = round_half_even(x * (1 / s)) + z        y = (clamp(codes, qmin, qmax) - z) * s

With ``relu`` the input is max(x, 0) and the gradient to x is also zero where x <= 0 (a ReLU before the
fake-quant folded into it: no ReLU pass forward or backward). With fixed qparams the forward reads x once
and writes y once plus the gradient mask as bits (one byte per 8 elements); autograd keeps the bits, not x,
and the backward reads grad and the bits and writes grad_x (4.1 bytes per bf16 element instead of 6).
LSQ / LSQ+ keep x, which their scale gradient needs: the backward reads grad and x once, writes grad_x once,
and one partial sum of the scale (and zero point) gradient per program (a span of blocks), summed by one small
torch reduction: no float32 copies, no host synchronisation. Two per-tensor LSQ quantizers in a row
(y2 = fq2(fq1(x)), the low-bit presets' requantized residual stream) run as one pass each way
(:func:`lsq_chain_fake_quantize`).

A tensor is seen as rows: (channels, elements per channel) per-channel, (1, numel) per-tensor, each row
contiguous in memory. Dense layouts (contiguous, channels_last) need no copy when the channel axis is
outermost in memory (weights on axis 0, any per-tensor tensor); otherwise the channel axis is moved first.
"""
from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra import libdevice

from qat.quant.affine import SCALE_EPS, is_dense, storage_order
from qat.quant.spec import Granularity, QuantSpec

MAX_BLOCK = 4096
MIN_BLOCK = 128
# The LSQ backward kernels: each program loops over TILES sub-blocks of BLOCK elements on 4 warps, summing the
# qparam gradients per element in registers and reducing once. H200, a 128x256x56x56 bf16 channels_last tensor,
# 20 back-to-back launches: single quantizer 210 us with one block of 2048 per program -> 180 us; the chain
# 426 -> 264 us (64 registers instead of 150: more programs resident to keep loads in flight).
LSQ_BACKWARD_BLOCK = 512
LSQ_BACKWARD_TILES = 16
# Unless that launches fewer than LSQ_BACKWARD_MIN_SPANS programs: then one block of LSQ_BACKWARD_SHORT_BLOCK
# elements per program (the launch before the spans). H200, graphed W4A4 steps: ResNet-50 at 224 px (LSQ tensors
# of 3.2-103 M elements, 392 spans and more) 33.62 -> 32.55 ms with spans; ResNet-18 at 32 px, batch 512 (0.26-2.1 M
# elements, 256 spans at most) 2.65 -> 2.82 ms with spans: too few programs to keep every SM's loads in flight.
LSQ_BACKWARD_MIN_SPANS = 384
LSQ_BACKWARD_SHORT_BLOCK = 2048
# Launch option of every Triton kernel of the project (fake-quant, observers, int8 kernels): round every
# product and sum on its own, as torch's eager ops do; a fused multiply-add could move near-ties of the
# rounding and break bit-equality with the reference.
NO_FMA = {"enable_fp_fusion": False}


# the GPU's round-to-nearest-even instruction (libdevice rint); Triton's interpreter has no libdevice
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_HARDWARE_RINT: tl.constexpr = tl.constexpr(not _INTERPRETED)


@triton.jit
def round_half_even(x):
    """Like ``torch.round``: one instruction on the GPU; under the interpreter from floor, exact for every
    float32 (``x - floor(x)`` is exact)."""
    if _HARDWARE_RINT:
        return libdevice.rint(x)
    f = tl.floor(x)
    frac = x - f
    f_is_odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    return tl.where((frac > 0.5) | ((frac == 0.5) & f_is_odd), f + 1.0, f)


@triton.jit
def _program_tile(row_len, n_blocks, BLOCK: tl.constexpr):
    """This program's row, its element offsets in the row as a (BLOCK / 8, 8) tile (a row of 8 consecutive
    elements per byte of the gradient mask's bits, packed and unpacked without reshapes), their in-bounds mask
    and the row's start."""
    row, block = tl.program_id(0) // n_blocks, tl.program_id(0) % n_blocks
    offs = block * BLOCK + tl.arange(0, BLOCK // 8)[:, None] * 8 + tl.arange(0, 8)[None, :]
    return row, offs, offs < row_len, row.to(tl.int64) * row_len


@triton.jit
def _scalars_f32(zero_value, qmin, qmax, eps):
    """The float scalar arguments as float32: inductor passes Python floats to traced kernels as float64."""
    return (tl.cast(zero_value, tl.float32), tl.cast(qmin, tl.float32), tl.cast(qmax, tl.float32),
            tl.cast(eps, tl.float32))


@triton.jit
def _row_qparams(scale_ptr, zero_ptr, row, zero_value, qmin, qmax, eps,
                 LEARNED: tl.constexpr, HAS_ZERO: tl.constexpr):
    """(s, 1/s, z) of one row; LEARNED applies LSQ's clamps (scale >= eps, zero rounded into range)."""
    s = tl.load(scale_ptr + row).to(tl.float32)
    if LEARNED:
        s = tl.maximum(s, eps)
    inv_s = tl.math.div_rn(1.0, s)
    if HAS_ZERO:
        z = tl.load(zero_ptr + row).to(tl.float32)
        if LEARNED:
            z = round_half_even(tl.minimum(tl.maximum(z, qmin), qmax))
    else:
        z = zero_value
    return s, inv_s, z


@triton.jit
def _fake_quantized(x, s, inv_s, z, qmin, qmax):
    """(y, v, rounded, codes) of the fake-quant of float32 x on the grid (s, z, [qmin, qmax]); NaN stays NaN."""
    v = x * inv_s
    rounded = round_half_even(v)
    codes = rounded + z
    clamped = tl.minimum(tl.maximum(codes, qmin, propagate_nan=tl.PropagateNan.ALL), qmax,
                         propagate_nan=tl.PropagateNan.ALL)
    return (clamped - z) * s, v, rounded, codes


@triton.jit
def _lsq_terms(g, v, rounded, codes, z, qmin, qmax):
    """Per element, for the upstream gradient g: the LSQ scale gradient's term and the LSQ+ zero point's, before
    the factors of :func:`_lsq_sums`."""
    below, above = codes < qmin, codes > qmax
    inside = (codes >= qmin) & (codes <= qmax)
    d_scale = tl.where(inside, rounded - v, tl.where(below, qmin - z, qmax - z))
    return g * d_scale, g * (below | above).to(tl.float32)


@triton.jit
def _lsq_sums(scale_terms, zero_terms, s, scale_ptr, eps, grad_scale):
    """The sums of accumulated :func:`_lsq_terms`: the scale gradient's (times grad_scale; zero for a scale
    clamped at eps: `scale_ptr` points at the row's scale) and the zero point's."""
    unclamped = (tl.load(scale_ptr).to(tl.float32) >= eps).to(tl.float32)
    return (tl.sum(scale_terms, axis=0) * (grad_scale * unclamped),
            tl.sum(zero_terms, axis=0) * (-s * grad_scale))


@triton.jit
def _passes(codes, qmin, qmax, live, RELU: tl.constexpr):
    """The gradient mask: code in range, and (RELU) x > 0, as torch.relu's gradient."""
    passes = (codes >= qmin) & (codes <= qmax)
    if RELU:
        passes = passes & live
    return passes


@triton.jit
def _forward_kernel(x_ptr, y_ptr, scale_ptr, zero_ptr, bits_ptr, row_len, n_blocks, zero_value, qmin, qmax, eps,
                    LEARNED: tl.constexpr, HAS_ZERO: tl.constexpr, RELU: tl.constexpr, SAVE_BITS: tl.constexpr,
                    BLOCK: tl.constexpr):
    """SAVE_BITS: also the gradient mask (code in range, and x > 0 with RELU), bit j % 8 of byte j // 8 of
    this program's BLOCK / 8 bytes at bits[program * BLOCK / 8]."""
    row, offs, inbounds, base = _program_tile(row_len, n_blocks, BLOCK)
    zero_value, qmin, qmax, eps = _scalars_f32(zero_value, qmin, qmax, eps)
    s, inv_s, z = _row_qparams(scale_ptr, zero_ptr, row, zero_value, qmin, qmax, eps, LEARNED, HAS_ZERO)
    x = tl.load(x_ptr + base + offs, mask=inbounds, other=0.0).to(tl.float32)
    live = x > 0.0
    if RELU:  # NaN stays NaN, as with torch.relu
        x = tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)
    y, _, _, codes = _fake_quantized(x, s, inv_s, z, qmin, qmax)
    tl.store(y_ptr + base + offs, y.to(y_ptr.dtype.element_ty), mask=inbounds)
    if SAVE_BITS:
        passes = _passes(codes, qmin, qmax, live, RELU)
        packed = tl.sum(passes.to(tl.int32) << tl.arange(0, 8)[None, :], axis=1).to(tl.uint8)
        tl.store(bits_ptr + tl.program_id(0).to(tl.int64) * (BLOCK // 8) + tl.arange(0, BLOCK // 8), packed)


@triton.jit
def _bits_backward_kernel(grad_ptr, bits_ptr, grad_x_ptr, row_len, n_blocks, BLOCK: tl.constexpr):
    """grad_x = grad where the forward's saved bit is set, else 0."""
    row, offs, inbounds, base = _program_tile(row_len, n_blocks, BLOCK)
    packed = tl.load(bits_ptr + tl.program_id(0).to(tl.int64) * (BLOCK // 8) + tl.arange(0, BLOCK // 8))
    passes = ((packed.to(tl.int32)[:, None] >> tl.arange(0, 8)[None, :]) & 1) != 0  # (BLOCK / 8, 8)
    g = tl.load(grad_ptr + base + offs, mask=inbounds, other=0.0)
    tl.store(grad_x_ptr + base + offs, tl.where(passes, g, 0.0).to(grad_x_ptr.dtype.element_ty), mask=inbounds)


@triton.jit
def _backward_kernel(grad_ptr, x_ptr, grad_x_ptr, scale_ptr, zero_ptr, partial_ptr, row_len, rows, n_spans,
                     zero_value, qmin, qmax, eps, grad_scale, LEARNED: tl.constexpr, HAS_ZERO: tl.constexpr,
                     RELU: tl.constexpr, SCALE_GRAD: tl.constexpr, ZERO_GRAD: tl.constexpr, BLOCK: tl.constexpr,
                     TILES: tl.constexpr):
    """grad_x = grad * (code in range) (RELU: and x > 0, as torch.relu's gradient). A program covers one span of
    TILES blocks of a row. SCALE_GRAD / ZERO_GRAD: the span's sum of the LSQ scale / LSQ+ zero-point gradient
    (times grad_scale; zero for a scale clamped at eps) into partial[0 / 1, row, span]."""
    row, span = tl.program_id(0) // n_spans, tl.program_id(0) % n_spans
    base = row.to(tl.int64) * row_len
    zero_value, qmin, qmax, eps = _scalars_f32(zero_value, qmin, qmax, eps)
    grad_scale = tl.cast(grad_scale, tl.float32)
    s, inv_s, z = _row_qparams(scale_ptr, zero_ptr, row, zero_value, qmin, qmax, eps, LEARNED, HAS_ZERO)
    scale_terms = tl.zeros([BLOCK], tl.float32)
    zero_terms = tl.zeros([BLOCK], tl.float32)
    for tile in tl.range(0, TILES, num_stages=1):
        offs = (span * TILES + tile) * BLOCK + tl.arange(0, BLOCK)
        inbounds = offs < row_len
        x = tl.load(x_ptr + base + offs, mask=inbounds, other=0.0).to(tl.float32)
        g = tl.load(grad_ptr + base + offs, mask=inbounds, other=0.0).to(tl.float32)
        live = x > 0.0
        if RELU:
            x = tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)
        y, v, rounded, codes = _fake_quantized(x, s, inv_s, z, qmin, qmax)
        passes = _passes(codes, qmin, qmax, live, RELU)
        tl.store(grad_x_ptr + base + offs, (g * passes.to(tl.float32)).to(grad_x_ptr.dtype.element_ty),
                 mask=inbounds)
        scale_term, zero_term = _lsq_terms(g, v, rounded, codes, z, qmin, qmax)
        if SCALE_GRAD:
            scale_terms += scale_term
        if ZERO_GRAD:
            zero_terms += zero_term
    partial_at = partial_ptr + row.to(tl.int64) * n_spans + span
    scale_sum, zero_sum = _lsq_sums(scale_terms, zero_terms, s, scale_ptr + row, eps, grad_scale)
    if SCALE_GRAD:
        tl.store(partial_at, scale_sum)
    if ZERO_GRAD:
        tl.store(partial_at + rows * n_spans, zero_sum)


@triton.jit
def _chain_forward_kernel(x_ptr, y1_ptr, y2_ptr, scale1_ptr, zero1_ptr, scale2_ptr, zero2_ptr, numel, zero_value1,
                          qmin1, qmax1, zero_value2, qmin2, qmax2, eps, HAS_ZERO1: tl.constexpr,
                          HAS_ZERO2: tl.constexpr, RELU: tl.constexpr, BLOCK: tl.constexpr):
    """y1 = fq1(x) (RELU: of relu(x)) and y2 = fq2(y1 as stored), both LSQ per-tensor grids."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inbounds = offs < numel
    zero_value1, qmin1, qmax1, eps = _scalars_f32(zero_value1, qmin1, qmax1, eps)
    zero_value2, qmin2, qmax2, _ = _scalars_f32(zero_value2, qmin2, qmax2, eps)
    s1, inv_s1, z1 = _row_qparams(scale1_ptr, zero1_ptr, 0, zero_value1, qmin1, qmax1, eps, True, HAS_ZERO1)
    s2, inv_s2, z2 = _row_qparams(scale2_ptr, zero2_ptr, 0, zero_value2, qmin2, qmax2, eps, True, HAS_ZERO2)
    x = tl.load(x_ptr + offs, mask=inbounds, other=0.0).to(tl.float32)
    if RELU:
        x = tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)
    y1 = _fake_quantized(x, s1, inv_s1, z1, qmin1, qmax1)[0].to(y1_ptr.dtype.element_ty)
    tl.store(y1_ptr + offs, y1, mask=inbounds)
    y2 = _fake_quantized(y1.to(tl.float32), s2, inv_s2, z2, qmin2, qmax2)[0]
    tl.store(y2_ptr + offs, y2.to(y2_ptr.dtype.element_ty), mask=inbounds)


@triton.jit
def _chain_backward_kernel(grad1_ptr, grad2_ptr, x_ptr, grad_x_ptr, scale1_ptr, zero1_ptr, scale2_ptr, zero2_ptr,
                           partial_ptr, numel, n_spans, zero_value1, qmin1, qmax1, zero_value2, qmin2, qmax2, eps,
                           grad_scale1, grad_scale2, HAS_ZERO1: tl.constexpr, HAS_ZERO2: tl.constexpr,
                           HAS_GRAD1: tl.constexpr, HAS_GRAD2: tl.constexpr, RELU: tl.constexpr, BLOCK: tl.constexpr,
                           TILES: tl.constexpr):
    """The backward of _chain_forward_kernel: y1's gradient is grad1 + fq2's gradient to its input, summed in y1's
    dtype as autograd sums them; grad_x = that * (code in fq1's range) (RELU: and x > 0). A program covers one span
    of TILES blocks; the span's sums of the four qparams' gradients (scale1, zero1, scale2, zero2) go into
    partial[0..3, span]. A gradient that autograd did not produce (HAS_GRAD1 / HAS_GRAD2 false: nothing else reads
    that output) is zero and not read."""
    span = tl.program_id(0)
    zero_value1, qmin1, qmax1, eps = _scalars_f32(zero_value1, qmin1, qmax1, eps)
    zero_value2, qmin2, qmax2, unused_eps = _scalars_f32(zero_value2, qmin2, qmax2, eps)
    grad_scale1, grad_scale2 = tl.cast(grad_scale1, tl.float32), tl.cast(grad_scale2, tl.float32)
    s1, inv_s1, z1 = _row_qparams(scale1_ptr, zero1_ptr, 0, zero_value1, qmin1, qmax1, eps, True, HAS_ZERO1)
    s2, inv_s2, z2 = _row_qparams(scale2_ptr, zero2_ptr, 0, zero_value2, qmin2, qmax2, eps, True, HAS_ZERO2)
    scale1_terms = tl.zeros([BLOCK], tl.float32)
    zero1_terms = tl.zeros([BLOCK], tl.float32)
    scale2_terms = tl.zeros([BLOCK], tl.float32)
    zero2_terms = tl.zeros([BLOCK], tl.float32)
    for tile in tl.range(0, TILES, num_stages=1):
        offs = (span.to(tl.int64) * TILES + tile) * BLOCK + tl.arange(0, BLOCK)
        inbounds = offs < numel
        x = tl.load(x_ptr + offs, mask=inbounds, other=0.0).to(tl.float32)
        g1 = tl.load(grad1_ptr + offs, mask=inbounds, other=0.0).to(tl.float32) if HAS_GRAD1 else 0.0
        g2 = tl.load(grad2_ptr + offs, mask=inbounds, other=0.0).to(tl.float32) if HAS_GRAD2 else 0.0
        live = x > 0.0
        if RELU:
            x = tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)
        y1, v1, rounded1, codes1 = _fake_quantized(x, s1, inv_s1, z1, qmin1, qmax1)
        y1 = y1.to(grad_x_ptr.dtype.element_ty).to(tl.float32)  # as fq2 read it
        y2, v2, rounded2, codes2 = _fake_quantized(y1, s2, inv_s2, z2, qmin2, qmax2)
        passes2 = _passes(codes2, qmin2, qmax2, live, False).to(tl.float32)
        g = (g1 + g2 * passes2).to(grad_x_ptr.dtype.element_ty).to(tl.float32)
        passes1 = _passes(codes1, qmin1, qmax1, live, RELU)
        tl.store(grad_x_ptr + offs, (g * passes1.to(tl.float32)).to(grad_x_ptr.dtype.element_ty), mask=inbounds)
        scale_term, zero_term = _lsq_terms(g, v1, rounded1, codes1, z1, qmin1, qmax1)
        scale1_terms += scale_term
        zero1_terms += zero_term
        scale_term, zero_term = _lsq_terms(g2, v2, rounded2, codes2, z2, qmin2, qmax2)
        scale2_terms += scale_term
        zero2_terms += zero_term
    scale1_sum, zero1_sum = _lsq_sums(scale1_terms, zero1_terms, s1, scale1_ptr, eps, grad_scale1)
    scale2_sum, zero2_sum = _lsq_sums(scale2_terms, zero2_terms, s2, scale2_ptr, eps, grad_scale2)
    tl.store(partial_ptr + span, scale1_sum)
    tl.store(partial_ptr + n_spans + span, zero1_sum)
    tl.store(partial_ptr + 2 * n_spans + span, scale2_sum)
    tl.store(partial_ptr + 3 * n_spans + span, zero2_sum)


@dataclass(frozen=True)
class _Grid:
    """Integer range and gradient options of one fused call (hashable constants, no tensors)."""

    qmin: int
    qmax: int
    learned: bool  # LSQ clamps on scale and zero point
    zero_value: float  # the zero point when no zero-point tensor is given
    grad_scale: float  # LSQ's gradient scale (unused for the plain clipped STE)
    relu: bool = False  # a ReLU folded in before the fake-quant


def _block(row_len: int, max_block: int = MAX_BLOCK) -> int:
    return max(MIN_BLOCK, min(max_block, triton.next_power_of_2(row_len)))


def _launch_shape(x: Tensor, rows: int) -> tuple[int, int, int]:
    """(row length, block size, blocks per row); the grid is one program per (row, block), row-major."""
    row_len = x.numel() // rows
    block = _block(row_len)
    return row_len, block, triton.cdiv(row_len, block)


@dataclass(frozen=True)
class _Spans:
    """The LSQ backward kernels' launch: blocks of `block` elements, `tiles` blocks per program (a span), `n_spans`
    programs per row. Spans of LSQ_BACKWARD_TILES blocks where that gives at least LSQ_BACKWARD_MIN_SPANS
    programs, else one block per program."""

    row_len: int
    block: int
    tiles: int
    n_spans: int

    @classmethod
    def of(cls, x: Tensor, rows: int) -> _Spans:
        row_len = x.numel() // rows
        block = _block(row_len, LSQ_BACKWARD_BLOCK)
        tiles = min(LSQ_BACKWARD_TILES, triton.next_power_of_2(triton.cdiv(row_len, block)))
        if rows * triton.cdiv(row_len, block * tiles) < LSQ_BACKWARD_MIN_SPANS:
            block, tiles = _block(row_len, LSQ_BACKWARD_SHORT_BLOCK), 1
        return cls(row_len, block, tiles, triton.cdiv(row_len, block * tiles))


def _launcher(kernel, traced: bool):
    """`kernel` (eager), or wrapped so that torch.compile traces its launch into the graph (`traced`)."""
    return torch.library.wrap_triton(kernel) if traced and not _INTERPRETED else kernel


def _options(traced: bool) -> dict:
    """NO_FMA for eager launches (bit-exact against the torch formula). Inductor compiles a traced kernel with its
    own options: the fixed-qparams kernels have no multiply followed by an add to fuse; the LSQ backward's
    block sums may then differ from eager's in the last bits."""
    return {} if traced else NO_FMA


def _streaming_warps(block: int) -> int:
    """Warps of the forward and bits-backward kernels: 8 for blocks of 2048 elements and more."""
    return 8 if block >= 2048 else 4


def _bits_bytes(rows: int, block: int, n_blocks: int) -> int:
    """Size of the forward's mask bits: BLOCK / 8 bytes per program."""
    return rows * n_blocks * block // 8


def _forward(x: Tensor, scale: Tensor, zero_point: Tensor | None, rows: int, grid: _Grid,
             save_bits: bool, traced: bool = False) -> tuple[Tensor, Tensor | None]:
    """(y, the gradient mask's bits or None)."""
    y = torch.empty_like(x)
    row_len, block, n_blocks = _launch_shape(x, rows)
    bits = torch.empty(_bits_bytes(rows, block, n_blocks), device=x.device, dtype=torch.uint8) if save_bits else None
    _launcher(_forward_kernel, traced)[(rows * n_blocks,)](
        x, y, scale, zero_point if zero_point is not None else scale, bits if save_bits else y, row_len, n_blocks,
        grid.zero_value, float(grid.qmin), float(grid.qmax), SCALE_EPS, LEARNED=grid.learned,
        HAS_ZERO=zero_point is not None, RELU=grid.relu, SAVE_BITS=save_bits, BLOCK=block,
        num_warps=_streaming_warps(block), **_options(traced),
    )
    return y, bits


def same_layout(grad: Tensor, like: Tensor) -> Tensor:
    """grad (its dtype kept) in like's memory order: one flat index addresses both."""
    return grad if grad.stride() == like.stride() else torch.empty_like(like, dtype=grad.dtype).copy_(grad)


_CHANNELS_LAST_FORMAT = {4: torch.channels_last, 5: torch.channels_last_3d}


@dataclass(frozen=True)
class _Layout:
    """What the backward needs of x when autograd keeps only its mask bits. x is dense (see
    :func:`qat.quant.affine.is_dense`), so contiguous or in the channels_last format of its rank."""

    shape: torch.Size
    channels_last: bool
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, x: Tensor) -> _Layout:
        return cls(x.shape, not x.is_contiguous(), x.dtype, x.device)

    @property
    def memory_format(self) -> torch.memory_format:
        return _CHANNELS_LAST_FORMAT[len(self.shape)] if self.channels_last else torch.contiguous_format

    def empty(self) -> Tensor:
        # torch.empty, not empty_strided: AOT autograd's CSE merges equal empty_strided calls, so quantizers of
        # equally shaped activations would write one buffer, which inductor then clones (and torch 2.11's inductor
        # fails to with a dynamic batch)
        return torch.empty(self.shape, dtype=self.dtype, device=self.device, memory_format=self.memory_format)


def _bits_backward(grad: Tensor, bits: Tensor, layout: _Layout, rows: int, traced: bool = False) -> Tensor:
    grad = grad.contiguous(memory_format=layout.memory_format)  # x's memory order: one flat index addresses both
    grad_x = layout.empty()
    row_len, block, n_blocks = _launch_shape(grad_x, rows)
    _launcher(_bits_backward_kernel, traced)[(rows * n_blocks,)](grad, bits, grad_x, row_len, n_blocks, BLOCK=block,
                                                                 num_warps=_streaming_warps(block))
    return grad_x


def _backward(grad: Tensor, x: Tensor, scale: Tensor, zero_point: Tensor | None, rows: int, grid: _Grid,
              scale_grad: bool, zero_grad: bool, traced: bool = False) -> tuple[Tensor, Tensor | None]:
    """(grad_x, sums (2, rows) of the scale / zero-point gradients (a row not asked for: unset), or None)."""
    grad = same_layout(grad, x)
    grad_x = torch.empty_like(x)
    spans = _Spans.of(x, rows)
    wanted = scale_grad or zero_grad
    partials = torch.empty((2, rows, spans.n_spans), device=x.device, dtype=torch.float32) if wanted else grad_x
    _launcher(_backward_kernel, traced)[(rows * spans.n_spans,)](
        grad, x, grad_x, scale, zero_point if zero_point is not None else scale, partials, spans.row_len, rows,
        spans.n_spans,
        grid.zero_value, float(grid.qmin), float(grid.qmax), SCALE_EPS, grid.grad_scale,
        LEARNED=grid.learned, HAS_ZERO=zero_point is not None, RELU=grid.relu, SCALE_GRAD=scale_grad,
        ZERO_GRAD=zero_grad, BLOCK=spans.block, TILES=spans.tiles, num_warps=4, **_options(traced),
    )
    sums = partials.sum(dim=-1) if wanted else None  # (2, rows, spans) -> (2, rows)
    return grad_x, sums


def _qparam_gradients(sums: Tensor | None, scale: Tensor, zero_point: Tensor | None, scale_grad: bool,
                      zero_grad: bool) -> tuple[Tensor | None, Tensor | None]:
    """The scale's and zero point's gradients (each None unless asked for) from the backward's sums (2, rows)."""
    grad_scale = sums[0].reshape(scale.shape).to(scale.dtype) if scale_grad else None
    grad_zero = sums[1].reshape(zero_point.shape).to(zero_point.dtype) if zero_grad else None
    return grad_scale, grad_zero


@dataclass(frozen=True)
class LearnedGrid:
    """One LSQ / LSQ+ per-tensor quantizer of a chain: its parameters, spec and gradient scale."""

    scale: Tensor
    zero_point: Tensor | None
    spec: QuantSpec
    grad_scale: float


def _chain_scalars(first: _Grid, second: _Grid) -> tuple:
    """The kernels' float scalar arguments, first grid then second (zero value, qmin, qmax each)."""
    return (first.zero_value, float(first.qmin), float(first.qmax), second.zero_value, float(second.qmin),
            float(second.qmax))


def _chain_forward(x: Tensor, scale1: Tensor, zero1: Tensor | None, scale2: Tensor, zero2: Tensor | None,
                   first: _Grid, second: _Grid, traced: bool = False) -> tuple[Tensor, Tensor]:
    """(y1, y2) of two per-tensor LSQ quantizers in a row: one read of x, no read of y1."""
    y1, y2 = torch.empty_like(x), torch.empty_like(x)
    block = _block(x.numel())
    _launcher(_chain_forward_kernel, traced)[(triton.cdiv(x.numel(), block),)](
        x, y1, y2, scale1, zero1 if zero1 is not None else scale1, scale2, zero2 if zero2 is not None else scale2,
        x.numel(), *_chain_scalars(first, second), SCALE_EPS, HAS_ZERO1=zero1 is not None,
        HAS_ZERO2=zero2 is not None, RELU=first.relu, BLOCK=block, num_warps=_streaming_warps(block),
        **_options(traced),
    )
    return y1, y2


def _chain_backward(grad1: Tensor | None, grad2: Tensor | None, x: Tensor, scale1: Tensor, zero1: Tensor | None,
                    scale2: Tensor, zero2: Tensor | None, first: _Grid, second: _Grid,
                    traced: bool = False) -> tuple[Tensor, Tensor]:
    """(grad_x, sums (2, 2, 1): [quantizer][scale, zero point] gradients); a gradient None is zero (not
    materialized). Spans as in :func:`_backward`."""
    has_grad1, has_grad2 = grad1 is not None, grad2 is not None
    grad1, grad2 = (x if g is None else same_layout(g, x) for g in (grad1, grad2))  # x: a pointer not read
    grad_x = torch.empty_like(x)
    spans = _Spans.of(x, 1)
    partials = torch.empty((4, spans.n_spans), device=x.device, dtype=torch.float32)
    _launcher(_chain_backward_kernel, traced)[(spans.n_spans,)](
        grad1, grad2, x, grad_x, scale1, zero1 if zero1 is not None else scale1, scale2,
        zero2 if zero2 is not None else scale2, partials, x.numel(), spans.n_spans, *_chain_scalars(first, second),
        SCALE_EPS, first.grad_scale, second.grad_scale, HAS_ZERO1=zero1 is not None, HAS_ZERO2=zero2 is not None,
        HAS_GRAD1=has_grad1, HAS_GRAD2=has_grad2, RELU=first.relu, BLOCK=spans.block, TILES=spans.tiles,
        num_warps=4, **_options(traced),
    )
    return grad_x, partials.sum(dim=-1).view(2, 2, 1)  # (4, spans) -> [quantizer][scale, zero][row]


def _needed_chain_gradients(needs: Sequence[bool], grad2: Tensor | None) -> list[bool]:
    """Which of the four qparams get a gradient: as autograd asks, but none for fq2's when y2 got no gradient
    (nothing read it, as with the two calls, where fq2's backward would not run)."""
    return [need and (i < 2 or grad2 is not None) for i, need in enumerate(needs)]


def _chain_gradients(sums: Tensor, scale1, zero1, scale2, zero2, needs: Sequence[bool]) -> tuple:
    """The four qparams' gradients (None where not needed) from _chain_backward's sums."""
    return (*_qparam_gradients(sums[0], scale1, zero1, needs[0], needs[1]),
            *_qparam_gradients(sums[1], scale2, zero2, needs[2], needs[3]))


class _FusedChain(torch.autograd.Function):
    """Two per-tensor LSQ / LSQ+ quantizers in a row, y2 = fq2(fq1(x)), as one forward and one backward pass."""

    @staticmethod
    def forward(ctx, x, scale1, zero1, scale2, zero2, first: _Grid, second: _Grid):
        ctx.grids = (first, second)
        ctx.set_materialize_grads(False)  # y1 read by nothing but fq2: its gradient is not a tensor of zeros
        ctx.save_for_backward(x, scale1, zero1, scale2, zero2)
        return _chain_forward(x, scale1, zero1, scale2, zero2, first, second)

    @staticmethod
    def backward(ctx, grad1, grad2):
        x, scale1, zero1, scale2, zero2 = ctx.saved_tensors
        grad_x, sums = _chain_backward(grad1, grad2, x, scale1, zero1, scale2, zero2, *ctx.grids)
        needs = _needed_chain_gradients(ctx.needs_input_grad[1:5], grad2)
        return (grad_x, *_chain_gradients(sums, scale1, zero1, scale2, zero2, needs), None, None)


class _FusedFakeQuantize(torch.autograd.Function):
    """Clipped-STE fake quantization (fixed qparams: backward from saved mask bits) or LSQ / LSQ+ (learned:
    backward from x), on rows of a dense x."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, rows: int, grid: _Grid):
        ctx.rows, ctx.grid = rows, grid
        y, bits = _forward(x, scale, zero_point, rows, grid, save_bits=not grid.learned)
        if grid.learned:
            ctx.save_for_backward(x, scale, zero_point)
        else:
            ctx.save_for_backward(bits)
            ctx.layout = _Layout.of(x)
        return y

    @staticmethod
    def backward(ctx, grad):
        if not ctx.grid.learned:
            (bits,) = ctx.saved_tensors
            return _bits_backward(grad, bits, ctx.layout, ctx.rows), None, None, None, None
        x, scale, zero_point = ctx.saved_tensors
        scale_grad, zero_grad = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_x, sums = _backward(grad, x, scale, zero_point, ctx.rows, ctx.grid, scale_grad, zero_grad)
        return (grad_x, *_qparam_gradients(sums, scale, zero_point, scale_grad, zero_grad), None, None)


# torch.compile sees the kernels as operators with the autograd function's arithmetic. Fixed qparams: the forward
# (y and the mask bits) is an operator; its backward unpacks the bits with torch ops, which inductor fuses into
# the gradient's next kernels (or, for layouts that do not fill whole bytes along the innermost dim, is the bits
# backward operator). LSQ / LSQ+: the forward (y) and the backward (grad_x and the qparams' gradient
# sums). On the GPU they are `triton_op`s: inductor traces their launches into its own code (no
# Python dispatch per call). Triton's interpreter cannot be traced: there they are opaque `custom_op`s with fake
# (shape-only) implementations, which the CPU tests check. Eager mode keeps `_FusedFakeQuantize`, whose dispatch
# costs less host time.
def _operator(name: str, fake: Callable):
    """The schema comes from the implementation's annotations."""
    def define(implementation: Callable):
        if not _INTERPRETED:
            return torch.library.triton_op(name, implementation, mutates_args=())
        op = torch.library.custom_op(name, implementation, mutates_args=())
        op.register_fake(fake)
        return op

    return define


def _fake_quantize_fake(x, scale, zero_point, rows, qmin, qmax, relu):
    _, block, n_blocks = _launch_shape(x, rows)  # symbolic for a dynamic batch
    return torch.empty_like(x), x.new_empty(_bits_bytes(rows, block, n_blocks), dtype=torch.uint8)


@_operator("qat::fused_fake_quantize", fake=_fake_quantize_fake)
def _fake_quantize_op(x: Tensor, scale: Tensor, zero_point: Tensor, rows: int, qmin: int, qmax: int,
                      relu: bool) -> tuple[Tensor, Tensor]:
    """(y, the gradient mask's bits) of the clipped-STE fake-quant of rows of a dense x."""
    grid = _Grid(qmin, qmax, learned=False, zero_value=0.0, grad_scale=0.0, relu=relu)
    return _forward(x, scale, zero_point, rows, grid, save_bits=True, traced=True)


def _setup_fake_quantize_op(ctx, inputs, output):
    x, rows = inputs[0], inputs[3]
    ctx.save_for_backward(output[1])
    order = storage_order(x)  # size-1 dims first: they do not move an address, and the innermost is then a real one
    ctx.order = [d for d in order if x.shape[d] == 1] + [d for d in order if x.shape[d] != 1]
    ctx.rows, ctx.channels_last = rows, _Layout.of(x).channels_last


def _fake_quantize_op_backward(ctx, grad_y, _grad_bits):
    """Where x's innermost dim in memory has a static size that fills whole bytes (channels_last activations),
    torch ops that inductor fuses into the kernels reading the gradient next (the folded BN's backward): grad_x is
    never written out. Else the bits-backward kernel: the general unpacking's index arithmetic (flat index // 8
    and % 8 over the permuted dims) stalls inductor's sympy simplification with dynamic shapes. Torch 2.11's
    inductor compiles this correctly for CUDA (measured on an H200, BENCHMARKS.md session 15); for the CPU it
    misorders the fused kernels, but there these operators run only in tests, through Triton's interpreter."""
    (bits,) = ctx.saved_tensors
    innermost = grad_y.shape[ctx.order[-1]]
    if isinstance(innermost, int) and innermost % 8 == 0:
        passes = unpacked_bits(bits, grad_y.shape, ctx.order, ctx.rows)
        grad_x = torch.where(passes, grad_y, 0)
    else:
        grad_x = torch.ops.qat.fused_fake_quantize_bits_backward(grad_y, bits, ctx.rows, ctx.channels_last)
    return (grad_x,) + (None,) * 6


_fake_quantize_op.register_autograd(_fake_quantize_op_backward, setup_context=_setup_fake_quantize_op)


def unpacked_bits(bits: Tensor, shape: Sequence[int], order: Sequence[int], rows: int) -> Tensor:
    """The forward's gradient mask, packed in `bits`, as a bool tensor of x's `shape` (`order`: x's dims in
    memory order, see :func:`qat.quant.affine.storage_order`, the innermost of a size divisible by 8; `rows`:
    as in the forward). Each byte holds 8 neighbours along the innermost dim.

    >>> bits = torch.tensor([0b00000110, 0b10000000], dtype=torch.uint8)  # elements 1, 2 and 15 pass
    >>> unpacked_bits(bits, (2, 8), (0, 1), rows=1).nonzero().tolist()
    [[0, 1], [0, 2], [1, 7]]
    """
    *outer, innermost = (shape[d] for d in order)
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    row_bytes = bits.view(rows, -1)[:, : math.prod(shape) // rows // 8]  # (rows, bytes of a row's elements)
    flags = (row_bytes.reshape(*outer, innermost // 8, 1) >> shifts) & 1  # (..., innermost / 8, 8): bit j of byte k
    in_memory_order = flags.reshape(*outer, innermost)
    return in_memory_order.permute(sorted(range(len(order)), key=order.__getitem__)) != 0  # back to x's dims


def _bits_backward_fake(grad, bits, rows, channels_last):
    return _Layout(grad.shape, channels_last, grad.dtype, grad.device).empty()


@_operator("qat::fused_fake_quantize_bits_backward", fake=_bits_backward_fake)
def _bits_backward_op(grad: Tensor, bits: Tensor, rows: int, channels_last: bool) -> Tensor:
    """grad where the forward's bit is set, else 0, laid out as x was (contiguous, or `channels_last`)."""
    layout = _Layout(grad.shape, channels_last, grad.dtype, grad.device)
    return _bits_backward(grad, bits, layout, rows, traced=True)


def _lsq_fake_quantize_fake(x, scale, zero_point, rows, qmin, qmax, zero_value, grad_scale, relu):
    return torch.empty_like(x)


@_operator("qat::fused_lsq_fake_quantize", fake=_lsq_fake_quantize_fake)
def _lsq_fake_quantize_op(x: Tensor, scale: Tensor, zero_point: Optional[Tensor], rows: int, qmin: int, qmax: int,
                          zero_value: float, grad_scale: float, relu: bool) -> Tensor:
    """LSQ / LSQ+ fake-quant of rows of a dense x (the backward reads x again)."""
    grid = _Grid(qmin, qmax, learned=True, zero_value=zero_value, grad_scale=grad_scale, relu=relu)
    return _forward(x, scale, zero_point, rows, grid, save_bits=False, traced=True)[0]


def _setup_lsq_fake_quantize_op(ctx, inputs, output):
    x, scale, zero_point, rows, qmin, qmax, zero_value, grad_scale, relu = inputs
    ctx.save_for_backward(x, scale, zero_point)
    ctx.arguments = (rows, qmin, qmax, zero_value, grad_scale, relu)


def _lsq_fake_quantize_op_backward(ctx, grad_y):
    x, scale, zero_point = ctx.saved_tensors
    grad_x, sums = torch.ops.qat.fused_lsq_backward(grad_y, x, scale, zero_point, *ctx.arguments)
    qparam_grads = _qparam_gradients(sums, scale, zero_point, ctx.needs_input_grad[1], ctx.needs_input_grad[2])
    return (grad_x, *qparam_grads) + (None,) * 6


_lsq_fake_quantize_op.register_autograd(_lsq_fake_quantize_op_backward, setup_context=_setup_lsq_fake_quantize_op)


def _lsq_backward_fake(grad, x, scale, zero_point, rows, qmin, qmax, zero_value, grad_scale, relu):
    return torch.empty_like(x), x.new_empty((2, rows), dtype=torch.float32)


@_operator("qat::fused_lsq_backward", fake=_lsq_backward_fake)
def _lsq_backward_op(grad: Tensor, x: Tensor, scale: Tensor, zero_point: Optional[Tensor], rows: int, qmin: int,
                     qmax: int, zero_value: float, grad_scale: float, relu: bool) -> tuple[Tensor, Tensor]:
    """(grad_x, sums (2, rows): the scale's and the zero point's gradient). Both sums are always computed (a
    few more operations per element), so that the result has no unset row."""
    grid = _Grid(qmin, qmax, learned=True, zero_value=zero_value, grad_scale=grad_scale, relu=relu)
    return _backward(grad, x, scale, zero_point, rows, grid, scale_grad=True, zero_grad=True, traced=True)


def _chain_fake(x, scale1, zero1, scale2, zero2, qmin1, qmax1, zero_value1, grad_scale1, qmin2, qmax2, zero_value2,
                grad_scale2, relu):
    return torch.empty_like(x), torch.empty_like(x)


def _chain_grids(qmin1, qmax1, zero_value1, grad_scale1, qmin2, qmax2, zero_value2, grad_scale2, relu):
    return (_Grid(qmin1, qmax1, learned=True, zero_value=zero_value1, grad_scale=grad_scale1, relu=relu),
            _Grid(qmin2, qmax2, learned=True, zero_value=zero_value2, grad_scale=grad_scale2))


@_operator("qat::fused_lsq_chain", fake=_chain_fake)
def _chain_op(x: Tensor, scale1: Tensor, zero1: Optional[Tensor], scale2: Tensor, zero2: Optional[Tensor], qmin1: int,
              qmax1: int, zero_value1: float, grad_scale1: float, qmin2: int, qmax2: int, zero_value2: float,
              grad_scale2: float, relu: bool) -> tuple[Tensor, Tensor]:
    """(y1, y2) of two per-tensor LSQ / LSQ+ quantizers in a row (the backward reads x again)."""
    grids = _chain_grids(qmin1, qmax1, zero_value1, grad_scale1, qmin2, qmax2, zero_value2, grad_scale2, relu)
    return _chain_forward(x, scale1, zero1, scale2, zero2, *grids, traced=True)


def _setup_chain_op(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:5])
    ctx.arguments = inputs[5:]


def _chain_op_backward(ctx, grad1, grad2):
    x, scale1, zero1, scale2, zero2 = ctx.saved_tensors
    grad_x, sums = torch.ops.qat.fused_lsq_chain_backward(grad1, grad2, x, scale1, zero1, scale2, zero2,
                                                          *ctx.arguments)
    needs = _needed_chain_gradients(ctx.needs_input_grad[1:5], grad2)
    return (grad_x, *_chain_gradients(sums, scale1, zero1, scale2, zero2, needs)) + (None,) * 9


_chain_op.register_autograd(_chain_op_backward, setup_context=_setup_chain_op)


def _chain_backward_fake(grad1, grad2, x, scale1, zero1, scale2, zero2, *arguments):
    return torch.empty_like(x), x.new_empty((2, 2, 1), dtype=torch.float32)


@_operator("qat::fused_lsq_chain_backward", fake=_chain_backward_fake)
def _chain_backward_op(grad1: Optional[Tensor], grad2: Optional[Tensor], x: Tensor, scale1: Tensor, zero1: Optional[Tensor], scale2: Tensor,
                       zero2: Optional[Tensor], qmin1: int, qmax1: int, zero_value1: float, grad_scale1: float,
                       qmin2: int, qmax2: int, zero_value2: float, grad_scale2: float,
                       relu: bool) -> tuple[Tensor, Tensor]:
    """(grad_x, the four qparams' gradient sums (2, 2, 1)) of :func:`_chain_op`."""
    grids = _chain_grids(qmin1, qmax1, zero_value1, grad_scale1, qmin2, qmax2, zero_value2, grad_scale2, relu)
    return _chain_backward(grad1, grad2, x, scale1, zero1, scale2, zero2, *grids, traced=True)


def _apply(x: Tensor, scale: Tensor, zero_point: Tensor | None, rows: int, grid: _Grid) -> Tensor:
    """The fused fake-quant of rows of a dense x: the autograd function, or the operators under torch.compile."""
    if not torch.compiler.is_compiling():
        return _FusedFakeQuantize.apply(x, scale, zero_point, rows, grid)
    if grid.learned:
        return torch.ops.qat.fused_lsq_fake_quantize(x, scale, zero_point, rows, grid.qmin, grid.qmax,
                                                     grid.zero_value, grid.grad_scale, grid.relu)
    return torch.ops.qat.fused_fake_quantize(x, scale, zero_point, rows, grid.qmin, grid.qmax, grid.relu)[0]


def _dense(x: Tensor) -> Tensor:
    """x itself when its elements fill its storage without gaps in a layout we index flat, else a copy."""
    return x if is_dense(x) else x.contiguous()


def _axis(x: Tensor, spec: QuantSpec) -> int:
    return spec.axis % x.dim()


def _fused(x: Tensor, scale: Tensor, zero_point: Tensor | None, spec: QuantSpec, grid: _Grid) -> Tensor:
    if x.numel() == 0:
        return x * 1  # keeps autograd and dtype; nothing to quantize
    x = _dense(x)
    if spec.granularity is Granularity.PER_TENSOR:
        return _apply(x, scale, zero_point, 1, grid)
    axis = _axis(x, spec)
    channels = x.shape[axis]
    if channels > 1 and x.stride(axis) * channels != x.numel():  # channel rows not contiguous in memory
        moved = _apply(x.movedim(axis, 0).contiguous(), scale, zero_point, channels, grid)
        return moved.movedim(0, axis)  # (C, ...) -> x's dim order
    return _apply(x, scale, zero_point, channels, grid)


def _new_grid(spec: QuantSpec, learned: bool, grad_scale: float, relu: bool) -> _Grid:
    zero_value = float(spec.fixed_zero_point) if learned else 0.0
    return _Grid(spec.qmin, spec.qmax, learned=learned, zero_value=zero_value, grad_scale=grad_scale, relu=relu)


_cached_grid = functools.lru_cache(maxsize=None)(_new_grid)


def _grid(spec: QuantSpec, learned: bool, grad_scale: float, relu: bool) -> _Grid:
    """Cached in eager mode (host time per call); torch.compile traces the construction instead."""
    return (_new_grid if torch.compiler.is_compiling() else _cached_grid)(spec, learned, grad_scale, relu)


def _as_rows(t: Tensor, dtype: torch.dtype) -> Tensor:
    """`t` (reduced shape: () or (C,)) as the kernels read it: contiguous, of `dtype`, no autograd history.
    The quantizers' buffers already are, so the hot path dispatches nothing here."""
    if t.dtype == dtype and t.dim() <= 1 and t.is_contiguous() and not t.requires_grad:
        return t
    return t.detach().to(dtype).reshape(-1)


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec, relu: bool = False) -> Tensor:
    """Fused :func:`qat.quant.affine.fake_quantize` (per-tensor / per-channel; no gradient to the qparams)."""
    grid = _grid(spec, False, 0.0, relu)
    return _fused(x, _as_rows(scale, torch.float32), _as_rows(zero_point, torch.int32), spec, grid)


def lsq_fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor | None, spec: QuantSpec, grad_scale: float,
                      relu: bool = False) -> Tensor:
    """Fused :func:`qat.quant.learnable.lsq_fake_quantize`: gradients to x, scale and (LSQ+) zero_point."""
    zero = None if zero_point is None else zero_point.reshape(-1)
    return _fused(x, scale.reshape(-1), zero, spec, _grid(spec, True, float(grad_scale), relu))


def lsq_chain_fake_quantize(x: Tensor, first: LearnedGrid, second: LearnedGrid, relu: bool = False
                            ) -> tuple[Tensor, Tensor]:
    """(y1, y2) = (fq1(x), fq2(y1)) for two per-tensor LSQ / LSQ+ quantizers (`relu`: fq1 takes relu(x)), with
    the values and gradients of the two calls in a row: one pass each way, where the two calls make two and
    autograd adds y1's two gradients in a third. x must be a non-empty CUDA float tensor (or CPU under
    Triton's interpreter).

    >>> import torch
    >>> from qat.quant.spec import QuantSpec
    >>> if torch.cuda.is_available():  # doctest: +SKIP
    ...     x = torch.randn(8, 16, device="cuda")
    ...     grid = LearnedGrid(torch.tensor(0.1, device="cuda"), None, QuantSpec(bits=4, symmetric=True), 0.01)
    ...     y1, y2 = lsq_chain_fake_quantize(x, grid, grid)
    """
    for grid in (first, second):
        if grid.spec.granularity is not Granularity.PER_TENSOR:
            raise ValueError(f"a quantizer chain takes per-tensor grids, got {grid.spec.granularity.value}")
    x = _dense(x)
    grids = [_grid(g.spec, True, float(g.grad_scale), relu and i == 0) for i, g in enumerate((first, second))]
    params = [t for g in (first, second) for t in (g.scale.reshape(-1), None if g.zero_point is None
                                                   else g.zero_point.reshape(-1))]
    if not torch.compiler.is_compiling():
        return _FusedChain.apply(x, *params, *grids)
    one, two = grids
    return torch.ops.qat.fused_lsq_chain(x, *params, one.qmin, one.qmax, one.zero_value, one.grad_scale, two.qmin,
                                         two.qmax, two.zero_value, two.grad_scale, relu)
