"""Reference int8 kernels: exact integer accumulation in plain torch, on any device. The ground truth.

Accumulation runs in float64 on integer-valued tensors, which is exact (every partial sum stays far below
2**53), then the conventions of the project apply:

    y     = float32(acc) * float32(s_x * s_w[c]) + bias[c]                  (float32)
    q_out = clamp(round(y * float32(1 / s_out)) + z_out, lo, qmax)          (round half to even)
    lo    = max(qmin, z_out) with a fused ReLU, else qmin

Activation-activation ops (add, mul, cat) dequantize each input in float32, ``(q - z) * s``, combine, and
requantize, which is what the fake-quant graph computes.

>>> import torch
>>> from qat.kernels.types import ActQParams, Int8Weight
>>> qp = ActQParams(scale=0.5, zero_point=10, qmin=0, qmax=255)
>>> x = quantize_activation(torch.tensor([[1.0, -2.0]]), qp); x
tensor([[12,  6]], dtype=torch.uint8)
>>> be = ReferenceBackend()
>>> w = Int8Weight(q=torch.tensor([[3, -1]], dtype=torch.int8), scale=torch.tensor([0.25]))
>>> be.linear(x, qp, be.pack_linear(w, torch.tensor([0.125])))  # (2*3 + -4*-1) * 0.5*0.25 + 0.125
tensor([[1.3750]])
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from qat.kernels.types import ActQParams, AttentionGrids, ConvGeometry, Int8Weight, Packed, float32


def quantize_activation(x: Tensor, qp: ActQParams) -> Tensor:
    """``clamp(round(x * inv_scale) + z, qmin, qmax)`` as ``qp.dtype``; matches torch's fake-quant bit for bit."""
    q = torch.round(x.float() * qp.inv_scale) + qp.zero_point
    return q.clamp_(qp.qmin, qp.qmax).to(qp.dtype)


def dequantize_activation(q: Tensor, qp: ActQParams) -> Tensor:
    """``(q - z) * scale`` in float32."""
    return (q.float() - qp.zero_point) * qp.scale


def requantize(y: Tensor, qp: ActQParams, relu: bool = False) -> Tensor:
    """Float32 ``y`` to ``qp``; a fused ReLU raises the lower clamp bound to ``qp.relu_floor``."""
    low = qp.relu_floor if relu else qp.qmin
    q = torch.round(y * qp.inv_scale) + qp.zero_point
    return q.clamp_(low, qp.qmax).to(qp.dtype)


def finish(y: Tensor, out_qp: ActQParams | None, relu: bool) -> Tensor:
    """Float32 output when ``out_qp`` is None (ReLU applied in float), else the requantized tensor."""
    if out_qp is None:
        return y.clamp_min(0.0) if relu else y
    return requantize(y, out_qp, relu)


def lookup_codes(q: Tensor, table: Tensor) -> Tensor:
    """``table[code]`` for every code of ``q`` (uint8 or int8: the code's 8 bits index the 256 entries), in
    q's shape and memory layout.

    >>> lookup_codes(torch.tensor([0, -1], dtype=torch.int8), torch.arange(256.0))  # -1 is bits 255
    tensor([  0., 255.])
    """
    return table.to(q.device)[q.view(torch.uint8).long()]


def requantize_table(in_qp: ActQParams, out_qp: ActQParams, device: torch.device | str = "cpu") -> Tensor:
    """The 256 codes of ``in_qp`` (entry i: the code whose 8 bits are i) dequantized and requantized to
    ``out_qp``, so that ``lookup_codes(q, table)`` requantizes ``q`` with this module's arithmetic.

    >>> table = requantize_table(ActQParams(0.5, 0, -128, 127), ActQParams(1.0, 0, -128, 127))
    >>> lookup_codes(torch.tensor([3, -4], dtype=torch.int8), table).tolist()  # 1.5 and -2.0, halves to even
    [2, -2]
    """
    bits = torch.arange(256, dtype=torch.uint8, device=device)
    return requantize(dequantize_activation(bits.view(in_qp.dtype), in_qp), out_qp)


def output_multiplier(x_qp: ActQParams, weight: Int8Weight) -> Tensor:
    """``s_x * s_w[c]`` computed in float32, one value per output channel."""
    return weight.scale * x_qp.scale


def scale_accumulator(acc: Tensor, multiplier: Tensor, bias: Tensor | None, channel_dim: int) -> Tensor:
    """``float32(acc) * multiplier + bias`` with the per-channel vectors broadcast along ``channel_dim``."""
    shape = [1] * acc.dim()
    shape[channel_dim] = -1
    y = acc.float() * multiplier.to(acc.device).view(shape)
    return y if bias is None else y + bias.to(acc.device).view(shape)


