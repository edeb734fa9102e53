"""Triton kernels of the cuda backend: int8 GEMM (Linear, 1x1 conv), implicit-GEMM conv, direct grouped conv,
elementwise quantize / dequantize / add / mul / table lookup, batched matmul, row LayerNorm and softmax, fused
attention (q @ k^T, softmax, @ v).

Imported lazily by ``qat.kernels.cuda`` (Triton needs a GPU, or ``TRITON_INTERPRET=1`` on CPU tensors).
Every kernel ends with the project's requantization (float ops rounded one by one, no FMA),
``clamp(round(y * inv_scale) + z, lo, hi)`` with rounding half to even like ``torch.round``; when the
output pointer is float32 the kernel stores ``y`` instead (after a ReLU when asked).

The GEMM and conv kernels are autotuned per problem shape over ``TILES`` (int8 tensor-core tiles: K steps
of 32 or more); weights are packed once, independent of the tile (``pack_gemm_weight``). Under the
interpreter or with ``QAT_TRITON_AUTOTUNE=0`` only the last tile runs; ``config=`` forces one tile (tests).
A fused epilogue can add a residual: the conv result is requantized to its own grid (as the unfused graph
does), dequantized, added to the dequantized residual and requantized to the add's grid.
"""
from __future__ import annotations

import functools
import inspect
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra import libdevice

from qat.kernels.types import ActQParams, AttentionGrids, conv_output_size
from qat.quant.triton_fake_quant import NO_FMA, round_half_even

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_ELEMENTWISE_BLOCK = 1024
_BMM_BLOCK = (64, 64, 64)
MAX_LAYER_NORM = 16384  # a row's channels held by one program
MAX_SOFTMAX = 16384  # likewise for softmax rows
_SOFTMAX_ELEMENTS = 512  # elements per softmax program (short rows share one): ViT-B/16's 197-key rows on an
# H200, 2 rows on 2 warps 295 us, 8 rows on 4 warps 347 us, 32 rows on 8 warps 760 us (copy: 64 us)
# elements per loop step (rows share one; their count rounded down to a power of two), warps. ViT-B/16 batch 256
# (50432 rows of 768) on an H200, column chunks 512 + 256 with integer statistics (a scratch version): 2 rows on 4
# warps 73 us, 4 rows 59 us, 8 rows 56 us, 8 rows on 8 warps 63 us; float statistics on the same chunks 64 us; the
# kernel before, float statistics on one 1024 block of 4 rows, 69 us (an int8 copy: 26 us). This kernel: 58-62 us
# against 66-68 us for the one before (two runs; alternating rounds in one process each)
_LAYER_NORM_PROGRAM = (8192, 4)
# the LayerNorm's persistent grid (programs per SM) and its loads in flight: ViT-B/16 batch 256 on an H200, one
# program per 4 rows 112 us, 8 programs per SM looping with 3 stages 91 us (4 per SM, 2 stages 99 us; copy 34 us)
_LAYER_NORM_PERSISTENT = (8, 3)
_BMM_STAGES = 2  # ViT-B/16 attention on an H200: weights @ v 546 us against 655 us with 3 stages, q @ k^T 349 vs 359
_GROUPED_BLOCK = (64, 64, 4)  # output pixels, output channels, warps
_POOL_BLOCK = (32, 64)  # output pixels, channels
_PAD_PIXELS = 256  # pixels per program of the few-channel conv's padded copy
K_ALIGN = 32  # packed weights pad K (or C per tap) to this; every tile's BK is a multiple of it


@dataclass(frozen=True)
class Tile:
    """One autotune candidate: output tile BM x BN, K step BK, warps and pipeline stages."""

    bm: int
    bn: int
    bk: int
    warps: int
    stages: int

    def config(self) -> triton.Config:
        return triton.Config({"BM": self.bm, "BN": self.bn, "BK": self.bk, "GROUP_M": 8}, num_warps=self.warps,
                             num_stages=self.stages)


# Hopper int8 wgmma wants K steps of 32; shared memory per stage is (BM + BN) * BK bytes (<= 49 KB here).
# 128x128x64 on 4 warps (H200, forced against the autotuned choice of the other tiles): ViT-B/16's GEMMs 101 -> 83,
# 368 -> 310, 259 -> 241 us; ResNet-50's 1x1 convs at batch 256 up to 27% faster (12544x512x2048: 63 -> 46 us).
# 128x128x128 on 4 warps: ViT-B/16's fc2 (50432x768, K = 3072) 235 -> 214 us (H200); its other GEMMs keep BK = 64.
TILES = (Tile(128, 256, 64, 8, 3), Tile(128, 128, 128, 8, 3), Tile(128, 128, 128, 4, 3), Tile(128, 128, 64, 8, 4),
         Tile(128, 128, 64, 4, 3), Tile(128, 64, 64, 4, 4), Tile(64, 128, 64, 4, 4), Tile(64, 64, 64, 4, 4),
         Tile(64, 64, 32, 4, 4))
# One tile per kernel, valid for every shape, without benchmarking: under the interpreter (no GPU timer) and
# where QAT_TRITON_AUTOTUNE=0 (the tests: correctness only, far fewer compilations). BK = 32 divides every
# tap-major C_PAD; BK = 128 is a multiple of every row-packed RP.
AUTOTUNE = not INTERPRET and os.environ.get("QAT_TRITON_AUTOTUNE", "1") != "0"
_UNTUNED_TILE = TILES[-1]
_UNTUNED_ROW_TILE = Tile(64, 64, 128, 4, 4)


def _bench(fn, quantiles=None, **_):
    """Shorter than Triton's default (25 ms warm-up, 100 ms): enough repeats for 0.01-1 ms kernels."""
    return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


def _prune(configs, named_args, **kwargs):
    """Tiles whose K step reads one tap (tap-major conv: BK divides C_PAD) or whole kernel rows (row-packed
    conv: RP divides BK); only BM = 64 tiles for small M."""
    args = {**named_args, **kwargs}
    kept = [c for c in configs if "C_PAD" not in args or args["C_PAD"] % c.kwargs["BK"] == 0]
    kept = [c for c in kept if "RP" not in args or c.kwargs["BK"] % args["RP"] == 0]
    small = [c for c in kept if c.kwargs["BM"] == 64]
    return small if args["M"] <= 64 and small else kept


def _autotune(key, untuned: Tile = _UNTUNED_TILE):
    timing = {"do_bench": _bench} if "do_bench" in inspect.signature(triton.autotune).parameters else {"warmup": 5, "rep": 20}
    tiles = TILES if AUTOTUNE else (untuned,)
    return triton.autotune([t.config() for t in tiles], key=key, prune_configs_by={"early_config_prune": _prune},
                           **timing)


@triton.jit
def _requantize(y, inv_scale, zero_point, lo, hi):
    q = round_half_even(y * inv_scale) + zero_point
    return tl.minimum(tl.maximum(q, lo), hi)


