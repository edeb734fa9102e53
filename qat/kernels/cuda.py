"""CUDA int8 backend: cuBLASLt int8 GEMM (``torch._int_mm``) with fused Triton requantization.

Backend tensors are the plain uint8/int8 CUDA tensors (``to_backend``/``from_backend`` are identities).

* Linear and 1x1 conv: one ``_int_mm`` of int8 x int8 -> int32. ``_int_mm`` wants signed operands, more
  than 16 rows and K, N multiples of 8: uint8 activations enter as ``q - 128`` (one xor pass, fused with
  the padding copy), weights are zero-padded once at pack time, and the shift comes back in the epilogue
  through the precomputed per-row weight sums: ``sum_k (q - z) w = sum_k signed(q) w + (128 - z) sum_k w``.
* kxk conv (groups=1): channels_last im2col on int8 (border filled with the signed zero point, so padding
  means 0.0) into a ``[N*Ho*Wo, kh*kw*C]`` matrix, then the same GEMM; outputs are channels_last.
* add/mul of same-layout tensors and batched matmul: Triton kernels (``triton_kernels``).
* Delegated to the reference backend (exact, plain torch on the GPU), by design: grouped/depthwise conv,
  conv_transpose2d, add/mul with broadcasting, cat with differing qparams (same qparams: plain ``torch.cat``).

The module imports without CUDA (Triton is imported when the backend is built); building the backend
without a CUDA device raises RuntimeError.

>>> import torch
>>> torch.cuda.is_available() or print("needs CUDA")
needs CUDA
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from qat.kernels.reference import ReferenceBackend, make_packed
from qat.kernels.types import ActQParams, ConvGeometry, Int8Weight, Packed

_ALIGN = 8  # _int_mm: K and N multiples of 8
_MIN_ROWS = 17  # _int_mm: more than 16 rows
_REFERENCE = ReferenceBackend()


@dataclass(frozen=True, eq=False)
class GemmWeight:
    """Weight ready for ``_int_mm(rows, w.t())``: ``w`` is ``[N8, K8]`` zero-padded, ``wsum[n] = sum_k w[n, k]``."""

    w: Tensor
    wsum: Tensor
    k: int


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


def pack_gemm_weight(w2d: Tensor) -> GemmWeight:
    """``[N, K]`` int8 weight (columns in the order of the activation rows) -> padded GEMM weight."""
    n, k = w2d.shape
    w = torch.zeros(_round_up(n, _ALIGN), _round_up(k, _ALIGN), dtype=torch.int8, device=w2d.device)
    w[:n, :k] = w2d
    return GemmWeight(w=w, wsum=w2d.sum(1, dtype=torch.int32), k=k)


def signed_zero(qp: ActQParams) -> int:
    """The signed int8 value that represents 0.0 (``z - 128`` for uint8, ``z`` for int8)."""
    return qp.zero_point - 128 if qp.dtype == torch.uint8 else qp.zero_point


def write_signed(src: Tensor, qp: ActQParams, dst: Tensor) -> None:
    """``dst[...] = signed(src)``: uint8 ``q`` becomes int8 ``q - 128`` (an xor of the top bit)."""
    if qp.dtype == torch.uint8:
        torch.bitwise_xor(src.view(torch.int8), -128, out=dst)
    else:
        dst.copy_(src)


def gemm_buffer(rows: int, cols: int, padded_cols: int, device: torch.device) -> Tensor:
    """int8 ``[max(rows, 17), padded_cols]`` buffer; padding is zeroed (it meets zero weights anyway)."""
    shape = (max(rows, _MIN_ROWS), padded_cols)
    padded = shape != (rows, cols)
    return torch.zeros(shape, dtype=torch.int8, device=device) if padded else torch.empty(shape, dtype=torch.int8,
                                                                                          device=device)


def im2col_nhwc(x: Tensor, qp: ActQParams, kernel: tuple[int, int], g: ConvGeometry, padded_cols: int) -> Tensor:
    """Signed channels_last patches of ``x`` [N, C, H, W]: ``[N*Ho*Wo (padded), kh*kw*C (padded)]`` int8."""
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, g.stride, g.padding, g.dilation
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    framed = torch.full((n, h + 2 * ph, w + 2 * pw, c), signed_zero(qp), dtype=torch.int8, device=x.device)
    write_signed(x.permute(0, 2, 3, 1), qp, framed[:, ph:ph + h, pw:pw + w, :])
    s_n, s_h, s_w, _ = framed.stride()
    patches = framed.as_strided((n, ho, wo, kh, kw, c), (s_n, s_h * sh, s_w * sw, s_h * dh, s_w * dw, 1))
    cols = gemm_buffer(n * ho * wo, kh * kw * c, padded_cols, x.device)
    cols[: n * ho * wo, : kh * kw * c].view(n, ho, wo, kh, kw, c).copy_(patches)
    return cols


def _require_cuda(*tensors: Tensor) -> None:
    for t in tensors:
        if not t.is_cuda:
            raise ValueError(f"the cuda kernel backend needs CUDA tensors, got one on {t.device}")


def _dense_same_layout(a: Tensor, b: Tensor) -> bool:
    dense = a.is_contiguous() or (a.dim() == 4 and a.is_contiguous(memory_format=torch.channels_last))
    return dense and a.shape == b.shape and a.stride() == b.stride()


class CudaBackend:
    """int8 on NVIDIA GPUs: ``torch._int_mm`` GEMMs and Triton epilogues (see the module docstring)."""

    name = "cuda"

    def __init__(self) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("the 'cuda' kernel backend needs a CUDA device; use 'fbgemm' or 'reference' on CPU")
        from qat.kernels import triton_kernels

        self._triton = triton_kernels
        self.device = torch.device("cuda")

    def to_backend(self, q: Tensor, qp: ActQParams) -> Tensor:
        return q

    def from_backend(self, t: Tensor, qp: ActQParams) -> Tensor:
        return t

    def quantize(self, x: Tensor, qp: ActQParams) -> Tensor:
        return _REFERENCE.quantize(x, qp)

    def dequantize(self, t: Tensor, qp: ActQParams) -> Tensor:
        return _REFERENCE.dequantize(t, qp)

    def _on_device(self, weight: Int8Weight, bias: Tensor | None) -> tuple[Int8Weight, Tensor | None]:
        moved = Int8Weight(q=weight.q.to(self.device), scale=weight.scale.to(self.device))
        return moved, None if bias is None else bias.to(self.device)

    def _gemm(self, signed_rows: Tensor, x_qp: ActQParams, packed: Packed, rows: int,
              out_qp: ActQParams | None, relu: bool) -> Tensor:
        acc = torch._int_mm(signed_rows, packed.native.w.t())  # [rows (padded), N8] int32
        return self._triton.gemm_epilogue(acc, packed.native.wsum, x_qp, packed.weight.scale, packed.bias, rows,
                                          out_qp, relu)

    def pack_linear(self, weight: Int8Weight, bias: Tensor | None) -> Packed:
        weight, bias = self._on_device(weight, bias)
        _REFERENCE.pack_linear(weight, bias)
        return make_packed(weight, bias, native=pack_gemm_weight(weight.q))

    def linear(self, x: Tensor, x_qp: ActQParams, packed: Packed,
               out_qp: ActQParams | None = None, relu: bool = False) -> Tensor:
        _require_cuda(x)
        rows = x.reshape(-1, x.shape[-1])  # [M, K]
        buf = gemm_buffer(rows.shape[0], rows.shape[1], packed.native.w.shape[1], x.device)
        write_signed(rows, x_qp, buf[: rows.shape[0], : rows.shape[1]])
        out = self._gemm(buf, x_qp, packed, rows.shape[0], out_qp, relu)  # [M, N]
        return out.view(*x.shape[:-1], out.shape[-1])

    def pack_conv2d(self, weight: Int8Weight, bias: Tensor | None, geometry: ConvGeometry) -> Packed:
        weight, bias = self._on_device(weight, bias)
        _REFERENCE.pack_conv2d(weight, bias, geometry)
        if geometry.groups != 1:
            return make_packed(weight, bias, geometry)
        w2d = weight.q.permute(0, 2, 3, 1).reshape(weight.q.shape[0], -1)  # [out, kh*kw*C], im2col order
        return make_packed(weight, bias, geometry, pack_gemm_weight(w2d))

    def conv2d(self, x: Tensor, x_qp: ActQParams, packed: Packed,
               out_qp: ActQParams | None = None, relu: bool = False) -> Tensor:
        _require_cuda(x)
        if packed.native is None:
            return _REFERENCE.conv2d(x, x_qp, packed, out_qp, relu)
        g, kernel = packed.geometry, tuple(packed.weight.q.shape[2:])
        if kernel == (1, 1) and g.padding == (0, 0):
            nhwc = x.permute(0, 2, 3, 1)[:, :: g.stride[0], :: g.stride[1], :]  # [N, Ho, Wo, C]
            n, ho, wo, c = nhwc.shape
            cols = gemm_buffer(n * ho * wo, c, packed.native.w.shape[1], x.device)
            write_signed(nhwc, x_qp, cols[: n * ho * wo, :c].view(n, ho, wo, c))
        else:
            cols = im2col_nhwc(x, x_qp, kernel, g, packed.native.w.shape[1])
            n = x.shape[0]
            ho = (x.shape[2] + 2 * g.padding[0] - g.dilation[0] * (kernel[0] - 1) - 1) // g.stride[0] + 1
            wo = (x.shape[3] + 2 * g.padding[1] - g.dilation[1] * (kernel[1] - 1) - 1) // g.stride[1] + 1
        out = self._gemm(cols, x_qp, packed, n * ho * wo, out_qp, relu)  # [N*Ho*Wo, out]
        return out.view(n, ho, wo, -1).permute(0, 3, 1, 2)  # NCHW view of channels_last memory

    def pack_conv_transpose2d(self, weight: Int8Weight, bias: Tensor | None, geometry: ConvGeometry) -> Packed:
        weight, bias = self._on_device(weight, bias)
        return _REFERENCE.pack_conv_transpose2d(weight, bias, geometry)

    def conv_transpose2d(self, x: Tensor, x_qp: ActQParams, packed: Packed,
                         out_qp: ActQParams | None = None, relu: bool = False) -> Tensor:
        _require_cuda(x)
        return _REFERENCE.conv_transpose2d(x, x_qp, packed, out_qp, relu)

    def _binary(self, a: Tensor, a_qp: ActQParams, b: Tensor, b_qp: ActQParams, out_qp: ActQParams, relu: bool,
                is_mul: bool) -> Tensor:
        _require_cuda(a, b)
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
        _require_cuda(*tensors)
        if len(tensors) == len(qps) and all(qp == out_qp for qp in qps):
            return torch.cat(list(tensors), dim)  # requantizing to the same qparams is the identity
        return _REFERENCE.cat(tensors, qps, dim, out_qp)

    def matmul(self, a: Tensor, a_qp: ActQParams, b: Tensor, b_qp: ActQParams,
               out_qp: ActQParams | None = None) -> Tensor:
        _require_cuda(a, b)
        batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        a3 = a.expand(*batch, *a.shape[-2:]).reshape(-1, *a.shape[-2:])  # [B, M, K]
        b3 = b.expand(*batch, *b.shape[-2:]).reshape(-1, *b.shape[-2:])  # [B, K, N]
        mult = a_qp.scale * b_qp.scale
        out = self._triton.bmm(a3, a_qp, b3, b_qp, mult, out_qp)  # [B, M, N]
        return out.view(*batch, *out.shape[-2:])