def make_packed(weight: Int8Weight, bias: Tensor | None, geometry: ConvGeometry | None = None,
                native: object = None) -> Packed:
    """Validate that bias matches the weight's output channels and bundle everything into ``Packed``."""
    if bias is not None:
        if bias.shape != (weight.out_channels,):
            raise ValueError(f"bias shape {tuple(bias.shape)} != ({weight.out_channels},)")
        bias = bias.detach().float()
    return Packed(weight=weight, bias=bias, geometry=geometry, native=native)


def layer_then_add(backend, kind: str, x: Tensor, x_qp: ActQParams, packed: Packed, layer_qp: ActQParams,
                   other: Tensor, other_qp: ActQParams, out_qp: ActQParams, relu: bool, layer_relu: bool) -> Tensor:
    """The unfused graph that ``conv2d_add`` / ``linear_add`` stand for (``kind``: "conv2d" or "linear"): the
    layer requantized to layer_qp, then the add requantized to out_qp."""
    y = getattr(backend, kind)(x, x_qp, packed, layer_qp, layer_relu)
    return backend.add(y, layer_qp, other, other_qp, out_qp, relu)


class UnfusedLayerAdd:
    """``conv2d_add`` / ``linear_add`` as the unfused graph (:func:`layer_then_add`): for backends without a fused
    layer + add kernel (``fuses_layer_add = False``)."""

    def conv2d_add(self, x: Tensor, x_qp: ActQParams, packed: Packed, conv_qp: ActQParams, other: Tensor,
                   other_qp: ActQParams, out_qp: ActQParams, relu: bool = False, conv_relu: bool = False) -> Tensor:
        return layer_then_add(self, "conv2d", x, x_qp, packed, conv_qp, other, other_qp, out_qp, relu, conv_relu)

    def linear_add(self, x: Tensor, x_qp: ActQParams, packed: Packed, linear_qp: ActQParams, other: Tensor,
                   other_qp: ActQParams, out_qp: ActQParams, relu: bool = False, linear_relu: bool = False) -> Tensor:
        return layer_then_add(self, "linear", x, x_qp, packed, linear_qp, other, other_qp, out_qp, relu, linear_relu)


def attention_unfused(backend, q: Tensor, k_t: Tensor, v: Tensor, grids: AttentionGrids,
                      out_qp: ActQParams | None) -> Tensor:
    """The unfused graph that ``attention`` stands for: ``q @ k_t`` requantized to the scores' grid, its codes
    relabelled to the logits' scale, softmax requantized to the probabilities' grid, ``@ v`` on out_qp."""
    scores = backend.matmul(q, grids.q, k_t, grids.k, grids.scores)
    logits = backend.to_backend(backend.from_backend(scores, grids.scores), grids.logits)
    probs = backend.softmax(logits, grids.logits, grids.probs)
    return backend.matmul(probs, grids.probs, v, grids.v, out_qp)


def _check_out_channels(weight: Int8Weight, expected: int) -> None:
    if weight.out_channels != expected:
        raise ValueError(f"weight has {weight.out_channels} scales but {expected} output channels")


def _shifted(q: Tensor, qp: ActQParams) -> Tensor:
    """``q - z`` as exact float64."""
    return q.double() - qp.zero_point