@triton.jit
def _store_output(out_ptrs, y, mask, inv_scale, zero_point, lo, hi, OUT_FLOAT: tl.constexpr, RELU: tl.constexpr):
    if OUT_FLOAT:
        if RELU:
            y = tl.maximum(y, 0.0)
        tl.store(out_ptrs, y, mask=mask)
    else:
        q = _requantize(y, inv_scale, zero_point, lo, hi)
        tl.store(out_ptrs, q.to(tl.int32).to(out_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _epilogue(acc, rm, rn, M, N, w_scale_ptr, bias_ptr, res_ptr, out_ptr, x_scale, inv_scale, zero_point, lo, hi,
              mid_inv_scale, mid_zero, mid_lo, mid_hi, mid_scale, res_zero, res_scale, HAS_BIAS: tl.constexpr,
              OUT_FLOAT: tl.constexpr, RELU: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """Exact int32 ``acc`` [BM, BN] -> ``float32(acc) * (s_x * s_w[n]) + bias[n]`` -> (+ residual) -> stored.

    Output (and residual) rows are dense: element (m, n) at ``m * N + n``.
    """
    n_mask = rn < N
    mult = tl.load(w_scale_ptr + rn, mask=n_mask, other=0.0) * x_scale  # s_x * s_w[n] in float32
    y = acc.to(tl.float32) * mult[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rn, mask=n_mask, other=0.0)[None, :]
    mask = (rm[:, None] < M) & n_mask[None, :]
    offs = rm[:, None] * N + rn[None, :]
    if HAS_RESIDUAL:  # the unfused graph: conv -> requantize -> dequantize + dequantize(residual) -> requantize
        mid = _requantize(y, mid_inv_scale, mid_zero, mid_lo, mid_hi)
        other = tl.load(res_ptr + offs, mask=mask, other=0).to(tl.float32)
        y = (mid - mid_zero) * mid_scale + (other - res_zero) * res_scale
    _store_output(out_ptr + offs, y, mask, inv_scale, zero_point, lo, hi, OUT_FLOAT, RELU)


@triton.jit
def _signed(x, UNSIGNED: tl.constexpr):
    """uint8 ``u`` -> int8 ``u - 128`` (the top bit flipped, the byte reinterpreted); int8 unchanged."""
    if UNSIGNED:
        return (x.to(tl.uint8, bitcast=True) ^ 128).to(tl.int8, bitcast=True)
    return x.to(tl.int8, bitcast=True)


@triton.jit
def _tile_ids(M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) with GROUP_M row tiles swept per column tile, so neighbouring programs share inputs."""
    pid = tl.program_id(0)
    grid_m, grid_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    rows_in_group = tl.minimum(grid_m - first_m, GROUP_M)
    return first_m + (pid % width) % rows_in_group, (pid % width) // rows_in_group


@_autotune(key=["M", "N", "K"])
@triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BK"] == 0})
@triton.jit
def _gemm_kernel(x_ptr, w_ptr, wsum_ptr, w_scale_ptr, bias_ptr, res_ptr, out_ptr, M, N, K, sxm, K_PAD,
                 x_offset, x_scale, inv_scale, zero_point, lo, hi, mid_inv_scale, mid_zero, mid_lo, mid_hi, mid_scale,
                 res_zero, res_scale, X_UNSIGNED: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_FLOAT: tl.constexpr,
                 RELU: tl.constexpr, HAS_RESIDUAL: tl.constexpr, EVEN_K: tl.constexpr, BM: tl.constexpr,
                 BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """out[m, n] of x [M, K] (rows ``sxm`` apart, unit column stride) times ``w`` [N, K_PAD] (K-major, zero past K)."""
    pid_m, pid_n = _tile_ids(M, N, BM, BN, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    a_ptrs = x_ptr + (rm % M)[:, None] * sxm + rk[None, :]  # rows past M repeat real rows: no load mask
    b_ptrs = w_ptr + (rn % N)[None, :] * K_PAD + rk[:, None]
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    for k0 in range(0, K, BK):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_in = (k0 + rk) < K
            a = tl.load(a_ptrs, mask=k_in[None, :], other=0)  # meets zero weights
            b = tl.load(b_ptrs, mask=k_in[:, None], other=0)
        acc = tl.dot(_signed(a, X_UNSIGNED), b, acc, out_dtype=tl.int32)
        a_ptrs += BK
        b_ptrs += BK
    acc += x_offset * tl.load(wsum_ptr + rn, mask=rn < N, other=0)[None, :]
    _epilogue(acc, rm, rn, M, N, w_scale_ptr, bias_ptr, res_ptr, out_ptr, x_scale, inv_scale, zero_point, lo, hi,
              mid_inv_scale, mid_zero, mid_lo, mid_hi, mid_scale, res_zero, res_scale, HAS_BIAS, OUT_FLOAT, RELU,
              HAS_RESIDUAL)


@_autotune(key=["M", "N", "C", "K_LOOP"])
@triton.heuristics({"EVEN_C": lambda a: a["C"] % a["BK"] == 0})
@triton.jit
def _conv_kernel(x_ptr, w_ptr, wsum_ptr, w_scale_ptr, bias_ptr, res_ptr, out_ptr, M, N, C, H, W, HO, WO,
                 sxn, sxc, sxh, sxw, SH, SW, PH, PW, DH, DW, C_PAD, K_LOOP, K_PAD, x_zero, x_offset, x_scale,
                 inv_scale, zero_point, lo, hi, mid_inv_scale, mid_zero, mid_lo, mid_hi, mid_scale, res_zero, res_scale,
                 KH: tl.constexpr, KW: tl.constexpr, X_UNSIGNED: tl.constexpr, HAS_BIAS: tl.constexpr,
                 OUT_FLOAT: tl.constexpr, RELU: tl.constexpr, HAS_RESIDUAL: tl.constexpr, EVEN_C: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """Tap-major implicit-GEMM conv: out[m, n] over output pixels m = (b, ho, wo) and channels n.

    K = (kh, kw, c) with each tap's channels padded to ``C_PAD`` (a multiple of BK), so one K step reads one
    tap: a row offset and a row mask per step. ``w`` is ``[N, K_PAD]`` K-major and ``K_LOOP`` the K extent
    walked. Taps outside the image read the zero point, so ``signed(x) + x_offset == 0`` there, like zero
    padding.
    """
    pid_m, pid_n = _tile_ids(M, N, BM, BN, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    m = rm % M  # rows past M repeat real rows
    wo = m % WO
    ho = (m // WO) % HO
    h0 = ho * SH - PH
    w0 = wo * SW - PW
    row_base = (m // (WO * HO)) * sxn + h0 * sxh + w0 * sxw
    b_ptrs = w_ptr + (rn % N)[None, :] * K_PAD + rk[:, None]
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    for k0 in range(0, K_LOOP, BK):
        tap = k0 // C_PAD
        kh = tap // KW
        kw = tap % KW
        c = k0 % C_PAD + rk
        hi_ = h0 + kh * DH
        wi_ = w0 + kw * DW
        inside = ((hi_ >= 0) & (hi_ < H) & (wi_ >= 0) & (wi_ < W))[:, None]
        if not EVEN_C:
            inside = inside & (c < C)[None, :]
        a = tl.load(x_ptr + (row_base + kh * DH * sxh + kw * DW * sxw)[:, None] + c[None, :] * sxc, mask=inside,
                    other=x_zero)
        acc = tl.dot(_signed(a, X_UNSIGNED), tl.load(b_ptrs), acc, out_dtype=tl.int32)
        b_ptrs += BK
    acc += x_offset * tl.load(wsum_ptr + rn, mask=rn < N, other=0)[None, :]
    _epilogue(acc, rm, rn, M, N, w_scale_ptr, bias_ptr, res_ptr, out_ptr, x_scale, inv_scale, zero_point, lo, hi,
              mid_inv_scale, mid_zero, mid_lo, mid_hi, mid_scale, res_zero, res_scale, HAS_BIAS, OUT_FLOAT, RELU,
              HAS_RESIDUAL)


@triton.jit
def _pad_pixels_kernel(x_ptr, out_ptr, PIXELS, C, H, W, HP, WP, sxn, sxc, sxh, sxw, PH, PW, zero,
                       PIXEL: tl.constexpr, BP: tl.constexpr):
    """``out`` [B, HP, WP, PIXEL] (dense) = the codes of x [B, C, H, W] (any strides) at (PH, PW); the border,
    the channels past C and the columns past PW + W hold the zero point."""
    p = tl.program_id(0) * BP + tl.arange(0, BP)
    c = tl.arange(0, PIXEL)
    wp = p % WP
    hp = (p // WP) % HP
    h = hp - PH
    w = wp - PW
    inside = ((h >= 0) & (h < H) & (w >= 0) & (w < W) & (p < PIXELS))[:, None] & (c < C)[None, :]
    ptrs = x_ptr + ((p // (WP * HP)).to(tl.int64) * sxn + h * sxh + w * sxw)[:, None] + (c * sxc)[None, :]
    tl.store(out_ptr + p.to(tl.int64)[:, None] * PIXEL + c[None, :], tl.load(ptrs, mask=inside, other=zero),
             mask=(p < PIXELS)[:, None])


@_autotune(key=["M", "N", "K_LOOP", "RP"], untuned=_UNTUNED_ROW_TILE)
@triton.jit
def _conv_rows_kernel(x_ptr, w_ptr, wsum_ptr, w_scale_ptr, bias_ptr, res_ptr, out_ptr, M, N, HO, WO, sxn, sxh,
                      PIXEL_STEP, K_LOOP, x_offset, x_scale, inv_scale, zero_point, lo, hi, mid_inv_scale, mid_zero,
                      mid_lo, mid_hi, mid_scale, res_zero, res_scale, SH, RP: tl.constexpr, ALIGN: tl.constexpr,
                      X_UNSIGNED: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_FLOAT: tl.constexpr,
                      RELU: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                      BK: tl.constexpr, GROUP_M: tl.constexpr):
    """Row-packed implicit-GEMM conv of a padded copy ``x`` [B, HP, WP, PIXEL] (``_pad_pixels_kernel``): K =
    (kh, RP bytes of one kernel row: kw, c), so a K step reads BK // RP whole rows of every window, contiguous
    bytes without masks. Bytes past a window's row (and rows past the kernel) meet zero weights; the copy has
    slack after its end for them. ``PIXEL_STEP`` = stride_w * PIXEL bytes between neighbouring windows."""
    pid_m, pid_n = _tile_ids(M, N, BM, BN, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    m = rm % M  # rows past M repeat real rows
    wo = m % WO
    ho = (m // WO) % HO
    window = tl.multiple_of((m // (WO * HO)).to(tl.int64) * sxn + ho * SH * sxh + wo * PIXEL_STEP, ALIGN)
    a_ptrs = x_ptr + window[:, None] + ((rk // RP) * sxh + rk % RP)[None, :]
    b_ptrs = w_ptr + (rn % N)[None, :] * K_LOOP + rk[:, None]
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    for _ in range(0, K_LOOP, BK):
        acc = tl.dot(_signed(tl.load(a_ptrs), X_UNSIGNED), tl.load(b_ptrs), acc, out_dtype=tl.int32)
        a_ptrs += (BK // RP) * sxh
        b_ptrs += BK
    acc += x_offset * tl.load(wsum_ptr + rn, mask=rn < N, other=0)[None, :]
    _epilogue(acc, rm, rn, M, N, w_scale_ptr, bias_ptr, res_ptr, out_ptr, x_scale, inv_scale, zero_point, lo, hi,
              mid_inv_scale, mid_zero, mid_lo, mid_hi, mid_scale, res_zero, res_scale, HAS_BIAS, OUT_FLOAT, RELU,
              HAS_RESIDUAL)


@triton.jit
def _grouped_conv_kernel(x_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr, M, N, H, W, HO, WO, sxn, sxc, sxh, sxw,
                         SH, SW, PH, PW, DH, DW, CG, NG, x_zero, x_scale, inv_scale, zero_point, lo, hi,
                         KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_FLOAT: tl.constexpr,
                         RELU: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """Direct grouped / depthwise conv in int32 on CUDA cores: out[m, n] = sum_{tap, ci} (x - z) w.

    Output channel n belongs to group n // NG and reads input channels (n // NG) * CG + ci; ``w`` is
    ``[KH*KW*CG, N]`` (row (kh*KW + kw)*CG + ci), so a row is one vector over the tile's output channels.
    """
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    m = rm % M
    n = rn % N
    wo = m % WO
    ho = (m // WO) % HO
    h0 = ho * SH - PH
    w0 = wo * SW - PW
    img_base = (m // (WO * HO)) * sxn
    c_first = (n // NG) * CG
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    for tap in tl.static_range(KH * KW):
        hi_ = h0 + (tap // KW) * DH
        wi_ = w0 + (tap % KW) * DW
        inside = ((hi_ >= 0) & (hi_ < H) & (wi_ >= 0) & (wi_ < W))[:, None]
        row_ptrs = x_ptr + (img_base + hi_ * sxh + wi_ * sxw)[:, None]
        for ci in range(CG):
            x = tl.load(row_ptrs + ((c_first + ci) * sxc)[None, :], mask=inside, other=x_zero)
            w = tl.load(w_ptr + (tap * CG + ci) * N + n)
            acc += (x.to(tl.int32) - x_zero) * w.to(tl.int32)[None, :]
    _epilogue(acc, rm, rn, M, N, w_scale_ptr, bias_ptr, out_ptr, out_ptr, x_scale, inv_scale, zero_point, lo, hi,
              1.0, 0, 0, 0, 1.0, 0, 1.0, HAS_BIAS, OUT_FLOAT, RELU, False)


@triton.jit
def _quantize_kernel(x_ptr, out_ptr, n, inv_scale, zero_point, lo, hi, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    _store_output(out_ptr + offs, x, mask, inv_scale, zero_point, lo, hi, False, False)


@triton.jit
def _chunk_mask(live, cols, C, PAST_C: tl.constexpr):
    """[rows, cols] mask of a column chunk: the rows that exist, and where the chunk reaches PAST_C, cols < C."""
    mask = live[:, None]
    if PAST_C:
        mask = mask & (cols < C)[None, :]
    return mask


@triton.jit
def _row_codes(q_ptr, offs, start, C, zero, live, BC: tl.constexpr, PAST_C: tl.constexpr):
    """Columns ``start .. start + BC`` of a group of rows (``offs``: their first elements; ``live``: rows that
    exist) as int32 codes minus the zero point; where the chunk reaches PAST_C, 0 there. A missing row's codes
    are never stored (the loads' fill value is 0 rather than the zero point: one select per element fewer)."""
    cols = start + tl.arange(0, BC)
    codes = tl.load(q_ptr + offs[:, None] + cols[None, :], mask=_chunk_mask(live, cols, C, PAST_C),
                    other=0).to(tl.int32) - zero
    if PAST_C:
        codes = tl.where((cols < C)[None, :], codes, 0)
    return codes


@triton.jit
def _column_values(ptr, cols, C, PAST_C: tl.constexpr):
    """A per-column vector at ``cols``, 0 past C where the chunk reaches PAST_C (else unmasked loads)."""
    if PAST_C:
        values = tl.load(ptr + cols, mask=cols < C, other=0.0)
    else:
        values = tl.load(ptr + cols)
    return values


@triton.jit
def _normalised_store(c, mean, mult, w_ptr, b_ptr, out_ptr, offs, start, C, live, inv_scale, out_zero, lo, hi,
                      HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_FLOAT: tl.constexpr, BC: tl.constexpr,
                      PAST_C: tl.constexpr):
    """``(c - mean) * mult * weight + bias`` of one column chunk, stored (requantized unless OUT_FLOAT)."""
    cols = start + tl.arange(0, BC)
    y = (c.to(tl.float32) - mean[:, None]) * mult[:, None]
    if HAS_WEIGHT:
        y = y * _column_values(w_ptr, cols, C, PAST_C)[None, :]
    if HAS_BIAS:
        y = y + _column_values(b_ptr, cols, C, PAST_C)[None, :]
    _store_output(out_ptr + offs[:, None] + cols[None, :], y, _chunk_mask(live, cols, C, PAST_C), inv_scale,
                  out_zero, lo, hi, OUT_FLOAT, False)


@triton.jit
def _layer_norm_kernel(q_ptr, w_ptr, b_ptr, out_ptr, rows, C, scale, zero, eps, inv_scale, out_zero, lo, hi,
                       HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_FLOAT: tl.constexpr,
                       ROWS: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, C3: tl.constexpr,
                       PADDED: tl.constexpr, STAGES: tl.constexpr):
    """Groups of ROWS rows of C codes in column chunks of C1, C2 (if > 0), C3 (if > 0), each program looping
    over every num_programs-th group (the next group's codes loaded while this one is normalised). PADDED: the
    chunk (1, 2 or 3) that reaches past C and masks its columns, 0 where the chunks end at C.

    The row statistics are exact integer sums of the centred codes c = q - zero (|c| <= 255): S1 = sum c and
    S2 = sum c^2 fit int32 for rows up to MAX_LAYER_NORM, and C * S2 - S1^2 is formed in int64. Then mean =
    scale * S1 / C, biased variance = scale^2 * (C * S2 - S1^2) / C^2, and ``y = (c - S1 / C) * (scale /
    sqrt(var + eps)) * weight + bias``: four float operations per code before the requantization, where float
    statistics dequantize each code and take two more passes over the row."""
    mult_spread = scale * scale / (C * C)
    for group in tl.range(tl.program_id(0), tl.cdiv(rows, ROWS), tl.num_programs(0), num_stages=STAGES):
        row = group * ROWS + tl.arange(0, ROWS)
        live = row < rows
        offs = row.to(tl.int64) * C
        c1 = _row_codes(q_ptr, offs, 0, C, zero, live, C1, PADDED == 1)
        s1 = tl.sum(c1, axis=1)
        s2 = tl.sum(c1 * c1, axis=1)
        if C2 > 0:
            c2 = _row_codes(q_ptr, offs, C1, C, zero, live, C2, PADDED == 2)
            s1 += tl.sum(c2, axis=1)
            s2 += tl.sum(c2 * c2, axis=1)
        if C3 > 0:
            c3 = _row_codes(q_ptr, offs, C1 + C2, C, zero, live, C3, PADDED == 3)
            s1 += tl.sum(c3, axis=1)
            s2 += tl.sum(c3 * c3, axis=1)
        spread = s2.to(tl.int64) * C - s1.to(tl.int64) * s1  # C^2 * variance / scale^2, exact
        mean = s1.to(tl.float32) / C
        mult = scale / tl.sqrt(spread.to(tl.float32) * mult_spread + eps)
        _normalised_store(c1, mean, mult, w_ptr, b_ptr, out_ptr, offs, 0, C, live, inv_scale, out_zero, lo, hi,
                          HAS_WEIGHT, HAS_BIAS, OUT_FLOAT, C1, PADDED == 1)
        if C2 > 0:
            _normalised_store(c2, mean, mult, w_ptr, b_ptr, out_ptr, offs, C1, C, live, inv_scale, out_zero, lo,
                              hi, HAS_WEIGHT, HAS_BIAS, OUT_FLOAT, C2, PADDED == 2)
        if C3 > 0:
            _normalised_store(c3, mean, mult, w_ptr, b_ptr, out_ptr, offs, C1 + C2, C, live, inv_scale, out_zero,
                              lo, hi, HAS_WEIGHT, HAS_BIAS, OUT_FLOAT, C3, PADDED == 3)


@triton.jit
def _exp(x, ACCURATE_EXP: tl.constexpr):
    """``ACCURATE_EXP``: CUDA's expf (libdevice), what torch's softmax calls, instead of Triton's fast exp2 path
    (the interpreter has no libdevice; its tl.exp is numpy's)."""
    if ACCURATE_EXP:
        return libdevice.exp(x)
    return tl.exp(x)


@triton.jit
def _softmax_kernel(q_ptr, out_ptr, rows, C, scale, zero, inv_scale, out_zero, lo, hi, OUT_FLOAT: tl.constexpr,
                    ACCURATE_EXP: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """ROWS rows of C codes: dequantize, exp(x - max) / sum like torch's softmax, store (requantized or float)."""
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    inside = (row < rows)[:, None] & (cols < C)[None, :]
    offs = row.to(tl.int64)[:, None] * C + cols[None, :]
    x = (tl.load(q_ptr + offs, mask=inside, other=0).to(tl.float32) - zero) * scale
    x = tl.where(inside, x, float("-inf"))  # columns past C: exp gives 0
    real_row = row < rows  # rows past the end: shifted by 0 and divided by 1, never stored
    shifted = x - tl.where(real_row, tl.max(x, axis=1), 0.0)[:, None]
    e = _exp(shifted, ACCURATE_EXP)
    y = e / tl.where(real_row, tl.sum(e, axis=1), 1.0)[:, None]
    _store_output(out_ptr + offs, y, inside, inv_scale, out_zero, lo, hi, OUT_FLOAT, False)


@triton.jit
def _max_pool_kernel(x_ptr, out_ptr, M, C, H, W, HO, WO, sxn, sxc, sxh, sxw, SH, SW, PH, PW, DH, DW,
                     KH: tl.constexpr, KW: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr):
    """Max over each window of the codes, output pixels m = (b, ho, wo) x channels, NHWC rows out; taps outside
    the image take no part (torch's -inf padding)."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rc = tl.program_id(1) * BC + tl.arange(0, BC)
    m = rm % M
    wo = m % WO
    ho = (m // WO) % HO
    base = (m // (WO * HO)).to(tl.int64) * sxn
    best = tl.full((BM, BC), -1024, dtype=tl.int32)
    for tap in tl.static_range(KH * KW):
        hi = ho * SH - PH + (tap // KW) * DH
        wi = wo * SW - PW + (tap % KW) * DW
        inside = ((hi >= 0) & (hi < H) & (wi >= 0) & (wi < W))[:, None] & (rc < C)[None, :]
        ptrs = x_ptr + (base + hi * sxh + wi * sxw)[:, None] + (rc * sxc)[None, :]
        best = tl.maximum(best, tl.where(inside, tl.load(ptrs, mask=inside, other=0).to(tl.int32), -1024))
    mask = (rm < M)[:, None] & (rc < C)[None, :]
    tl.store(out_ptr + rm.to(tl.int64)[:, None] * C + rc[None, :], best.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lookup_kernel(q_ptr, table_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """out = table[code] with the code's 8 bits as the index (int8 -1 reads entry 255)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    index = tl.load(q_ptr + offs, mask=mask, other=0).to(tl.int32) & 255
    tl.store(out_ptr + offs, tl.load(table_ptr + index, mask=mask), mask=mask)


@triton.jit
def _dequantize_kernel(q_ptr, out_ptr, n, scale, zero_point, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    q = tl.load(q_ptr + offs, mask=mask, other=0).to(tl.float32)
    tl.store(out_ptr + offs, (q - zero_point) * scale, mask=mask)


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
def _bmm_kernel(a_ptr, b_ptr, out_ptr, M, N, K, INNER, sa0, sa1, sam, sak, sb0, sb1, sbk, sbn, so0, so1, som, son,
                a_offset, b_offset, mult, inv_scale, zero_point, lo, hi, A_UNSIGNED: tl.constexpr,
                B_UNSIGNED: tl.constexpr, A_ROWS: tl.constexpr, B_COLS: tl.constexpr, OUT_FLOAT: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Batch (outer, inner) = divmod(program_id(2), INNER); every operand addressed through its own strides.

    The zero-point corrections need a's row sums (``A_ROWS``, when b_offset != 0) and b's column sums
    (``B_COLS``, when a_offset != 0): products with a tile of ones on the tensor cores, cheaper than
    reductions across threads every K step. Padding reads as signed 0 (uint8 128)."""
    outer, inner = tl.program_id(2) // INNER, tl.program_id(2) % INNER
    a_ptr += outer.to(tl.int64) * sa0 + inner.to(tl.int64) * sa1
    b_ptr += outer.to(tl.int64) * sb0 + inner.to(tl.int64) * sb1
    out_ptr += outer.to(tl.int64) * so0 + inner.to(tl.int64) * so1
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    a_rows = tl.zeros((BM, 16), dtype=tl.int32)  # every column: the row sums so far
    b_cols = tl.zeros((16, BN), dtype=tl.int32)  # every row: the column sums so far
    for k0 in range(0, K, BK):
        a_mask = (rm[:, None] < M) & (k0 + rk[None, :] < K)
        b_mask = (k0 + rk[:, None] < K) & (rn[None, :] < N)
        a = _signed(tl.load(a_ptr + rm[:, None] * sam + (k0 + rk[None, :]) * sak, mask=a_mask,
                            other=128 * A_UNSIGNED), A_UNSIGNED)
        b = _signed(tl.load(b_ptr + (k0 + rk[:, None]) * sbk + rn[None, :] * sbn, mask=b_mask,
                            other=128 * B_UNSIGNED), B_UNSIGNED)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        if A_ROWS:
            a_rows = tl.dot(a, tl.full((BK, 16), 1, tl.int8), a_rows, out_dtype=tl.int32)
        if B_COLS:
            b_cols = tl.dot(tl.full((16, BK), 1, tl.int8), b, b_cols, out_dtype=tl.int32)
    # sum_k (a_s + a_off)(b_s + b_off) = a_s.b_s + b_off*rows(a_s) + a_off*cols(b_s) + K*a_off*b_off
    if A_ROWS:
        acc += b_offset * tl.max(a_rows, axis=1)[:, None]
    if B_COLS:
        acc += a_offset * tl.max(b_cols, axis=0)[None, :]
    acc += K * a_offset * b_offset
    y = acc.to(tl.float32) * mult
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    _store_output(out_ptr + rm[:, None] * som + rn[None, :] * son, y, mask, inv_scale, zero_point, lo, hi,
                  OUT_FLOAT, False)


# Fused attention (ViT-B/16 at batch 256: 197 keys, head dim 64, on an H200, per layer): 64 query rows on 4 warps
# (one warpgroup: Hopper's wgmma), a program looping over every row block of its head, 408 us; one program per row
# block 568 us; 32 rows 546 us; 128 rows on 8 warps 451 us; the int8-dot kernel this replaced 547 us; bf16 flash
# attention 166 us; the unfused kernels 852 us. The softmax from centred codes with exp2 and one reciprocal per row
# instead of expf and a division per score: 545 -> 385 us (460 -> 358 on another H200; each pair in one process);
# a last block of 16 rows for the 5 left over (197 = 3 * 64 + 5) made it slower (498 against 477 us). Masking only
# the last key chunk (the others lie inside the keys) and no lower clamp on the probabilities' codes: 301 -> 267 us.
_ATTENTION_ROWS, _ATTENTION_WARPS = 64, 4
MAX_ATTENTION_KEYS = 256  # keys of one query row held by one program; also the fp16 dots' exactness bound
MAX_ATTENTION_HEAD = 128  # head dim
_CHUNK_MIN = 16  # fp16 dots take K steps of 16
_ROW_LOOP_PROGRAMS_PER_SM = 2  # one program per head where there are enough heads to fill the GPU


@functools.cache
def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 for the interpreter's CPU tensors."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def power_of_two_chunks(n: int) -> tuple[int, int, int]:
    """Up to three powers of two (at least 16; 0 = no chunk) whose sum covers ``n`` with little padding
    (attention's keys, LayerNorm's columns): ``power_of_two_chunks(197) == (128, 64, 16)``,
    ``power_of_two_chunks(768) == (512, 256, 0)``. Every chunk but the last lies inside ``n``, so only the last
    needs a mask."""
    rest, chunks = -(-n // _CHUNK_MIN) * _CHUNK_MIN, []
    while rest > 0 and len(chunks) < 2:
        chunks.append(1 << (rest.bit_length() - 1))
        rest -= chunks[-1]
    if rest > 0:
        chunks.append(triton.next_power_of_2(rest))
    return (*chunks, *(0,) * (3 - len(chunks)))


@triton.jit
def _centred(codes, zero, mask):
    """fp16 ``codes - zero`` (an integer, |.| <= 255: exact in fp16), 0 where ``mask`` is off."""
    return tl.where(mask, codes.to(tl.int32) - zero, 0).to(tl.float16)


@triton.jit
def _key_chunk(k_ptr, v_ptr, start, S, rd, head, skd, sks, svs, svd, k_zero, v_zero, BC: tl.constexpr):
    """Keys ``start .. start + BC`` as centred fp16 ``k`` [BD, BC] and ``v`` [BC, BD], zero past S and past D."""
    rs = start + tl.arange(0, BC)
    k_mask = head[:, None] & (rs < S)[None, :]
    v_mask = (rs < S)[:, None] & head[None, :]
    k = _centred(tl.load(k_ptr + rd[:, None] * skd + rs[None, :] * sks, mask=k_mask), k_zero, k_mask)
    v = _centred(tl.load(v_ptr + rs[:, None] * svs + rd[None, :] * svd, mask=v_mask), v_zero, v_mask)
    return k, v


@triton.jit
def _chunk_codes(q, k, start, S, qk_mult, s_inv_scale, c_lo, c_hi, BC: tl.constexpr, LAST: tl.constexpr):
    """One key chunk's scores as codes minus the zero point: ``clamp(round(q @ k * qk_mult * s_inv_scale), c_lo,
    c_hi)``, the unfused matmul's arithmetic; -inf past S, which only the LAST chunk reaches
    (``power_of_two_chunks``)."""
    codes = round_half_even(tl.dot(q, k, out_dtype=tl.float32) * qk_mult * s_inv_scale)
    codes = tl.minimum(tl.maximum(codes, c_lo), c_hi)
    if LAST:
        live = (start + tl.arange(0, BC)) < S
        codes = tl.where(live[None, :], codes, float("-inf"))
    return codes


@triton.jit
def _chunk_output(e, r, v, c_hi):
    """One key chunk's share of the output: the probabilities' codes minus the zero point,
    ``clamp(round(e * r), c_lo, c_hi)`` with ``r = p_inv_scale / total``, ``@ v`` (exact). ``e * r >= 0`` and
    ``c_lo <= 0`` (0 lies in every grid), so only c_hi clamps. A padded key's e is 0, and so is its code."""
    p = tl.minimum(round_half_even(e * r[:, None]), c_hi)
    return tl.dot(p.to(tl.float16), v, out_dtype=tl.float32)


@triton.jit
def _attention_rows(q_ptr, out_ptr, rm, L, S, rd, head, sql, sqd, sol, sod, q_zero, qk_mult, s_inv_scale, s_lo, s_hi,
                    exp2_mult, p_inv_scale, p_hi, pv_mult, inv_scale, zero_point, lo, hi, k1, v1, k2, v2, k3, v3,
                    C1: tl.constexpr, C2: tl.constexpr, C3: tl.constexpr, OUT_FLOAT: tl.constexpr):
    """Query rows ``rm`` against the key chunks (k1, v1), (k2, v2) where C2 > 0, (k3, v3) where C3 > 0."""
    q_mask = (rm[:, None] < L) & head[None, :]
    q = _centred(tl.load(q_ptr + rm[:, None] * sql + rd[None, :] * sqd, mask=q_mask), q_zero, q_mask)
    x1 = _chunk_codes(q, k1, 0, S, qk_mult, s_inv_scale, s_lo, s_hi, C1, C2 == 0)
    top = tl.max(x1, axis=1)
    if C2 > 0:
        x2 = _chunk_codes(q, k2, C1, S, qk_mult, s_inv_scale, s_lo, s_hi, C2, C3 == 0)
        top = tl.maximum(top, tl.max(x2, axis=1))
    if C3 > 0:
        x3 = _chunk_codes(q, k3, C1 + C2, S, qk_mult, s_inv_scale, s_lo, s_hi, C3, True)
        top = tl.maximum(top, tl.max(x3, axis=1))
    e1 = tl.math.exp2((x1 - top[:, None]) * exp2_mult)
    total = tl.sum(e1, axis=1)
    if C2 > 0:
        e2 = tl.math.exp2((x2 - top[:, None]) * exp2_mult)
        total += tl.sum(e2, axis=1)
    if C3 > 0:
        e3 = tl.math.exp2((x3 - top[:, None]) * exp2_mult)
        total += tl.sum(e3, axis=1)
    r = p_inv_scale / total
    out = _chunk_output(e1, r, v1, p_hi)
    if C2 > 0:
        out += _chunk_output(e2, r, v2, p_hi)
    if C3 > 0:
        out += _chunk_output(e3, r, v3, p_hi)
    _store_output(out_ptr + rm[:, None] * sol + rd[None, :] * sod, out * pv_mult, q_mask, inv_scale, zero_point,
                  lo, hi, OUT_FLOAT, False)


@triton.jit
def _attention_kernel(q_ptr, k_ptr, v_ptr, out_ptr, L, S, D, INNER, sq0, sq1, sql, sqd, sk0, sk1, skd, sks,
                      sv0, sv1, svs, svd, so0, so1, sol, sod, q_zero, k_zero, qk_mult, s_inv_scale, s_lo, s_hi,
                      exp2_mult, p_inv_scale, p_hi, v_zero, pv_mult, inv_scale, zero_point, lo, hi,
                      OUT_FLOAT: tl.constexpr, ROW_LOOP: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr,
                      C3: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr):
    """``q @ k_t`` -> scores' codes -> softmax of the logits -> probabilities' codes -> ``@ v`` -> stored, every
    key of a row in registers, in key chunks of C1, C2, C3 (S <= C1 + C2 + C3). ROW_LOOP: one program per
    (outer, inner) batch loops over its blocks of BM query rows, its keys loaded once; else one program per
    block.

    The products run on fp16 tensor cores: the codes minus their zero points are integers of at most 255 in
    magnitude, exact in fp16, and so is every product and partial sum in the float32 accumulator while it stays
    below 2^24 (D * 255^2 and S * 255^2 for D, S <= 256): the int32 sums of the unfused kernels, without their
    zero-point corrections. The scores' codes are the unfused matmul's; the softmax works on them, centred:
    ``exp2((c - max c) * exp2_mult)`` (exp2_mult = logit scale * log2(e); the GPU's exp2 instruction) and
    probabilities ``e * (p_inv_scale / total)``, where the unfused softmax calls expf and divides: the outputs
    agree with the unfused kernels' within 1 LSB (ViT-B/16 layer, 38.7M outputs: 99.9998% equal)."""
    if ROW_LOOP:
        batch, first, count = tl.program_id(0), 0, tl.cdiv(L, BM)
    else:
        blocks = tl.cdiv(L, BM)
        batch, first, count = tl.program_id(0) // blocks, tl.program_id(0) % blocks, 1
    outer, inner = batch // INNER, batch % INNER
    q_ptr += outer.to(tl.int64) * sq0 + inner.to(tl.int64) * sq1
    k_ptr += outer.to(tl.int64) * sk0 + inner.to(tl.int64) * sk1
    v_ptr += outer.to(tl.int64) * sv0 + inner.to(tl.int64) * sv1
    out_ptr += outer.to(tl.int64) * so0 + inner.to(tl.int64) * so1
    rd = tl.arange(0, BD)
    head = rd < D
    k1, v1 = _key_chunk(k_ptr, v_ptr, 0, S, rd, head, skd, sks, svs, svd, k_zero, v_zero, C1)
    k2, v2, k3, v3 = k1, v1, k1, v1  # unread where a chunk is absent (C2 or C3 == 0)
    if C2 > 0:
        k2, v2 = _key_chunk(k_ptr, v_ptr, C1, S, rd, head, skd, sks, svs, svd, k_zero, v_zero, C2)
    if C3 > 0:
        k3, v3 = _key_chunk(k_ptr, v_ptr, C1 + C2, S, rd, head, skd, sks, svs, svd, k_zero, v_zero, C3)
    for i in range(count):
        _attention_rows(q_ptr, out_ptr, (first + i) * BM + tl.arange(0, BM), L, S, rd, head, sql, sqd, sol, sod,
                        q_zero, qk_mult, s_inv_scale, s_lo, s_hi, exp2_mult, p_inv_scale, p_hi, pv_mult,
                        inv_scale, zero_point, lo, hi, k1, v1, k2, v2, k3, v3, C1, C2, C3, OUT_FLOAT)


def signed_offset(qp: ActQParams) -> int:
    """``o`` such that ``q - z == signed(q) + o`` (signed(q) = q - 128 for uint8, q for int8)."""
    return 128 - qp.zero_point if qp.dtype == torch.uint8 else -qp.zero_point


def _centred_grid_args(qp: ActQParams) -> tuple[float, int, int]:
    """(1 / scale, code bounds minus the zero point): a grid as the fused attention rounds onto it."""
    return qp.inv_scale, qp.qmin - qp.zero_point, qp.qmax - qp.zero_point


def _requant_args(out_qp: ActQParams | None, relu: bool) -> tuple[float, int, int, int]:
    if out_qp is None:
        return 1.0, 0, 0, 0
    return out_qp.inv_scale, out_qp.zero_point, out_qp.relu_floor if relu else out_qp.qmin, out_qp.qmax


@dataclass(frozen=True, eq=False)
class Residual:
    """A residual added in the epilogue: ``rows`` [M, N] (dense, on ``qp``) plus the grid ``mid_qp`` (with
    its ReLU floor when ``mid_relu``) that the unfused conv output would have been requantized to."""

    rows: Tensor
    qp: ActQParams
    mid_qp: ActQParams
    mid_relu: bool

    def args(self) -> tuple:
        mid = self.mid_qp
        return (mid.inv_scale, mid.zero_point, mid.relu_floor if self.mid_relu else mid.qmin, mid.qmax, mid.scale,
                self.qp.zero_point, self.qp.scale)


_NO_RESIDUAL_ARGS = (1.0, 0, 0, 0, 1.0, 0, 1.0)


def _epilogue_args(out_qp: ActQParams | None, relu: bool, residual: Residual | None) -> tuple[tuple, dict]:
    """Positional scalars (requantization, residual) and constexpr flags shared by the GEMM and conv kernels."""
    if residual is not None and out_qp is None:
        raise ValueError("a fused residual needs a quantized output")
    scalars = _requant_args(out_qp, relu) + (_NO_RESIDUAL_ARGS if residual is None else residual.args())
    flags = {"OUT_FLOAT": out_qp is None, "RELU": relu and out_qp is None, "HAS_RESIDUAL": residual is not None}
    return scalars, flags  # a quantized output applies ReLU through its clamp floor: one compiled variant


_CHOSEN: dict[tuple, dict] = {}  # (kernel, its autotuning key) -> the chosen tile's launch arguments
_KEY_POSITIONS: dict[object, tuple[tuple[str, int], ...]] = {}  # kernel -> (name, position) of its key arguments


def _tuning_key(kernel, args: tuple, constexprs: dict) -> tuple:
    """The autotuner's own key (its key arguments' values, positional or constexpr, then every tensor
    argument's dtype), with the kernel."""
    if kernel not in _KEY_POSITIONS:
        _KEY_POSITIONS[kernel] = tuple((name, kernel.arg_names.index(name)) for name in kernel.keys)
    values = (args[i] if i < len(args) else constexprs[name] for name, i in _KEY_POSITIONS[kernel])
    return (kernel, *values, *(a.dtype for a in args if isinstance(a, Tensor)))


def _launch(kernel, grid, args: tuple, constexprs: dict, config: Tile | None) -> None:
    """Autotuned launch, or one forced tile (``config``) through the kernel under the autotuner. Once a key is
    tuned, later launches pass its tile straight to the kernel under the autotuner: the autotuner's per-call
    work (merging the arguments into dicts, the dtype key) is host time on every eager int8 forward."""
    if config is None:
        key = _tuning_key(kernel, args, constexprs)
        chosen = _CHOSEN.get(key)
        if chosen is None:
            kernel[grid](*args, **constexprs, **NO_FMA)
            _CHOSEN[key] = kernel.best_config.all_kwargs()
        else:
            kernel.fn[grid](*args, **constexprs, **chosen, **NO_FMA)
        return
    inner = kernel.fn  # the heuristics wrapper: it still derives EVEN_K / EVEN_C from BK
    meta = {"BM": config.bm, "BN": config.bn, "BK": config.bk, "GROUP_M": 8}
    inner[grid](*args, **constexprs, **meta, num_warps=config.warps, num_stages=config.stages, **NO_FMA)


def _out(m: int, n: int, out_qp: ActQParams | None, device) -> Tensor:
    return torch.empty(m, n, dtype=torch.float32 if out_qp is None else out_qp.dtype, device=device)


def _tiles_grid(m: int, n: int):
    return lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)


def linear(x: Tensor, x_qp: ActQParams, w: Tensor, wsum: Tensor, w_scale: Tensor, bias: Tensor | None,
           out_qp: ActQParams | None, relu: bool, residual: Residual | None = None,
           config: Tile | None = None) -> Tensor:
    """``[M, N]`` int8 GEMM of ``x`` [M, K] (unit column stride) and ``w`` [N, K_pad] (K-major, zero past K)."""
    m, k = x.shape
    n, k_pad = w.shape
    out = _out(m, n, out_qp, x.device)
    scalars, flags = _epilogue_args(out_qp, relu, residual)
    args = (x, w, wsum, w_scale, w_scale if bias is None else bias, out if residual is None else residual.rows, out,
            m, n, k, x.stride(0), k_pad, signed_offset(x_qp), x_qp.scale, *scalars)
    _launch(_gemm_kernel, _tiles_grid(m, n), args,
            dict(X_UNSIGNED=x.dtype == torch.uint8, HAS_BIAS=bias is not None, **flags), config)
    return out


def conv_gemm(x: Tensor, x_qp: ActQParams, w: Tensor, c_pad: int, wsum: Tensor, w_scale: Tensor,
              bias: Tensor | None, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
              dilation: tuple[int, int], out_qp: ActQParams | None, relu: bool, residual: Residual | None = None,
              config: Tile | None = None) -> Tensor:
    """Tap-major implicit-GEMM int8 conv of ``x`` [B, C, H, W] (any strides): ``[B*Ho*Wo, N]`` (NHWC rows).

    ``w`` is ``[N, K_pad]`` with ``c_pad`` channels per tap (see ``_conv_kernel``).
    """
    batch, c, h, wd = x.shape
    (kh, kw), (ho, wo) = kernel, conv_output_size((h, wd), kernel, stride, padding, dilation)
    m, n = batch * ho * wo, w.shape[0]
    out = _out(m, n, out_qp, x.device)
    scalars, flags = _epilogue_args(out_qp, relu, residual)
    args = (x, w, wsum, w_scale, w_scale if bias is None else bias, out if residual is None else residual.rows, out,
            m, n, c, h, wd, ho, wo, *x.stride(), *stride, *padding, *dilation, c_pad, kh * kw * c_pad, w.shape[1],
            x_qp.zero_point, signed_offset(x_qp), x_qp.scale, *scalars)
    _launch(_conv_kernel, _tiles_grid(m, n), args,
            dict(KH=kh, KW=kw, X_UNSIGNED=x.dtype == torch.uint8, HAS_BIAS=bias is not None, **flags), config)
    return out


def conv_rows(x: Tensor, x_qp: ActQParams, w: Tensor, pixel: int, row_bytes: int, wsum: Tensor, w_scale: Tensor,
              bias: Tensor | None, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
              out_qp: ActQParams | None, relu: bool, residual: Residual | None = None,
              config: Tile | None = None) -> Tensor:
    """Row-packed int8 conv (few channels, dilation 1) of ``x`` [B, C, H, W] (any strides): ``[B*Ho*Wo, N]``.

    The codes are first copied to a padded [B, H + 2 ph, Wp, ``pixel``] tensor (zero point around and past C,
    Wp rounded up to 4 pixels), then ``_conv_rows_kernel`` reads whole kernel rows of it. ``w`` is
    ``[N, K_pad]``, columns (kh, kw, c) with ``row_bytes`` per kernel row (a power of two dividing every K step
    of the row kernel) and ``pixel`` channels per tap, K_pad a multiple of every tile's K step.
    """
    batch, c, h, wd = x.shape
    kh, (ho, wo) = kernel[0], conv_output_size((h, wd), kernel, stride, padding, (1, 1))
    hp, wp = h + 2 * padding[0], -(-(wd + 2 * padding[1]) // 4) * 4
    pixels, row_stride = batch * hp * wp, wp * pixel
    k_loop = w.shape[1]
    slack = (k_loop // row_bytes - kh) * row_stride + row_bytes  # rows past the kernel, bytes past a window row
    padded = torch.empty(pixels * pixel + slack, dtype=x.dtype, device=x.device)
    _pad_pixels_kernel[(triton.cdiv(pixels, _PAD_PIXELS),)](
        x, padded, pixels, c, h, wd, hp, wp, *x.stride(), *padding, x_qp.zero_point, PIXEL=pixel, BP=_PAD_PIXELS)
    m, n = batch * ho * wo, w.shape[0]
    out = _out(m, n, out_qp, x.device)
    scalars, flags = _epilogue_args(out_qp, relu, residual)
    window_step = stride[1] * pixel
    align = math.gcd(16, window_step, stride[0] * row_stride, hp * row_stride)
    args = (padded, w, wsum, w_scale, w_scale if bias is None else bias, out if residual is None else residual.rows,
            out, m, n, ho, wo, hp * row_stride, row_stride, window_step, k_loop, signed_offset(x_qp), x_qp.scale,
            *scalars, stride[0])
    _launch(_conv_rows_kernel, _tiles_grid(m, n), args,
            dict(RP=row_bytes, ALIGN=align, X_UNSIGNED=x.dtype == torch.uint8, HAS_BIAS=bias is not None, **flags),
            config)
    return out


def grouped_conv(x: Tensor, x_qp: ActQParams, w: Tensor, groups: int, w_scale: Tensor, bias: Tensor | None,
                 kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
                 dilation: tuple[int, int], out_qp: ActQParams | None, relu: bool) -> Tensor:
    """Direct grouped conv of ``x`` [B, C, H, W] (any strides) with ``w`` [kh*kw*C/groups, N]: ``[B*Ho*Wo, N]``."""
    batch, c, h, wd = x.shape
    (kh, kw), (ho, wo) = kernel, conv_output_size((h, wd), kernel, stride, padding, dilation)
    m, n = batch * ho * wo, w.shape[1]
    out = _out(m, n, out_qp, x.device)
    bm, bn, warps = _GROUPED_BLOCK
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _grouped_conv_kernel[grid](
        x, w, w_scale, w_scale if bias is None else bias, out, m, n, h, wd, ho, wo, *x.stride(), *stride, *padding,
        *dilation, c // groups, n // groups, x_qp.zero_point, x_qp.scale, *_requant_args(out_qp, relu), KH=kh, KW=kw,
        HAS_BIAS=bias is not None, OUT_FLOAT=out_qp is None, RELU=relu and out_qp is None, BM=bm, BN=bn,
        num_warps=warps, **NO_FMA)
    return out


def quantize(x: Tensor, qp: ActQParams) -> Tensor:
    """Elementwise quantization of a dense float tensor (its memory layout kept)."""
    out = torch.empty_like(x, dtype=qp.dtype)
    n = x.numel()
    _quantize_kernel[(triton.cdiv(n, _ELEMENTWISE_BLOCK),)](x, out, n, *_requant_args(qp, False),
                                                           BLOCK=_ELEMENTWISE_BLOCK, **NO_FMA)
    return out


def dequantize(q: Tensor, qp: ActQParams) -> Tensor:
    """``(q - z) * scale`` in float32 of a dense tensor (its memory layout kept)."""
    out = torch.empty_like(q, dtype=torch.float32)
    n = q.numel()
    _dequantize_kernel[(triton.cdiv(n, _ELEMENTWISE_BLOCK),)](q, out, n, qp.scale, qp.zero_point,
                                                             BLOCK=_ELEMENTWISE_BLOCK, **NO_FMA)
    return out


def layer_norm(q: Tensor, in_qp: ActQParams, weight: Tensor | None, bias: Tensor | None, eps: float,
               out_qp: ActQParams | None) -> Tensor:
    """LayerNorm over the last dim of a contiguous int8 tensor (rows up to MAX_LAYER_NORM) in power-of-two
    column chunks, several short rows per loop step (``_LAYER_NORM_PROGRAM``) of a persistent grid
    (``_LAYER_NORM_PERSISTENT``)."""
    c = q.shape[-1]
    rows = q.numel() // c
    out = torch.empty_like(q, dtype=torch.float32 if out_qp is None else out_qp.dtype)
    chunks = power_of_two_chunks(c)
    padded = sum(chunks)
    elements, warps = _LAYER_NORM_PROGRAM
    per_program = 1 << (max(1, elements // padded).bit_length() - 1)  # a power of two
    programs_per_sm, stages = _LAYER_NORM_PERSISTENT
    programs = min(triton.cdiv(rows, per_program), programs_per_sm * _sm_count(q.device))
    c1, c2, c3 = chunks
    padded_chunk = sum(1 for n in chunks if n) if padded > c else 0
    _layer_norm_kernel[(programs,)](
        q, weight if weight is not None else out, bias if bias is not None else out, out, rows, c, in_qp.scale,
        in_qp.zero_point, eps, *_requant_args(out_qp, False), HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None, OUT_FLOAT=out_qp is None, ROWS=per_program, C1=c1, C2=c2, C3=c3,
        PADDED=padded_chunk, STAGES=stages, num_warps=warps if padded <= 2048 else 8, **NO_FMA)
    return out


def softmax(q: Tensor, in_qp: ActQParams, out_qp: ActQParams | None) -> Tensor:
    """Softmax over the last dim of a contiguous int8 tensor (rows up to MAX_SOFTMAX), several short rows per
    program."""
    c = q.shape[-1]
    rows = q.numel() // c
    out = torch.empty_like(q, dtype=torch.float32 if out_qp is None else out_qp.dtype)
    block = max(triton.next_power_of_2(c), 16)
    per_program = max(1, _SOFTMAX_ELEMENTS // block)
    _softmax_kernel[(triton.cdiv(rows, per_program),)](
        q, out, rows, c, in_qp.scale, in_qp.zero_point, *_requant_args(out_qp, False), OUT_FLOAT=out_qp is None,
        ACCURATE_EXP=not INTERPRET, ROWS=per_program, BLOCK=block,
        num_warps=min(8, max(1, per_program * block // 256)), **NO_FMA)
    return out


def max_pool2d(x: Tensor, out_size: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int],
               padding: tuple[int, int], dilation: tuple[int, int]) -> Tensor:
    """Max-pooling of the codes of ``x`` [B, C, H, W] (any strides; channels_last reads whole pixels) to
    ``out_size``: a channels_last [B, C, Ho, Wo] tensor of x's dtype."""
    batch, c, h, w = x.shape
    ho, wo = out_size
    out = torch.empty(batch, ho, wo, c, dtype=x.dtype, device=x.device)  # NHWC rows
    m = batch * ho * wo
    bm, bc = _POOL_BLOCK
    _max_pool_kernel[(triton.cdiv(m, bm), triton.cdiv(c, bc))](
        x, out, m, c, h, w, ho, wo, *x.stride(), *stride, *padding, *dilation, KH=kernel[0], KW=kernel[1], BM=bm,
        BC=bc, num_warps=4)
    return out.permute(0, 3, 1, 2)  # [B, Ho, Wo, C] -> NCHW view of channels_last memory


def lookup(q: Tensor, table: Tensor) -> Tensor:
    """``table[code]`` for every code of a dense uint8/int8 tensor (its memory layout kept); 256 entries."""
    out = torch.empty_like(q, dtype=table.dtype)
    n = q.numel()
    _lookup_kernel[(triton.cdiv(n, _ELEMENTWISE_BLOCK),)](q, table, out, n, BLOCK=_ELEMENTWISE_BLOCK)
    return out


def binary(a: Tensor, a_qp: ActQParams, b: Tensor, b_qp: ActQParams, out_qp: ActQParams, relu: bool,
           is_mul: bool) -> Tensor:
    """Fused dequantize-add/mul-requantize of two tensors with the same shape and the same dense layout."""
    out = torch.empty_like(a, dtype=out_qp.dtype)
    n = a.numel()
    _binary_kernel[(triton.cdiv(n, _ELEMENTWISE_BLOCK),)](
        a, b, out, n, a_qp.scale, a_qp.zero_point, b_qp.scale, b_qp.zero_point, *_requant_args(out_qp, relu),
        IS_MUL=is_mul, BLOCK=_ELEMENTWISE_BLOCK, **NO_FMA)
    return out


def bmm(a: Tensor, a_qp: ActQParams, b: Tensor, b_qp: ActQParams, mult: float, out_qp: ActQParams | None) -> Tensor:
    """``[B0, B1, M, K] @ [B0, B1, K, N]`` of two quantized activations (any strides, broadcast batch dims
    of stride 0 included: no copies), int32-exact, fused requantization. The output takes b's strides when
    it has b's shape (attention's weights @ v: v is a head-split view, and so is the output, whose heads
    merge back without a copy), else it is contiguous."""
    outer, inner, m, k = a.shape
    n = b.shape[3]
    dtype = torch.float32 if out_qp is None else out_qp.dtype
    if b.shape == (outer, inner, m, n):  # empty_like keeps b's strides where b is dense, else contiguous
        out = torch.empty_like(b, dtype=dtype)
    else:
        out = torch.empty(outer, inner, m, n, dtype=dtype, device=a.device)
    bm, bn, bk = _BMM_BLOCK
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn), outer * inner)
    a_offset, b_offset = signed_offset(a_qp), signed_offset(b_qp)
    _bmm_kernel[grid](a, b, out, m, n, k, inner, *a.stride(), *b.stride(), *out.stride(), a_offset, b_offset, mult,
                      *_requant_args(out_qp, False), A_UNSIGNED=a.dtype == torch.uint8,
                      B_UNSIGNED=b.dtype == torch.uint8, A_ROWS=b_offset != 0, B_COLS=a_offset != 0,
                      OUT_FLOAT=out_qp is None, BM=bm, BN=bn, BK=bk, num_stages=_BMM_STAGES, **NO_FMA)
    return out


def attention(q: Tensor, k_t: Tensor, v: Tensor, grids: AttentionGrids, out_qp: ActQParams | None) -> Tensor:
    """``softmax(q @ k_t) @ v`` on ``grids`` in one kernel, for ``[B0, B1, L, D] @ [B0, B1, D, S] @ [B0, B1, S, D]``
    (any strides) with S <= MAX_ATTENTION_KEYS and D <= MAX_ATTENTION_HEAD. The output takes v's strides when
    it has v's shape (self-attention: heads merge back without a copy), else it is contiguous."""
    outer, inner, rows, d = q.shape
    keys = k_t.shape[3]
    dtype = torch.float32 if out_qp is None else out_qp.dtype
    out = (torch.empty_like(v, dtype=dtype) if v.shape == (outer, inner, rows, d)
           else torch.empty(outer, inner, rows, d, dtype=dtype, device=q.device))
    s_qp, p_qp = grids.scores, grids.probs.as_int8()
    p_inv_scale, _, p_hi = _centred_grid_args(p_qp)  # no lower bound: the probabilities' codes are >= 0 >= it
    batches = outer * inner
    row_loop = batches >= _ROW_LOOP_PROGRAMS_PER_SM * _sm_count(q.device)
    programs = batches if row_loop else batches * triton.cdiv(rows, _ATTENTION_ROWS)
    c1, c2, c3 = power_of_two_chunks(keys)
    _attention_kernel[(programs,)](
        q, k_t, v, out, rows, keys, d, inner, *q.stride(), *k_t.stride(), *v.stride(), *out.stride(),
        grids.q.zero_point, grids.k.zero_point, grids.q.scale * grids.k.scale, *_centred_grid_args(s_qp),
        grids.logits.scale * math.log2(math.e), p_inv_scale, p_hi, grids.v.zero_point,
        p_qp.scale * grids.v.scale, *_requant_args(out_qp, False), OUT_FLOAT=out_qp is None, ROW_LOOP=row_loop,
        C1=c1, C2=c2, C3=c3, BD=max(16, triton.next_power_of_2(d)),
        BM=_ATTENTION_ROWS, num_warps=_ATTENTION_WARPS, **NO_FMA)
    return out
