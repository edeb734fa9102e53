"""CPU int8 backend on torch's quantized operators (fbgemm / oneDNN through the 'x86' engine).

This is the only module of the project that touches ``torch.ao``-style quantized tensors (quint8/qint8).

Backend tensors: activations flow between ops as torch ``quint8`` tensors, so consecutive ops pay no
conversion. ``to_backend`` / ``from_backend`` convert to and from the plain uint8/int8 tensors of the
rest of the project *without copying* uint8 data (the quantized tensor and the plain tensor share
storage); int8 activations cost one pass, because they are carried as quint8 with zero point + 128
(``q + 128`` is the same value in uint8). Measured on a 2-core Xeon (1 thread, 1x64x56x56 activation):
``int_repr()`` copies in ~40-70 us and ``_make_per_tensor_quantized_tensor`` in ~6 us, against ~110 us
for a whole 3x3 conv, whereas the zero-copy views used here cost ~1-3 us each.

Numerics: torch's requantization rounds a float product like the reference, so outputs agree within
1 LSB. fbgemm multiplies u8 x s8 pairs in int16 on CPUs without VNNI, which can saturate for full-range
uint8 activations; ``saturation_free()`` says whether this CPU has VNNI (AVX512-VNNI), where it cannot.

Delegations to the reference backend (exact, slower), by design: ``matmul``; ``conv_transpose2d`` with
per-channel weight scales (torch's quantized transposed conv accepts only per-tensor weights); add/mul of
tensors of different shapes (broadcasting). Float outputs (``out_qp=None``) of linear/conv compute the
fake-quant formula in float32 (dequantized input times dequantized weight) since torch's quantized
operators only produce quantized outputs.

>>> import torch
>>> from qat.kernels.types import ActQParams
>>> be = FbgemmBackend()
>>> qp = ActQParams(scale=0.1, zero_point=3, qmin=0, qmax=255)
>>> t = be.to_backend(torch.tensor([[5, 3]], dtype=torch.uint8), qp)
>>> be.from_backend(be.add(t, qp, t, qp, qp), qp)
tensor([[7, 3]], dtype=torch.uint8)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from qat.kernels.reference import (ReferenceBackend, UnfusedLayerAdd, attention_unfused, dequantize_activation,
                                   finish, lookup_codes, make_packed)
from qat.kernels.types import ActQParams, AttentionGrids, ConvGeometry, Int8Weight, Packed

_ENGINE_PREFERENCE = ("x86", "fbgemm")
_ZERO_POINT_SHIFT = {torch.uint8: 0, torch.int8: 128}  # int8 activations travel as quint8 with z + 128
_REFERENCE = ReferenceBackend()


def saturation_free() -> bool:
    """True when this CPU has VNNI, so u8 x s8 products never saturate (full-range uint8 is exact)."""
    return bool(getattr(torch.cpu, "_is_vnni_supported", lambda: False)())


def _engines() -> list[str]:
    return torch.backends.quantized.supported_engines


def select_engine() -> str:
    """The quantized engine to use: 'x86' (fbgemm + oneDNN) when available, else 'fbgemm'."""
    supported = torch.backends.quantized.supported_engines
    for engine in _ENGINE_PREFERENCE:
        if engine in supported:
            return engine
    raise RuntimeError(f"no fbgemm-capable quantized engine in {supported}")


def _as_uint8(qt: Tensor) -> Tensor:
    """Zero-copy plain uint8 view of a quint8 tensor."""
    plain = torch.empty(0, dtype=torch.uint8, device=qt.device)
    return plain.set_(qt.untyped_storage(), qt.storage_offset(), qt.shape, qt.stride())


def _as_quint8(u8: Tensor, scale: float, zero_point: int) -> Tensor:
    """Zero-copy quint8 view of a plain uint8 tensor."""
    qt = torch._empty_affine_quantized([0], scale=scale, zero_point=zero_point, dtype=torch.quint8)
    return qt.set_(u8.untyped_storage(), u8.storage_offset(), u8.shape, u8.stride())


def _flip_sign_bit(t: Tensor, dtype: torch.dtype) -> Tensor:
    """int8 ``v`` <-> uint8 ``v + 128`` (xor of the top bit), returned as ``dtype``."""
    return (t.view(torch.uint8) ^ 128).view(dtype)


def _backend_zero_point(qp: ActQParams) -> int:
    return qp.zero_point + _ZERO_POINT_SHIFT[qp.dtype]


def _clamp_to_range(t: Tensor, qp: ActQParams) -> Tensor:
    """Apply [qmin, qmax] in place when it is narrower than the dtype (torch clamps to the dtype only)."""
    if not qp.full_range:
        shift = _ZERO_POINT_SHIFT[qp.dtype]
        _as_uint8(t).clamp_(qp.qmin + shift, qp.qmax + shift)
    return t


def _channel_quantized(weight: Int8Weight, axis: int) -> Tensor:
    zeros = torch.zeros(weight.out_channels, dtype=torch.long)
    return torch._make_per_channel_quantized_tensor(weight.q, weight.scale.double(), zeros, axis)


def _per_tensor_scale(weight: Int8Weight) -> float | None:
    scale = weight.scale
    return float(scale[0]) if bool((scale == scale[0]).all()) else None


@dataclass(frozen=True, eq=False)
class _LinearNative:
    """fbgemm's prepacked weight, plus the dequantized weight for float outputs (e.g. logits)."""

    prepacked: object
    dequantized: Tensor  # w_q * s_w, float32 [out, in]


