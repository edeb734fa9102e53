"""CUDA int8 backend: Triton int8 kernels with fused requantization.

Backend tensors are the plain uint8/int8 CUDA tensors (``to_backend``/``from_backend`` are identities).
Every path accumulates int8 x int8 products in int32 and ends in the reference's float32 requantization
(no FMA contraction), so results match the reference bit for bit except where float32(acc) rounds.

* Linear and 1x1 convs without padding ([B*H*W, C] rows: a view of channels_last input at stride 1, the
  subsampled pixels copied at larger strides): one Triton GEMM kernel. uint8
  activations become ``q - 128`` in registers (int8 tensor cores want signed operands); the shift comes back
  in the fused epilogue (scale, bias, ReLU, requantize) through precomputed per-channel weight sums:
  ``sum_k (q - z) w = sum_k signed(q) w + (128 - z) sum_k w``. Weights are stored K-major, zero-padded to a
  multiple of 32 (with N-major weights Triton's int8 dot ran 3-10x slower on an H100).
* Other convs with groups=1 (any kernel/stride/padding/dilation, any input strides; channels_last is the
  fast layout): a Triton implicit-GEMM kernel reading the input in place, taps outside the image reading
  the zero point, each tap's channels padded to 32 in K. Inputs with few channels (the RGB stem, ViT's patch
  embedding; dilation 1) are instead copied once to a padded 4, 8 or 16-channel image and read a whole kernel
  row per K step, without masks (ResNet-50's stem at batch 256 on an H200: 1.45 -> 0.48 ms). Outputs are
  channels_last.
* GEMM and conv kernels are autotuned per shape (``triton_kernels.TILES``); the first call of each shape
  pays for it.
* ``conv2d_add`` fuses a residual add (+ReLU) into the conv epilogue: what the unfused graph computes
  (conv requantized to its grid, dequantized, added, requantized), bit for bit.
* Grouped and depthwise convs: a direct Triton kernel (int32 on CUDA cores).
* quantize / dequantize / table lookup of dense tensors, add/mul of same-layout tensors, batched matmul,
  LayerNorm and softmax over contiguous rows (dequantize, normalise, requantize in one pass): Triton kernels;
  max-pooling runs on the codes (nn.MaxPool2d: a Triton kernel; other max-pools: torch's in float16, exact)
  instead of dequantizing.
* An attention core, ``softmax(q @ k_t) @ v`` between the int8 q, k, v projections: one Triton kernel per
  block of query rows, scores and probabilities in registers (up to 256 keys), each step the unfused kernels'
  arithmetic; the scores and probabilities never reach memory.
* cat: inputs on other qparams are requantized by a 256-entry table lookup each, then ``torch.cat``.
* Delegated to the reference backend (exact, plain torch on the GPU, slow), by design: conv_transpose2d,
  add/mul with broadcasting.

The module imports without CUDA (Triton is imported when the backend is built); building the backend
without a CUDA device raises RuntimeError, except under ``TRITON_INTERPRET=1``, where it runs the same
kernels on CPU tensors (slow; for tests).

>>> CudaBackend.name  # importing needs no GPU; CudaBackend() does
'cuda'
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qat.kernels.reference import (ReferenceBackend, attention_unfused, layer_then_add, make_packed,
                                   requantize_table)
from qat.kernels.types import ActQParams, AttentionGrids, ConvGeometry, Int8Weight, Packed, as_pair

_REFERENCE = ReferenceBackend()
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
K_ALIGN = 32  # = triton_kernels.K_ALIGN (not imported here: importing Triton waits for the backend)
MAX_K_STEP = 128  # = the largest BK of triton_kernels.TILES
_MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
_MAX_POOL_FUNCTIONS = frozenset({F.max_pool1d, F.max_pool2d, F.adaptive_max_pool1d, F.adaptive_max_pool2d})


def _pool_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool) -> int:
    """torch's pooling output extent: with ceil_mode a last window may overhang, but must start inside."""
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    out = (span + (stride - 1 if ceil_mode else 0)) // stride + 1
    return out - 1 if ceil_mode and (out - 1) * stride >= size + padding else out


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


