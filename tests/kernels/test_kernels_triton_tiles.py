"""Every autotune tile of the cuda backend's Triton kernels against the reference, on odd shapes.

The autotuner picks one tile per shape on the GPU (and only one tile exists under the interpreter), so each
tile is forced here once per kernel path: GEMM (even and ragged K), tap-major conv (even and padded channels),
packed-tap conv, and the fused residual epilogue.
"""
from __future__ import annotations

import pytest
import torch
from kernel_cases import (
    CUDA_MARKS,
    DEVICES,
    activation_qparams,
    assert_quantized_agree,
    fitted_qparams,
    random_activation,
    random_weight,
)

from qat.kernels import cuda
from qat.kernels.reference import ReferenceBackend
from qat.kernels.types import ConvGeometry

tk = pytest.importorskip("qat.kernels.triton_kernels")
pytestmark = CUDA_MARKS
REF = ReferenceBackend()
DEVICE = DEVICES["cuda"]
TILES = [pytest.param(t, id=f"{t.bm}x{t.bn}x{t.bk}_w{t.warps}_s{t.stages}") for t in tk.TILES]

# (N, C, H, W, out, kernel, stride, padding): tap-major even / padded channels, row-packed (4-channel
# pixels, 32-byte rows; 16-channel pixels, 64-byte rows), 1x1 GEMM
CONV_SHAPES = [(1, 64, 5, 6, 40, 3, 1, 1), (2, 40, 7, 7, 33, 3, 2, 1), (1, 3, 11, 11, 16, 7, 2, 3),
               (2, 13, 6, 7, 24, 3, 2, 1), (1, 128, 4, 4, 20, 1, 1, 0)]


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("k", [64, 200])
def test_gemm_tile(tile, k):
    x_qp = activation_qparams(False)
    x = random_activation((70, k), x_qp)
    weight, bias = random_weight((36, k)), torch.randn(36)
    y = REF.linear(x, x_qp, REF.pack_linear(weight, bias))
    out_qp = fitted_qparams(y)
    gw = cuda.pack_gemm_weight(weight.q[:, :, None, None].to(DEVICE))
    got = tk.linear(x.to(DEVICE), x_qp, gw.w, gw.wsum, weight.scale.to(DEVICE), bias.to(DEVICE), out_qp, False,
                    config=tile)
    assert_quantized_agree(got.cpu(), REF.linear(x, x_qp, REF.pack_linear(weight, bias), out_qp))


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_conv_tile_with_residual(tile, shape):
    n, c, h, w, k, kernel, stride, padding = shape
    weight, bias = random_weight((k, c, kernel, kernel)), torch.randn(k)
    gw = cuda.pack_gemm_weight(weight.q.to(DEVICE))
    if (gw.c_pad % tile.bk if not gw.row_bytes else tile.bk % gw.row_bytes):
        pytest.skip("the autotuner prunes tiles whose K step straddles two taps or part of a kernel row")
    x_qp = activation_qparams(False)
    x = random_activation((n, c, h, w), x_qp).contiguous(memory_format=torch.channels_last)
    packed = REF.pack_conv2d(weight, bias, ConvGeometry(stride=stride, padding=padding))
    conv_qp = fitted_qparams(REF.conv2d(x, x_qp, packed))
    other_qp = activation_qparams(False, scale=0.03)
    other = random_activation(REF.conv2d(x, x_qp, packed).shape, other_qp).contiguous(memory_format=torch.channels_last)
    out_qp = fitted_qparams(REF.dequantize(REF.conv2d(x, x_qp, packed, conv_qp), conv_qp) * 2)
    expected = REF.conv2d_add(x, x_qp, packed, conv_qp, other, other_qp, out_qp, relu=True)
    residual = tk.Residual(other.to(DEVICE).permute(0, 2, 3, 1).reshape(-1, k), other_qp, conv_qp, False)  # [M, N]
    args = (weight.scale.to(DEVICE), bias.to(DEVICE))
    if kernel == 1:
        rows = x.to(DEVICE).permute(0, 2, 3, 1).reshape(-1, c)  # [N*H*W, C]
        got = tk.linear(rows, x_qp, gw.w, gw.wsum, *args, out_qp, True, residual, config=tile)
    elif gw.row_bytes:
        got = tk.conv_rows(x.to(DEVICE), x_qp, gw.w, gw.c_pad, gw.row_bytes, gw.wsum, *args, (kernel, kernel),
                           (stride, stride), (padding, padding), out_qp, True, residual, config=tile)
    else:
        got = tk.conv_gemm(x.to(DEVICE), x_qp, gw.w, gw.c_pad, gw.wsum, *args, (kernel, kernel), (stride, stride),
                           (padding, padding), (1, 1), out_qp, True, residual, config=tile)
    assert_quantized_agree(got.cpu(), expected.permute(0, 2, 3, 1).reshape(-1, k))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="autotuning times kernels on a GPU")