class ReferenceBackend(UnfusedLayerAdd):
    """Ground-truth backend: plain int tensors in and out, float64-exact accumulation, any device."""

    name = "reference"
    fuses_layer_add = False
    fuses_attention = False
    int8_activations = False

    def grid_op(self, fn, t: Tensor, args: tuple, kwargs: dict) -> Tensor | None:
        return None  # plain uint8/int8 tensors: callers dequantize, apply, quantize (exact)

    def to_backend(self, q: Tensor, qp: ActQParams) -> Tensor:
        return q

    def from_backend(self, t: Tensor, qp: ActQParams) -> Tensor:
        return t

    def quantize(self, x: Tensor, qp: ActQParams) -> Tensor:
        return quantize_activation(x, qp)

    def layer_norm(self, t: Tensor, in_qp: ActQParams, weight: Tensor | None, bias: Tensor | None, eps: float,
                   out_qp: ActQParams | None) -> Tensor:
        y = F.layer_norm(dequantize_activation(t, in_qp), t.shape[-1:], weight, bias, eps)
        return finish(y, out_qp, relu=False)

    def softmax(self, t: Tensor, in_qp: ActQParams, out_qp: ActQParams | None) -> Tensor:
        return finish(torch.softmax(dequantize_activation(t, in_qp), dim=-1), out_qp, relu=False)

    def lookup(self, t: Tensor, in_qp: ActQParams, table: Tensor, out_qp: ActQParams | None) -> Tensor:
        return lookup_codes(t, table)

    def dequantize(self, t: Tensor, qp: ActQParams) -> Tensor:
        return dequantize_activation(t, qp)

    def pack_linear(self, weight: Int8Weight, bias: Tensor | None) -> Packed:
        _check_out_channels(weight, weight.q.shape[0])
        return make_packed(weight, bias)

    def linear(self, x: Tensor, x_qp: ActQParams, packed: Packed,
               out_qp: ActQParams | None = None, relu: bool = False) -> Tensor:
        acc = _shifted(x, x_qp) @ packed.weight.q.double().T  # [..., out]
        y = scale_accumulator(acc, output_multiplier(x_qp, packed.weight), packed.bias, channel_dim=-1)
        return finish(y, out_qp, relu)

    def pack_conv2d(self, weight: Int8Weight, bias: Tensor | None, geometry: ConvGeometry) -> Packed:
        _check_out_channels(weight, weight.q.shape[0])
        return make_packed(weight, bias, geometry)

    def conv2d(self, x: Tensor, x_qp: ActQParams, packed: Packed,
               out_qp: ActQParams | None = None, relu: bool = False) -> Tensor:
        g = packed.geometry
        with torch.backends.cudnn.flags(enabled=False):  # plain im2col + GEMM: exact in float64
            acc = F.conv2d(_shifted(x, x_qp), packed.weight.q.double(), None, g.stride, g.padding, g.dilation, g.groups)
        y = scale_accumulator(acc, output_multiplier(x_qp, packed.weight), packed.bias, channel_dim=1)
        return finish(y, out_qp, relu)

    def pack_conv_transpose2d(self, weight: Int8Weight, bias: Tensor | None, geometry: ConvGeometry) -> Packed:
        _check_out_channels(weight, weight.q.shape[1] * geometry.groups)
        return make_packed(weight, bias, geometry)

    def conv_transpose2d(self, x: Tensor, x_qp: ActQParams, packed: Packed,
                         out_qp: ActQParams | None = None, relu: bool = False) -> Tensor:
        g = packed.geometry
        with torch.backends.cudnn.flags(enabled=False):
            acc = F.conv_transpose2d(_shifted(x, x_qp), packed.weight.q.double(), None, g.stride, g.padding,
                                     g.output_padding, g.groups, g.dilation)
        y = scale_accumulator(acc, output_multiplier(x_qp, packed.weight), packed.bias, channel_dim=1)
        return finish(y, out_qp, relu)

    def add(self, a: Tensor, a_qp: ActQParams, b: Tensor, b_qp: ActQParams,
            out_qp: ActQParams, relu: bool = False) -> Tensor:
        return requantize(dequantize_activation(a, a_qp) + dequantize_activation(b, b_qp), out_qp, relu)

    def mul(self, a: Tensor, a_qp: ActQParams, b: Tensor, b_qp: ActQParams,
            out_qp: ActQParams, relu: bool = False) -> Tensor:
        return requantize(dequantize_activation(a, a_qp) * dequantize_activation(b, b_qp), out_qp, relu)

    def cat(self, tensors: Sequence[Tensor], qps: Sequence[ActQParams], dim: int, out_qp: ActQParams) -> Tensor:
        if len(tensors) != len(qps):
            raise ValueError(f"{len(tensors)} tensors but {len(qps)} qparams")
        return requantize(torch.cat([dequantize_activation(t, qp) for t, qp in zip(tensors, qps)], dim), out_qp)

    def matmul(self, a: Tensor, a_qp: ActQParams, b: Tensor, b_qp: ActQParams,
               out_qp: ActQParams | None = None) -> Tensor:
        acc = torch.matmul(_shifted(a, a_qp), _shifted(b, b_qp))
        y = acc.float() * float32(a_qp.scale * b_qp.scale)
        return finish(y, out_qp, relu=False)

    def attention(self, q: Tensor, k_t: Tensor, v: Tensor, grids: AttentionGrids,
                  out_qp: ActQParams | None = None) -> Tensor:
        return attention_unfused(self, q, k_t, v, grids, out_qp)