@dataclass(frozen=True, eq=False)
class GemmWeight:
    """Weight of the GEMM and implicit-GEMM kernels, the same for every autotuned tile.

    ``w`` is ``[N, K_pad]`` int8, K contiguous (the layout int8 tensor-core GEMMs need), zero past the real
    columns. Tap-major (``row_bytes == 0``): columns ``(kh, kw, c)`` with ``c_pad`` (a multiple of 32) channels
    per tap. Row-packed (few channels, dilation 1): columns ``(kh, kw, c)`` with ``c_pad`` channels per tap
    (4, 8 or 16, the pixel of the padded copy) and ``row_bytes`` per kernel row, K_pad a multiple of every K
    step. ``wsum[n] = sum w[n]`` (int32).
    """

    w: Tensor
    wsum: Tensor
    c_pad: int
    row_bytes: int = 0


def _row_packing(c: int, kernel: tuple[int, int], dilation: tuple[int, int]) -> tuple[int, int] | None:
    """(pixel, row_bytes) of the row-packed layout for a conv with few channels, or None (tap-major).

    >>> _row_packing(3, (7, 7), (1, 1))  # ResNet stem: pixels of 4 channels, 28 bytes per kernel row -> 32
    (4, 32)
    >>> _row_packing(64, (3, 3), (1, 1)) is None  # enough channels for tap-major K steps
    True
    """
    kh, kw = kernel
    if kh * kw == 1 or c > 16 or dilation != (1, 1):
        return None
    pixel = 4 if c <= 4 else 8 if c <= 8 else 16
    row_bytes = max(K_ALIGN, 1 << (kw * pixel - 1).bit_length())  # next power of two
    return (pixel, row_bytes) if row_bytes <= MAX_K_STEP else None


