"""Triton kernels of the cuda backend: int8 Linear, implicit-GEMM conv, elementwise add/mul, batched matmul.

Imported lazily by ``qat.kernels.cuda`` (Triton needs a GPU, or ``TRITON_INTERPRET=1`` on CPU tensors).
Every kernel ends with the project's requantization (float ops rounded one by one, no FMA),
``clamp(round(y * inv_scale) + z, lo, hi)`` with rounding half to even like ``torch.round``; when the
output pointer is float32 the kernel stores ``y`` instead (after a ReLU when asked).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from qat.kernels.types import ActQParams

_ELEMENTWISE_BLOCK = 1024
_BMM_BLOCK = (64, 64, 64)
# Round every float product and sum separately, as torch's eager ops and the reference do: a fused
# multiply-add would move near-ties of the requantization by one LSB.
_NO_FMA = {"enable_fp_fusion": False}


@triton.jit
def _round_half_even(x):
    """Like ``torch.round``: exact for every float32 (``x - floor(x)`` is exact)."""
    f = tl.floor(x)
    frac = x - f
    f_is_odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    return tl.where((frac > 0.5) | ((frac == 0.5) & f_is_odd), f + 1.0, f)


@triton.jit
def _store_output(out_ptrs, y, mask, inv_scale, zero_point, lo, hi, OUT_FLOAT: tl.constexpr, RELU: tl.constexpr):
    if OUT_FLOAT:
        if RELU:
            y = tl.maximum(y, 0.0)
        tl.store(out_ptrs, y, mask=mask)
    else:
        q = _round_half_even(y * inv_scale) + zero_point
        q = tl.minimum(tl.maximum(q, lo), hi)
        tl.store(out_ptrs, q.to(tl.int32).to(out_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _binary_kernel(a_ptr, b_ptr, out_ptr, n, a_scale, a_zero, b_scale, b_zero, inv_scale, zero_point, lo, hi,
                   IS_MUL: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = (tl.load(a_ptr + offs, mask=mask, other=0).to(tl.float32) - a_zero) * a_scale
    b = (tl.load(b_ptr + offs, mask=mask, other=0).to(tl.float32) - b_zero) * b_scale
    y = a * b if IS_MUL else a + b
    _store_output(out_ptr + offs, y, mask, inv_scale, zero_point, lo, hi, False, False)


@triton.jit
def _signed(x, UNSIGNED: tl.constexpr):
    """uint8 ``u`` -> int8 ``u - 128``; int8 unchanged."""
    return (x.to(tl.int32) - 128 * UNSIGNED).to(tl.int8)


@triton.jit
def _bmm_kernel(a_ptr, b_ptr, out_ptr, M, N, K, sab, sam, sak, sbb, sbk, sbn, sob, som, son,
                a_offset, b_offset, mult, inv_scale, zero_point, lo, hi, A_UNSIGNED: tl.constexpr,
                B_UNSIGNED: tl.constexpr, OUT_FLOAT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                BK: tl.constexpr):
    batch = tl.program_id(2)
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    a_rows = tl.zeros((BM,), dtype=tl.int32)
    b_cols = tl.zeros((BN,), dtype=tl.int32)
    for k0 in range(0, K, BK):
        a_mask = (rm[:, None] < M) & (k0 + rk[None, :] < K)
        b_mask = (k0 + rk[:, None] < K) & (rn[None, :] < N)
        a = tl.load(a_ptr + batch * sab + rm[:, None] * sam + (k0 + rk[None, :]) * sak, mask=a_mask, other=0)
        b = tl.load(b_ptr + batch * sbb + (k0 + rk[:, None]) * sbk + rn[None, :] * sbn, mask=b_mask, other=0)
        a = tl.where(a_mask, _signed(a, A_UNSIGNED), 0).to(tl.int8)
        b = tl.where(b_mask, _signed(b, B_UNSIGNED), 0).to(tl.int8)
        acc += tl.dot(a, b, out_dtype=tl.int32)
        a_rows += tl.sum(a.to(tl.int32), axis=1)
        b_cols += tl.sum(b.to(tl.int32), axis=0)
    # sum_k (a_s + a_off)(b_s + b_off) = a_s.b_s + b_off*rows(a_s) + a_off*cols(b_s) + K*a_off*b_off
    acc += b_offset * a_rows[:, None] + a_offset * b_cols[None, :] + K * a_offset * b_offset
    y = acc.to(tl.float32) * mult
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    out_ptrs = out_ptr + batch * sob + rm[:, None] * som + rn[None, :] * son
    _store_output(out_ptrs, y, mask, inv_scale, zero_point, lo, hi, OUT_FLOAT, False)


@triton.jit
def _conv_gemm_kernel(x_ptr, w_ptr, wsum_ptr, w_scale_ptr, bias_ptr, out_ptr, M, N, C, H, W, HO, WO,
                      sxn, sxc, sxh, sxw, x_zero, x_offset, x_scale, inv_scale, zero_point, lo, hi,
                      KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr,
                      PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr, C_PAD: tl.constexpr,
                      X_UNSIGNED: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_FLOAT: tl.constexpr, RELU: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """Implicit-GEMM conv: out[m, n] over output pixels m = (b, ho, wo) and channels n, K = (kh, kw, c).

    ``w`` is ``[N, KH*KW*C_PAD]`` (column ``(kh*KW + kw)*C_PAD + c``, zero for ``c >= C``; K-major B is
    what makes Triton's int8 tl.dot fast on Hopper). Input taps outside
    the image read the zero point, so ``signed(x) + x_offset == 0`` there, like zero padding.
    """
    pid = tl.program_id(0)
    grid_m, grid_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    group = pid // (GROUP_M * grid_n)
    first_m = group * GROUP_M
    rows_in_group = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * grid_n)) % rows_in_group
    pid_n = (pid % (GROUP_M * grid_n)) // rows_in_group
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    wo = rm % WO
    ho = (rm // WO) % HO
    img = rm // (WO * HO)
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    for k0 in range(0, KH * KW * C_PAD, BK):
        tap = k0 // C_PAD
        c = (k0 % C_PAD) + rk
        hi_ = ho * SH - PH + (tap // KW) * DH
        wi_ = wo * SW - PW + (tap % KW) * DW
        inside = (rm < M) & (hi_ >= 0) & (hi_ < H) & (wi_ >= 0) & (wi_ < W)
        a_ptrs = x_ptr + (img * sxn + hi_ * sxh + wi_ * sxw)[:, None] + c[None, :] * sxc
        a = tl.load(a_ptrs, mask=inside[:, None] & (c[None, :] < C), other=x_zero)
        b = tl.load(w_ptr + rn[None, :] * (KH * KW * C_PAD) + (k0 + rk)[:, None], mask=rn[None, :] < N, other=0)
        acc += tl.dot(_signed(a, X_UNSIGNED), b, out_dtype=tl.int32)
    n_mask = rn < N
    acc += x_offset * tl.load(wsum_ptr + rn, mask=n_mask, other=0)[None, :]
    mult = tl.load(w_scale_ptr + rn, mask=n_mask, other=0.0) * x_scale  # s_x * s_w[n] in float32
    y = acc.to(tl.float32) * mult[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rn, mask=n_mask, other=0.0)[None, :]
    mask = (rm[:, None] < M) & n_mask[None, :]
    _store_output(out_ptr + rm[:, None] * N + rn[None, :], y, mask, inv_scale, zero_point, lo, hi, OUT_FLOAT, RELU)


@triton.jit
def _linear_kernel(x_ptr, w_ptr, wsum_ptr, w_scale_ptr, bias_ptr, out_ptr, M, N, K, sxm, x_offset, x_scale,
                   inv_scale, zero_point, lo, hi, K_PAD: tl.constexpr, X_UNSIGNED: tl.constexpr,
                   HAS_BIAS: tl.constexpr, OUT_FLOAT: tl.constexpr, RELU: tl.constexpr, EVEN_K: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """out[m, n] of x [M, K] (rows ``sxm`` apart) times ``w`` [N, K_PAD] (K-major, zero past K)."""
    pid = tl.program_id(0)
    grid_m, grid_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    group = pid // (GROUP_M * grid_n)
    first_m = group * GROUP_M
    rows_in_group = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * grid_n)) % rows_in_group
    pid_n = (pid % (GROUP_M * grid_n)) // rows_in_group
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    a_ptrs = x_ptr + (rm % M)[:, None] * sxm + rk[None, :]  # rows past M repeat real rows: no load mask
    b_ptrs = w_ptr + (rn % N)[None, :] * K_PAD + rk[:, None]
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    for k0 in range(0, K, BK):
        if EVEN_K:
            a = tl.load(a_ptrs)
        else:
            a = tl.load(a_ptrs, mask=(k0 + rk)[None, :] < K, other=0)  # meets zero weights
        acc += tl.dot(_signed(a, X_UNSIGNED), tl.load(b_ptrs), out_dtype=tl.int32)
        a_ptrs += BK
        b_ptrs += BK
    n_mask = rn < N
    acc += x_offset * tl.load(wsum_ptr + rn, mask=n_mask, other=0)[None, :]
    mult = tl.load(w_scale_ptr + rn, mask=n_mask, other=0.0) * x_scale  # s_x * s_w[n] in float32
    y = acc.to(tl.float32) * mult[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rn, mask=n_mask, other=0.0)[None, :]
    mask = (rm[:, None] < M) & n_mask[None, :]
    _store_output(out_ptr + rm[:, None] * N + rn[None, :], y, mask, inv_scale, zero_point, lo, hi, OUT_FLOAT, RELU)


def signed_offset(qp: ActQParams) -> int:
    """``o`` such that ``q - z == signed(q) + o`` (signed(q) = q - 128 for uint8, q for int8)."""
    return 128 - qp.zero_point if qp.dtype == torch.uint8 else -qp.zero_point


def _requant_args(out_qp: ActQParams | None, relu: bool) -> tuple[float, int, int, int]:
    if out_qp is None:
        return 1.0, 0, 0, 0
    return out_qp.inv_scale, out_qp.zero_point, out_qp.relu_floor if relu else out_qp.qmin, out_qp.qmax


def binary(a: Tensor, a_qp: ActQParams, b: Tensor, b_qp: ActQParams, out_qp: ActQParams, relu: bool,
           is_mul: bool) -> Tensor:
    """Fused dequantize-add/mul-requantize of two tensors with the same shape and the same dense layout."""
    out = torch.empty_like(a, dtype=out_qp.dtype)
    n = a.numel()
    _binary_kernel[(triton.cdiv(n, _ELEMENTWISE_BLOCK),)](
        a, b, out, n, a_qp.scale, a_qp.zero_point, b_qp.scale, b_qp.zero_point, *_requant_args(out_qp, relu),
        IS_MUL=is_mul, BLOCK=_ELEMENTWISE_BLOCK, **_NO_FMA)
    return out


def gemm_config(m: int, n: int) -> tuple[int, int, int, int]:
    """(BM, BN, num_warps, num_stages) of the conv GEMM for an ``m x n`` output."""
    bm = 128 if m >= 65536 or (m >= 4096 and n >= 256) else 64
    bn = 128 if n >= 128 else 64
    return bm, bn, 8 if bm * bn >= 128 * 128 else 4, 4  # picked on an H100 from ResNet-50 shapes at batch 32


def linear(x: Tensor, x_qp: ActQParams, w: Tensor, block_k: int, wsum: Tensor, w_scale: Tensor, bias: Tensor | None,
           out_qp: ActQParams | None, relu: bool, config: tuple[int, int, int, int] | None = None) -> Tensor:
    """``[M, N]`` int8 Linear of ``x`` [M, K] (unit column stride); ``w`` is [N, K_pad], K_pad % block_k == 0."""
    m, k = x.shape
    n, k_pad = w.shape
    out = torch.empty(m, n, dtype=torch.float32 if out_qp is None else out_qp.dtype, device=x.device)
    bm, bn, warps, stages = config or (128 if m >= 1024 else 64, 128 if n >= 128 else 64, 4, 4)  # H100 sweep
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _linear_kernel[grid](x, w, wsum, w_scale, w_scale if bias is None else bias, out, m, n, k, x.stride(0),
                         signed_offset(x_qp), x_qp.scale, *_requant_args(out_qp, relu), K_PAD=k_pad,
                         X_UNSIGNED=x.dtype == torch.uint8, HAS_BIAS=bias is not None, OUT_FLOAT=out_qp is None,
                         RELU=relu, EVEN_K=k % block_k == 0, BM=bm, BN=bn, BK=block_k, GROUP_M=8,
                         num_warps=warps, num_stages=stages, **_NO_FMA)
    return out


def conv_gemm(x: Tensor, x_qp: ActQParams, w: Tensor, c_pad: int, block_k: int, wsum: Tensor, w_scale: Tensor,
              bias: Tensor | None, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
              dilation: tuple[int, int], out_qp: ActQParams | None, relu: bool,
              config: tuple[int, int, int, int] | None = None) -> Tensor:
    """Implicit-GEMM int8 conv of ``x`` [B, C, H, W] (any memory format): ``[B*Ho*Wo, N]`` (NHWC rows).

    ``w`` is the ``[N, kh*kw*c_pad]`` weight of ``_conv_gemm_kernel``; a Linear is the 1x1 conv of [M, K, 1, 1].
    """
    batch, c, h, wd = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    ho, wo = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    m, n = batch * ho * wo, w.shape[0]
    out = torch.empty(m, n, dtype=torch.float32 if out_qp is None else out_qp.dtype, device=x.device)
    bm, bn, warps, stages = config or gemm_config(m, n)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    sxn, sxc, sxh, sxw = x.stride()
    _conv_gemm_kernel[grid](
        x, w, wsum, w_scale, w_scale if bias is None else bias, out, m, n, c, h, wd, ho, wo, sxn, sxc, sxh, sxw,
        x_qp.zero_point, signed_offset(x_qp), x_qp.scale, *_requant_args(out_qp, relu), KH=kh, KW=kw, SH=sh, SW=sw,
        PH=ph, PW=pw, DH=dh, DW=dw, C_PAD=c_pad, X_UNSIGNED=x.dtype == torch.uint8, HAS_BIAS=bias is not None,
        OUT_FLOAT=out_qp is None, RELU=relu, BM=bm, BN=bn, BK=block_k, GROUP_M=8, num_warps=warps,
        num_stages=stages, **_NO_FMA)
    return out


def bmm(a: Tensor, a_qp: ActQParams, b: Tensor, b_qp: ActQParams, mult: float, out_qp: ActQParams | None) -> Tensor:
    """Batched ``[B, M, K] @ [B, K, N]`` of two quantized activations, int32-exact, fused requantization."""
    batch, m, k = a.shape
    n = b.shape[2]
    out = torch.empty(batch, m, n, dtype=torch.float32 if out_qp is None else out_qp.dtype, device=a.device)
    bm, bn, bk = _BMM_BLOCK
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn), batch)
    _bmm_kernel[grid](a, b, out, m, n, k, *a.stride(), *b.stride(), *out.stride(), signed_offset(a_qp),
                      signed_offset(b_qp), mult, *_requant_args(out_qp, False),
                      A_UNSIGNED=a.dtype == torch.uint8, B_UNSIGNED=b.dtype == torch.uint8,
                      OUT_FLOAT=out_qp is None, BM=bm, BN=bn, BK=bk, **_NO_FMA)
    return out