def test_autotuned_kernels_match_reference(monkeypatch):
    """The autotuner itself (all tiles, pruning, timing) on a padded tap-major conv, a row-packed stem conv
    and a ragged-K GEMM."""
    for kernel in (tk._conv_kernel, tk._conv_rows_kernel, tk._gemm_kernel):
        monkeypatch.setattr(kernel, "configs", [t.config() for t in tk.TILES])
        monkeypatch.setattr(kernel, "cache", {})
    monkeypatch.setattr(tk, "_CHOSEN", {})  # tiles chosen by earlier tests' single-tile autotuner
    backend = cuda.CudaBackend()
    x_qp = activation_qparams(False)
    # (input shape, weight shape, geometry): tap-major with padded channels; the row-packed RGB stem
    for shape, weight_shape, geometry in (((2, 40, 9, 9), (48, 40, 3, 3), ConvGeometry(stride=2, padding=1)),
                                          ((3, 3, 30, 30), (16, 3, 7, 7), ConvGeometry(stride=2, padding=3))):
        x = random_activation(shape, x_qp).contiguous(memory_format=torch.channels_last)
        weight, bias = random_weight(weight_shape), torch.randn(weight_shape[0])
        packed = REF.pack_conv2d(weight, bias, geometry)
        out_qp = fitted_qparams(REF.conv2d(x, x_qp, packed))
        got = backend.conv2d(x.cuda(), x_qp, backend.pack_conv2d(weight, bias, geometry), out_qp, relu=True)
        assert_quantized_agree(got.cpu(), REF.conv2d(x, x_qp, packed, out_qp, relu=True))
    rows = random_activation((300, 200), x_qp)
    lin = random_weight((72, 200))
    lin_qp = fitted_qparams(REF.linear(rows, x_qp, REF.pack_linear(lin, None)))
    got = backend.linear(rows.cuda(), x_qp, backend.pack_linear(lin, None), lin_qp)
    assert_quantized_agree(got.cpu(), REF.linear(rows, x_qp, REF.pack_linear(lin, None), lin_qp))


def test_a_tuned_shape_launches_its_tile_without_the_autotuner(monkeypatch):
    """The first launch of a shape goes through the autotuner; later ones pass its chosen tile straight to the
    kernel, with or without bias (the autotuner's key leaves the constexprs out), with the same results."""
    monkeypatch.setattr(tk, "_CHOSEN", {})
    runs = []
    autotuner_run = tk._gemm_kernel.run
    monkeypatch.setattr(tk._gemm_kernel, "run", lambda *a, **k: runs.append(1) or autotuner_run(*a, **k))
    x_qp = activation_qparams(False)
    x = random_activation((40, 96), x_qp)
    weight = random_weight((24, 96))
    gw = cuda.pack_gemm_weight(weight.q[:, :, None, None].to(DEVICE))
    for bias in (torch.randn(24), None):
        out_qp = fitted_qparams(REF.linear(x, x_qp, REF.pack_linear(weight, bias)))
        got = tk.linear(x.to(DEVICE), x_qp, gw.w, gw.wsum, weight.scale.to(DEVICE),
                        None if bias is None else bias.to(DEVICE), out_qp, False)
        assert_quantized_agree(got.cpu(), REF.linear(x, x_qp, REF.pack_linear(weight, bias), out_qp))
    assert len(runs) == 1 and len(tk._CHOSEN) == 1
    assert next(iter(tk._CHOSEN.values())) == tk._gemm_kernel.best_config.all_kwargs()
