"""The fused attention kernel's parts: key chunks, exact fp16 products of centred codes, and its two program
layouts (a program per head looping over row blocks, or a program per row block) against the reference."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from kernel_cases import (
    CUDA_MARKS,
    DEVICES,
    activation_qparams,
    assert_quantized_agree,
    fitted_qparams,
)

from qat.kernels.reference import ReferenceBackend
from qat.kernels.types import ActQParams, AttentionGrids

tk = pytest.importorskip("qat.kernels.triton_kernels")
triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
pytestmark = CUDA_MARKS
REF = ReferenceBackend()
DEVICE = DEVICES["cuda"]
_centred = tk._centred


@pytest.mark.parametrize("n", [*range(1, tk.MAX_ATTENTION_KEYS + 1), 768, 1000, 3072, 4095, tk.MAX_LAYER_NORM])
def test_power_of_two_chunks_cover_with_little_padding(n):
    chunks = [c for c in tk.power_of_two_chunks(n) if c]
    assert 1 <= len(chunks) <= 3 and all(c >= 16 and c & (c - 1) == 0 for c in chunks)
    assert n <= sum(chunks) <= max(triton.next_power_of_2(n), 16)
    assert sum(chunks) - n < max(16, sum(chunks) // 4)  # at most a quarter padded beyond the 16-element step
    assert sum(chunks[:-1]) <= n  # only the last chunk reaches past n: the kernels mask it alone


def test_power_of_two_chunks_of_vit():
    assert tk.power_of_two_chunks(197) == (128, 64, 16)  # keys
    assert tk.power_of_two_chunks(768) == (512, 256, 0)  # LayerNorm columns
    assert tk.power_of_two_chunks(256) == (256, 0, 0)
    assert tk.power_of_two_chunks(7) == (16, 0, 0)


@triton.jit
def _centred_dot_kernel(a_ptr, b_ptr, out_ptr, a_zero, b_zero, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr):
    rm, rk, rn = tl.arange(0, M), tl.arange(0, K), tl.arange(0, N)
    a = _centred(tl.load(a_ptr + rm[:, None] * K + rk[None, :]), a_zero, rm[:, None] < M)
    b = _centred(tl.load(b_ptr + rk[:, None] * N + rn[None, :]), b_zero, rk[:, None] < K)
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], tl.dot(a, b, out_dtype=tl.float32))


@pytest.mark.parametrize("k", [64, 128, 256])
def test_fp16_products_of_centred_codes_are_exact(k):
    """The attention kernel's premise on this hardware: centred uint8 codes (|c - z| <= 255) multiplied on fp16
    tensor cores with float32 accumulation give the exact integer sums, here up to 256 * 255^2 < 2^24 with
    every low bit significant (magnitudes 200..255 on one side, every value on the other)."""
    gen = torch.Generator().manual_seed(k)
    a = torch.randint(200, 256, (64, k), generator=gen, dtype=torch.int32).to(torch.uint8)  # zero 0: 200..255
    b = torch.randint(0, 256, (k, 64), generator=gen, dtype=torch.int32).to(torch.uint8)  # zero 255: -255..0
    b[: k // 2] = torch.randint(0, 56, (k // 2, 64), generator=gen, dtype=torch.int32).to(torch.uint8)
    out = torch.empty(64, 64, dtype=torch.float32, device=DEVICE)
    _centred_dot_kernel[(1,)](a.to(DEVICE), b.to(DEVICE), out, 0, 255, M=64, K=k, N=64)
    expected = a.long() @ (b.long() - 255)
    if k == 256:
        assert int(expected.abs().max()) > 2**23  # sums with 24 significant bits
    assert torch.equal(out.cpu().double(), expected.double())


def _head_views(batch: int, heads: int, rows: int, d: int, qp: ActQParams) -> torch.Tensor:
    codes = torch.randint(qp.qmin, qp.qmax + 1, (batch, rows, heads * d), dtype=torch.int32).to(qp.dtype)
    return codes.view(batch, rows, heads, d).transpose(1, 2)  # (N, L, E) -> (N, H, L, D)


@pytest.mark.parametrize("row_loop", [True, False], ids=["program_per_head", "program_per_row_block"])
# query rows: blocks of 64 with the last one partly padded (197, 130, 104, 10) or full (256)
@pytest.mark.parametrize("shape", [(2, 3, 197, 64), (1, 2, 130, 32), (2, 1, 256, 128), (1, 2, 104, 64),
                                   (2, 2, 10, 16)], ids=str)
def test_attention_program_layouts_match_reference(monkeypatch, row_loop, shape):
    torch.manual_seed(0)
    batch, heads, rows, d = shape
    qps = [activation_qparams(signed, scale=s) for signed, s in ((False, 0.05), (True, 0.04), (False, 0.03))]
    q, k, v = (_head_views(batch, heads, rows, d, qp) for qp in qps)
    k_t = k.transpose(-2, -1)
    scores = fitted_qparams(REF.matmul(q, qps[0], k_t, qps[1]), True)
    grids = AttentionGrids(qps[0], qps[1], scores, dataclasses.replace(scores, scale=scores.scale / 8),
                           ActQParams(1 / 255, 0, 0, 255), qps[2])
    out_qp = fitted_qparams(REF.attention(q, k_t, v, grids), False)
    monkeypatch.setattr(tk, "_ROW_LOOP_PROGRAMS_PER_SM", 0 if row_loop else 10**9)
    got = tk.attention(q.to(DEVICE), k_t.to(DEVICE), v.to(DEVICE), grids, out_qp)
    assert_quantized_agree(got.cpu(), REF.attention(q, k_t, v, grids, out_qp))