def pack_gemm_weight(q: Tensor, dilation: tuple[int, int] = (1, 1)) -> GemmWeight:
    """``[N, C, kh, kw]`` int8 conv weight (a Linear weight is ``[N, K, 1, 1]``) -> ``GemmWeight``.

    Convs with few channels (the RGB stem, ViT's patch embedding) are row-packed (``_row_packing``).
    """
    n, c, kh, kw = q.shape
    wsum = q.sum((1, 2, 3), dtype=torch.int32)
    rows = _row_packing(c, (kh, kw), dilation)
    if rows is not None:
        pixel, row_bytes = rows
        w = torch.zeros(n, _round_up(kh * row_bytes, MAX_K_STEP), dtype=torch.int8, device=q.device)
        taps = w[:, :kh * row_bytes].view(n, kh, row_bytes // pixel, pixel)  # [N, kh, kw (padded), pixel]
        taps[:, :, :kw, :c] = q.permute(0, 2, 3, 1)
        return GemmWeight(w=w, wsum=wsum, c_pad=pixel, row_bytes=row_bytes)
    c_pad = _round_up(c, K_ALIGN)
    w = torch.zeros(n, kh, kw, c_pad, dtype=torch.int8, device=q.device)
    w[..., :c] = q.permute(0, 2, 3, 1)
    return GemmWeight(w=w.view(n, kh * kw * c_pad), wsum=wsum, c_pad=c_pad)


@dataclass(frozen=True, eq=False)
class GroupedWeight:
    """Weight of the direct grouped conv: ``w`` is ``[kh*kw*C/groups, N]`` int8 (row ``(kh*KW + kw)*C/groups + ci``)."""

    w: Tensor
    groups: int


def pack_grouped_weight(q: Tensor, groups: int) -> GroupedWeight:
    n, cg, kh, kw = q.shape
    return GroupedWeight(w=q.permute(2, 3, 1, 0).reshape(kh * kw * cg, n).contiguous(), groups=groups)


def _pointwise_rows(x: Tensor, g: ConvGeometry, kernel: tuple[int, int]) -> Tensor | None:
    """``[B*Ho*Wo, C]`` rows that a 1x1 conv without padding multiplies, or None for other convs.

    Stride 1: a view of channels_last input (else None: the conv kernel reads any strides). Larger strides:
    the subsampled pixels copied to rows (ResNet-50's downsampling convs: the copy and the GEMM take 0.57-0.72x
    the strided implicit GEMM's time on an H200).
    """
    if kernel != (1, 1) or g.padding != (0, 0) or g.groups != 1:
        return None
    if g.stride == (1, 1):
        return _nhwc_rows(x)
    sh, sw = g.stride
    picked = x[:, :, ::sh, ::sw].permute(0, 2, 3, 1).contiguous()  # [B, Ho, Wo, C]
    return picked.view(-1, x.shape[1])


def _nhwc_rows(x: Tensor) -> Tensor | None:
    """``[B*H*W, C]`` view of a channels_last-dense ``[B, C, H, W]`` tensor, else None."""
    nhwc = x.permute(0, 2, 3, 1)
    return nhwc.view(-1, x.shape[1]) if nhwc.is_contiguous() else None


def _is_dense(t: Tensor) -> bool:
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


def _two_batch_dims(t: Tensor) -> Tensor:
    """``[*batch, rows, cols]`` as ``[B0, B1, rows, cols]``: a view for up to two batch dims (broadcast ones keep
    their zero strides), a reshape beyond."""
    while t.dim() < 4:
        t = t.unsqueeze(0)
    return t.reshape(-1, *t.shape[-3:]) if t.dim() > 4 else t


def _dense_same_layout(a: Tensor, b: Tensor) -> bool:
    return _is_dense(a) and a.shape == b.shape and a.stride() == b.stride()


class CudaBackend:
    """int8 on NVIDIA GPUs through Triton GEMM kernels with fused requantization (see the module docstring)."""

    name = "cuda"
    fuses_layer_add = True
    fuses_attention = True
    int8_activations = True  # uint8 operands are flipped to int8 in registers, off the tensor cores' data path

    def __init__(self) -> None:
        if not (torch.cuda.is_available() or _INTERPRET):
            raise RuntimeError("the 'cuda' kernel backend needs a CUDA device; use 'fbgemm' or 'reference' on CPU")
        from qat.kernels import triton_kernels

        self._triton = triton_kernels
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def _require_device(self, *tensors: Tensor) -> None:
        for t in tensors:
            if t.device.type != self.device.type:
                raise ValueError(f"the cuda kernel backend needs {self.device.type} tensors, got one on {t.device}")

    def grid_op(self, fn, t: Tensor, args: tuple, kwargs: dict) -> Tensor | None:
        """Max-pooling on the codes: it commutes with the increasing map q -> (q - z) * s. An nn.MaxPool2d on a
        4-d tensor is one Triton kernel; other max-pools run torch's on float16 (which holds every 8-bit code
        exactly). Other ops: None (callers dequantize, apply, quantize)."""
        if type(fn) is nn.MaxPool2d and not fn.return_indices and not args and not kwargs and t.dim() == 4:
            kernel, stride, padding, dilation = (as_pair(getattr(fn, name), name) for name in (
                "kernel_size", "stride", "padding", "dilation"))
            out_size = tuple(_pool_output_size(*dims, fn.ceil_mode) for dims in zip(
                t.shape[2:], kernel, stride, padding, dilation))
            return self._triton.max_pool2d(t, out_size, kernel, stride, padding, dilation)
        if isinstance(fn, _MAX_POOLS) or (not isinstance(fn, nn.Module) and fn in _MAX_POOL_FUNCTIONS):
            return fn(t.half(), *args, **kwargs).to(t.dtype)
        return None

    def to_backend(self, q: Tensor, qp: ActQParams) -> Tensor:
        return q

    def from_backend(self, t: Tensor, qp: ActQParams) -> Tensor:
        return t

    def quantize(self, x: Tensor, qp: ActQParams) -> Tensor:
        if x.device.type == self.device.type and x.is_floating_point() and _is_dense(x):
            return self._triton.quantize(x, qp)
        return _REFERENCE.quantize(x, qp)

    def dequantize(self, t: Tensor, qp: ActQParams) -> Tensor:
        if t.device.type == self.device.type and _is_dense(t):
            return self._triton.dequantize(t, qp)
        return _REFERENCE.dequantize(t, qp)

    def layer_norm(self, t: Tensor, in_qp: ActQParams, weight: Tensor | None, bias: Tensor | None, eps: float,
                   out_qp: ActQParams | None) -> Tensor:
        self._require_device(t)
        if t.is_contiguous() and t.shape[-1] <= self._triton.MAX_LAYER_NORM:
            return self._triton.layer_norm(t, in_qp, weight, bias, eps, out_qp)
        return _REFERENCE.layer_norm(t, in_qp, weight, bias, eps, out_qp)

    def softmax(self, t: Tensor, in_qp: ActQParams, out_qp: ActQParams | None) -> Tensor:
        self._require_device(t)
        if t.is_contiguous() and t.shape[-1] <= self._triton.MAX_SOFTMAX:
            return self._triton.softmax(t, in_qp, out_qp)
        return _REFERENCE.softmax(t, in_qp, out_qp)

    def lookup(self, t: Tensor, in_qp: ActQParams, table: Tensor, out_qp: ActQParams | None) -> Tensor:
        self._require_device(t)
        if _is_dense(t):
            return self._triton.lookup(t, table.to(t.device))
        return _REFERENCE.lookup(t, in_qp, table, out_qp)

    def _on_device(self, weight: Int8Weight, bias: Tensor | None) -> tuple[Int8Weight, Tensor | None]:
        moved = Int8Weight(q=weight.q.to(self.device), scale=weight.scale.to(self.device))
        return moved, None if bias is None else bias.to(self.device)

    def pack_linear(self, weight: Int8Weight, bias: Tensor | None) -> Packed:
        weight, bias = self._on_device(weight, bias)
        _REFERENCE.pack_linear(weight, bias)
        return make_packed(weight, bias, native=pack_gemm_weight(weight.q[:, :, None, None]))

    def linear(self, x: Tensor, x_qp: ActQParams, packed: Packed,
               out_qp: ActQParams | None = None, relu: bool = False) -> Tensor:
        self._require_device(x)
        rows = x.reshape(-1, x.shape[-1])  # [M, K]
        rows = rows if rows.stride(-1) == 1 else rows.contiguous()
        gw = packed.native
        out = self._triton.linear(rows, x_qp, gw.w, gw.wsum, packed.weight.scale, packed.bias, out_qp, relu)  # [M, N]
        return out.view(*x.shape[:-1], out.shape[-1])

    def pack_conv2d(self, weight: Int8Weight, bias: Tensor | None, geometry: ConvGeometry) -> Packed:
        weight, bias = self._on_device(weight, bias)
        _REFERENCE.pack_conv2d(weight, bias, geometry)
        native = (pack_gemm_weight(weight.q, geometry.dilation) if geometry.groups == 1
                  else pack_grouped_weight(weight.q, geometry.groups))
        return make_packed(weight, bias, geometry, native)

    def conv2d(self, x: Tensor, x_qp: ActQParams, packed: Packed,
               out_qp: ActQParams | None = None, relu: bool = False) -> Tensor:
        self._require_device(x)
        return self._conv(x, x_qp, packed, out_qp, relu, None)

    def conv2d_add(self, x: Tensor, x_qp: ActQParams, packed: Packed, conv_qp: ActQParams, other: Tensor,
                   other_qp: ActQParams, out_qp: ActQParams, relu: bool = False, conv_relu: bool = False) -> Tensor:
        """``add(conv2d(x) on conv_qp, other)`` on out_qp, the add in the conv's epilogue (groups=1, same shapes)."""
        self._require_device(x, other)
        if isinstance(packed.native, GroupedWeight) or other.shape != self._conv_output_shape(x, packed):
            return layer_then_add(self, "conv2d", x, x_qp, packed, conv_qp, other, other_qp, out_qp, relu, conv_relu)
        rows = _nhwc_rows(other)
        rows = _nhwc_rows(other.contiguous(memory_format=torch.channels_last)) if rows is None else rows
        residual = self._triton.Residual(rows, other_qp, conv_qp, conv_relu)  # rows: [B*Ho*Wo, N]
        return self._conv(x, x_qp, packed, out_qp, relu, residual)

    def linear_add(self, x: Tensor, x_qp: ActQParams, packed: Packed, linear_qp: ActQParams, other: Tensor,
                   other_qp: ActQParams, out_qp: ActQParams, relu: bool = False, linear_relu: bool = False) -> Tensor:
        """``add(linear(x) on linear_qp, other)`` on out_qp, the add in the GEMM's epilogue (same shapes)."""
        self._require_device(x, other)
        n = packed.weight.out_channels
        if other.shape != (*x.shape[:-1], n):
            return layer_then_add(self, "linear", x, x_qp, packed, linear_qp, other, other_qp, out_qp, relu,
                                  linear_relu)
        rows = x.reshape(-1, x.shape[-1])  # [M, K]
        rows = rows if rows.stride(-1) == 1 else rows.contiguous()
        residual = self._triton.Residual(other.contiguous().view(-1, n), other_qp, linear_qp, linear_relu)  # [M, N]
        gw = packed.native
        out = self._triton.linear(rows, x_qp, gw.w, gw.wsum, packed.weight.scale, packed.bias, out_qp, relu, residual)
        return out.view(*x.shape[:-1], n)

    @staticmethod
    def _conv_output_shape(x: Tensor, packed: Packed) -> tuple[int, ...]:
        size = packed.geometry.output_size(tuple(x.shape[2:]), tuple(packed.weight.q.shape[2:]))
        return (x.shape[0], packed.weight.out_channels, *size)

    def _conv(self, x: Tensor, x_qp: ActQParams, packed: Packed, out_qp: ActQParams | None, relu: bool,
              residual) -> Tensor:
        g, native, kernel = packed.geometry, packed.native, tuple(packed.weight.q.shape[2:])
        batch, n, ho, wo = self._conv_output_shape(x, packed)
        scale, bias = packed.weight.scale, packed.bias
        x_rows = _pointwise_rows(x, g, kernel)
        if isinstance(native, GroupedWeight):
            out = self._triton.grouped_conv(x, x_qp, native.w, native.groups, scale, bias, kernel, g.stride,
                                            g.padding, g.dilation, out_qp, relu)
        elif x_rows is not None:  # 1x1 without padding: a plain GEMM
            out = self._triton.linear(x_rows, x_qp, native.w, native.wsum, scale, bias, out_qp, relu, residual)
        elif native.row_bytes:
            out = self._triton.conv_rows(x, x_qp, native.w, native.c_pad, native.row_bytes, native.wsum, scale, bias,
                                         kernel, g.stride, g.padding, out_qp, relu, residual)
        else:
            out = self._triton.conv_gemm(x, x_qp, native.w, native.c_pad, native.wsum, scale, bias, kernel, g.stride,
                                         g.padding, g.dilation, out_qp, relu, residual)
        return out.view(batch, ho, wo, n).permute(0, 3, 1, 2)  # [B*Ho*Wo, N] -> NCHW view of channels_last memory

    def pack_conv_transpose2d(self, weight: Int8Weight, bias: Tensor | None, geometry: ConvGeometry) -> Packed:
        weight, bias = self._on_device(weight, bias)
        return _REFERENCE.pack_conv_transpose2d(weight, bias, geometry)

    def conv_transpose2d(self, x: Tensor, x_qp: ActQParams, packed: Packed,
                         out_qp: ActQParams | None = None, relu: bool = False) -> Tensor:
        self._require_device(x)
        return _REFERENCE.conv_transpose2d(x, x_qp, packed, out_qp, relu)

    def _binary(self, a: Tensor, a_qp: ActQParams, b: Tensor, b_qp: ActQParams, out_qp: ActQParams, relu: bool,
                is_mul: bool) -> Tensor:
        self._require_device(a, b)
        if _dense_same_layout(a, b):
            return self._triton.binary(a, a_qp, b, b_qp, out_qp, relu, is_mul)
        reference_op = _REFERENCE.mul if is_mul else _REFERENCE.add
        return reference_op(a, a_qp, b, b_qp, out_qp, relu)

    def add(self, a: Tensor, a_qp: ActQParams, b: Tensor, b_qp: ActQParams,
            out_qp: ActQParams, relu: bool = False) -> Tensor:
        return self._binary(a, a_qp, b, b_qp, out_qp, relu, is_mul=False)

    def mul(self, a: Tensor, a_qp: ActQParams, b: Tensor, b_qp: ActQParams,
            out_qp: ActQParams, relu: bool = False) -> Tensor:
        return self._binary(a, a_qp, b, b_qp, out_qp, relu, is_mul=True)

    def cat(self, tensors: Sequence[Tensor], qps: Sequence[ActQParams], dim: int, out_qp: ActQParams) -> Tensor:
        self._require_device(*tensors)
        if len(tensors) != len(qps):
            return _REFERENCE.cat(tensors, qps, dim, out_qp)  # its error names the mismatch
        parts = [t if qp == out_qp else self.lookup(t, qp, requantize_table(qp, out_qp, t.device), out_qp)
                 for t, qp in zip(tensors, qps)]  # requantizing is a function of the code: a 256-entry table
        return torch.cat(parts, dim)

    def matmul(self, a: Tensor, a_qp: ActQParams, b: Tensor, b_qp: ActQParams,
               out_qp: ActQParams | None = None) -> Tensor:
        self._require_device(a, b)
        batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        a4, b4 = (_two_batch_dims(t.expand(*batch, *t.shape[-2:])) for t in (a, b))  # [B0, B1, rows, cols]
        out = self._triton.bmm(a4, a_qp, b4, b_qp, a_qp.scale * b_qp.scale, out_qp)  # [B0, B1, M, N]
        return out.reshape(*batch, *out.shape[-2:])

    def attention(self, q: Tensor, k_t: Tensor, v: Tensor, grids: AttentionGrids,
                  out_qp: ActQParams | None = None) -> Tensor:
        """One kernel where every key of a row fits in a program (``triton_kernels.MAX_ATTENTION_KEYS``) and
        q, k_t and v have one shape of batch dims; else the unfused kernels."""
        self._require_device(q, k_t, v)
        batch = q.shape[:-2]
        fits = (k_t.shape[:-2] == batch and v.shape[:-2] == batch and v.shape[-1] == q.shape[-1]
                and k_t.shape[-1] <= self._triton.MAX_ATTENTION_KEYS and q.shape[-1] <= self._triton.MAX_ATTENTION_HEAD)
        if not fits:
            return attention_unfused(self, q, k_t, v, grids, out_qp)
        q4, k4, v4 = (_two_batch_dims(t) for t in (q, k_t, v))  # [B0, B1, rows, cols]
        out = self._triton.attention(q4, k4, v4, grids, out_qp)
        return out.reshape(*batch, *out.shape[-2:])