# grid-keeping ops that torch runs directly on quint8 tensors (exact: they only move or compare codes)
NATIVE_GRID_MODULES = (torch.nn.MaxPool2d, torch.nn.AdaptiveMaxPool2d, torch.nn.ReLU, torch.nn.Identity)
NATIVE_GRID_FUNCTIONS = frozenset({F.max_pool2d, F.relu, torch.relu})


class FbgemmBackend(UnfusedLayerAdd):
    """torch quantized CPU kernels; backend tensors are quint8 tensors (see the module docstring)."""

    name = "fbgemm"
    fuses_layer_add = False
    fuses_attention = False
    int8_activations = False  # quint8 is its native type: int8 activations cost a pass each way

    def __init__(self) -> None:
        self.engine = select_engine()
        torch.backends.quantized.engine = self.engine

    def grid_op(self, fn, t: Tensor, args: tuple, kwargs: dict) -> Tensor | None:
        """Apply a grid-keeping op directly on the quint8 tensor when torch supports it, else None."""
        native = isinstance(fn, NATIVE_GRID_MODULES) or (callable(fn) and fn in NATIVE_GRID_FUNCTIONS)
        return fn(t, *args, **kwargs) if native else None

    def to_backend(self, q: Tensor, qp: ActQParams) -> Tensor:
        u8 = q if qp.dtype == torch.uint8 else _flip_sign_bit(q, torch.uint8)
        return _as_quint8(u8, qp.scale, _backend_zero_point(qp))

    def from_backend(self, t: Tensor, qp: ActQParams) -> Tensor:
        u8 = _as_uint8(t)
        return u8 if qp.dtype == torch.uint8 else _flip_sign_bit(u8, torch.int8)

    def quantize(self, x: Tensor, qp: ActQParams) -> Tensor:
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)  # what the conv kernels read
        t = torch.quantize_per_tensor(x.float(), qp.scale, _backend_zero_point(qp), torch.quint8)
        return _clamp_to_range(t, qp)

    def dequantize(self, t: Tensor, qp: ActQParams) -> Tensor:
        if qp.scale == t.q_scale():
            return t.dequantize()
        return dequantize_activation(self.from_backend(t, qp), qp)  # on another scale (a folded factor)

    def layer_norm(self, t: Tensor, in_qp: ActQParams, weight: Tensor | None, bias: Tensor | None, eps: float,
                   out_qp: ActQParams | None) -> Tensor:
        y = _REFERENCE.layer_norm(self.from_backend(t, in_qp), in_qp, weight, bias, eps, out_qp)
        return self._out(y, out_qp)

    def softmax(self, t: Tensor, in_qp: ActQParams, out_qp: ActQParams | None) -> Tensor:
        return self._out(_REFERENCE.softmax(self.from_backend(t, in_qp), in_qp, out_qp), out_qp)

    def lookup(self, t: Tensor, in_qp: ActQParams, table: Tensor, out_qp: ActQParams | None) -> Tensor:
        return self._out(lookup_codes(self.from_backend(t, in_qp), table), out_qp)

    def _out(self, y: Tensor, out_qp: ActQParams | None) -> Tensor:
        """A plain result as this backend's output: float32 as is, codes on out_qp wrapped as quint8."""
        return y if out_qp is None else self.to_backend(y, out_qp)

    def _requantized(self, y: Tensor, out_qp: ActQParams | None, relu: bool) -> Tensor:
        return self._out(finish(y, out_qp, relu), out_qp)

    def pack_linear(self, weight: Int8Weight, bias: Tensor | None) -> Packed:
        packed = _REFERENCE.pack_linear(weight, bias)
        torch.backends.quantized.engine = self.engine
        prepacked = torch.ops.quantized.linear_prepack(_channel_quantized(weight, 0), packed.bias)
        dequantized = weight.q.float() * weight.scale[:, None]  # [out, in] * [out, 1]
        return make_packed(weight, bias, native=_LinearNative(prepacked, dequantized))

    def linear(self, x: Tensor, x_qp: ActQParams, packed: Packed,
               out_qp: ActQParams | None = None, relu: bool = False) -> Tensor:
        if out_qp is None:  # float output (e.g. logits): the fake-quant formula on the cached dequantized weight
            return finish(F.linear(x.dequantize(), packed.native.dequantized, packed.bias), None, relu)
        op = torch.ops.quantized.linear_relu if relu else torch.ops.quantized.linear
        return _clamp_to_range(op(x, packed.native.prepacked, out_qp.scale, _backend_zero_point(out_qp)), out_qp)

    def pack_conv2d(self, weight: Int8Weight, bias: Tensor | None, geometry: ConvGeometry) -> Packed:
        packed = _REFERENCE.pack_conv2d(weight, bias, geometry)
        g = geometry
        depthwise = weight.q.shape[1] == 1 and g.groups > 1
        # fbgemm's depthwise kernel multiplies u8 x s8 pairs into saturating int16 even on VNNI CPUs (seen:
        # errors of 86 LSB with full-range inputs); oneDNN's is exact at the same speed, and a packed weight
        # keeps the engine it was packed with.
        torch.backends.quantized.engine = "onednn" if depthwise and "onednn" in _engines() else self.engine
        try:
            native = torch.ops.quantized.conv2d_prepack(_channel_quantized(weight, 0), packed.bias, list(g.stride),
                                                        list(g.padding), list(g.dilation), g.groups)
        finally:
            torch.backends.quantized.engine = self.engine
        return make_packed(weight, bias, geometry, native)

    def conv2d(self, x: Tensor, x_qp: ActQParams, packed: Packed,
               out_qp: ActQParams | None = None, relu: bool = False) -> Tensor:
        if out_qp is None:
            g, w = packed.geometry, packed.weight
            w_hat = w.q.float() * w.scale.view(-1, 1, 1, 1)
            y = F.conv2d(x.dequantize(), w_hat, packed.bias, g.stride, g.padding, g.dilation, g.groups)
            return finish(y, None, relu)
        op = torch.ops.quantized.conv2d_relu if relu else torch.ops.quantized.conv2d
        return _clamp_to_range(op(x, packed.native, out_qp.scale, _backend_zero_point(out_qp)), out_qp)

    def pack_conv_transpose2d(self, weight: Int8Weight, bias: Tensor | None, geometry: ConvGeometry) -> Packed:
        packed = _REFERENCE.pack_conv_transpose2d(weight, bias, geometry)
        scale = _per_tensor_scale(weight)
        if scale is None:
            return packed
        g = geometry
        torch.backends.quantized.engine = self.engine
        qw = torch._make_per_tensor_quantized_tensor(weight.q, scale, 0)
        native = torch.ops.quantized.conv_transpose2d_prepack(qw, packed.bias, list(g.stride), list(g.padding),
                                                              list(g.output_padding), list(g.dilation), g.groups)
        return make_packed(weight, bias, geometry, native)

    def conv_transpose2d(self, x: Tensor, x_qp: ActQParams, packed: Packed,
                         out_qp: ActQParams | None = None, relu: bool = False) -> Tensor:
        if packed.native is None or out_qp is None:
            y = _REFERENCE.conv_transpose2d(self.from_backend(x, x_qp), x_qp, packed)
            return self._requantized(y, out_qp, relu)
        y = torch.ops.quantized.conv_transpose2d(x, packed.native, out_qp.scale, _backend_zero_point(out_qp))
        if relu:
            _as_uint8(y).clamp_(min=_backend_zero_point(out_qp))
        return _clamp_to_range(y, out_qp)

    def _binary(self, name: str, a: Tensor, a_qp: ActQParams, b: Tensor, b_qp: ActQParams,
                out_qp: ActQParams, relu: bool) -> Tensor:
        if a.shape != b.shape:
            y = getattr(torch, name)(a.dequantize(), b.dequantize())  # broadcasting: float path
            return self._requantized(y, out_qp, relu)
        op = getattr(torch.ops.quantized, f"{name}_relu" if relu else name)
        return _clamp_to_range(op(a, b, out_qp.scale, _backend_zero_point(out_qp)), out_qp)

    def add(self, a: Tensor, a_qp: ActQParams, b: Tensor, b_qp: ActQParams,
            out_qp: ActQParams, relu: bool = False) -> Tensor:
        return self._binary("add", a, a_qp, b, b_qp, out_qp, relu)

    def mul(self, a: Tensor, a_qp: ActQParams, b: Tensor, b_qp: ActQParams,
            out_qp: ActQParams, relu: bool = False) -> Tensor:
        return self._binary("mul", a, a_qp, b, b_qp, out_qp, relu)

    def cat(self, tensors: Sequence[Tensor], qps: Sequence[ActQParams], dim: int, out_qp: ActQParams) -> Tensor:
        if len(tensors) != len(qps):
            raise ValueError(f"{len(tensors)} tensors but {len(qps)} qparams")
        out = torch.ops.quantized.cat(list(tensors), dim, out_qp.scale, _backend_zero_point(out_qp))
        return _clamp_to_range(out, out_qp)

    def matmul(self, a: Tensor, a_qp: ActQParams, b: Tensor, b_qp: ActQParams,
               out_qp: ActQParams | None = None) -> Tensor:
        y = _REFERENCE.matmul(self.from_backend(a, a_qp), a_qp, self.from_backend(b, b_qp), b_qp, out_qp)
        return self._out(y, out_qp)

    def attention(self, q: Tensor, k_t: Tensor, v: Tensor, grids: AttentionGrids,
                  out_qp: ActQParams | None = None) -> Tensor:
        return attention_unfused(self, q, k_t, v, grids, out_qp)
