"""Time the cuda int8 backend against bf16 torch on one GPU; prints a markdown table.

    python scripts/bench_kernels_gpu.py [--iters 50] [--batch 32]

Rows: int8 Linear 4096x4096 at 4096 tokens (uint8 in, requantized uint8 out) against bf16 ``F.linear``;
a few ResNet-50 convolutions (channels_last) against bf16 ``F.conv2d``; one attention-sized batched
matmul against bf16 ``torch.matmul``. Times are medians over CUDA-event-timed iterations, in ms; the
last column checks each int8 output (1024 rows of the Linear) against the reference backend.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qat.kernels import get_backend  # noqa: E402
from qat.kernels.reference import ReferenceBackend  # noqa: E402
from qat.kernels.types import ActQParams, ConvGeometry, Int8Weight  # noqa: E402

REFERENCE = ReferenceBackend()
X_QP = ActQParams(scale=0.02, zero_point=128, qmin=0, qmax=255)
OUT_QP = ActQParams(scale=0.5, zero_point=128, qmin=0, qmax=255)

# (name, in channels, height = width, out channels, kernel, stride, padding)
RESNET50_CONVS = [
    ("conv1 7x7/2 3->64 @224", 3, 224, 64, 7, 2, 3),
    ("layer1 1x1 256->64 @56", 256, 56, 64, 1, 1, 0),
    ("layer1 3x3 64->64 @56", 64, 56, 64, 3, 1, 1),
    ("layer2 3x3 128->128 @28", 128, 28, 128, 3, 1, 1),
    ("layer3 1x1 1024->256 @14", 1024, 14, 256, 1, 1, 0),
    ("layer3 3x3 256->256 @14", 256, 14, 256, 3, 1, 1),
    ("layer4 3x3 512->512 @7", 512, 7, 512, 3, 1, 1),
]


def median_ms(fn, iters: int, warmup: int = 10) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def max_lsb_diff(got: torch.Tensor, expected: torch.Tensor) -> int:
    return int((got.int() - expected.int()).abs().max())


def random_u8(shape, channels_last: bool = False) -> torch.Tensor:
    x = torch.randint(0, 256, shape, dtype=torch.uint8, device="cuda")
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def random_weight(shape) -> Int8Weight:
    q = torch.randint(-127, 128, shape, dtype=torch.int8, device="cuda")
    return Int8Weight(q=q, scale=torch.rand(shape[0], device="cuda") * 0.01 + 1e-3)


def bench_linear(backend, iters: int) -> list[tuple[str, float, float, str]]:
    m = k = n = 4096
    x = random_u8((m, k))
    packed = backend.pack_linear(random_weight((n, k)), torch.randn(n, device="cuda"))
    xb = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    int8 = median_ms(lambda: backend.linear(x, X_QP, packed, OUT_QP), iters)
    bf16 = median_ms(lambda: F.linear(xb, wb, bias), iters)
    rows = x[:1024]  # check a slice against the exact reference (same kernel configuration)
    diff = max_lsb_diff(backend.linear(rows, X_QP, packed, OUT_QP), REFERENCE.linear(rows, X_QP, packed, OUT_QP))
    xs, ws = x.view(torch.int8), packed.native.w  # ws: [N, K] int8, K-major
    int_mm = median_ms(lambda: torch._int_mm(xs, ws.t()), iters)
    return [(f"linear {m}x{k} @ {k}x{n}, requantized", int8, bf16, str(diff)),
            ("  for comparison: cuBLASLt int32 GEMM alone (torch._int_mm)", int_mm, bf16, "")]


def bench_conv(backend, case, batch: int, iters: int) -> tuple[str, float, float, str]:
    name, c, hw, out, kernel, stride, padding = case
    x = random_u8((batch, c, hw, hw), channels_last=True)
    geometry = ConvGeometry(stride=stride, padding=padding)
    packed = backend.pack_conv2d(random_weight((out, c, kernel, kernel)), torch.randn(out, device="cuda"), geometry)
    xb = torch.randn(batch, c, hw, hw, device="cuda", dtype=torch.bfloat16)
    wb = torch.randn(out, c, kernel, kernel, device="cuda", dtype=torch.bfloat16)
    xb, wb = (t.contiguous(memory_format=torch.channels_last) for t in (xb, wb))
    int8 = median_ms(lambda: backend.conv2d(x, X_QP, packed, OUT_QP, relu=True), iters)
    bf16 = median_ms(lambda: F.relu(F.conv2d(xb, wb, None, stride, padding)), iters)
    diff = max_lsb_diff(backend.conv2d(x, X_QP, packed, OUT_QP, relu=True),
                        REFERENCE.conv2d(x, X_QP, packed, OUT_QP, relu=True))
    return f"{name} (N={batch})", int8, bf16, str(diff)


def bench_bmm(backend, iters: int) -> tuple[str, float, float, str]:
    shape_a, shape_b = (96, 197, 64), (96, 64, 197)
    a, b = random_u8(shape_a), random_u8(shape_b)
    ab, bb = (torch.randn(s, device="cuda", dtype=torch.bfloat16) for s in (shape_a, shape_b))
    int8 = median_ms(lambda: backend.matmul(a, X_QP, b, X_QP, OUT_QP), iters)
    bf16 = median_ms(lambda: torch.matmul(ab, bb), iters)
    diff = max_lsb_diff(backend.matmul(a, X_QP, b, X_QP, OUT_QP), REFERENCE.matmul(a, X_QP, b, X_QP, OUT_QP))
    return "bmm 96x(197x64 @ 64x197)", int8, bf16, str(diff)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--batch", type=int, default=32, help="batch of the conv rows")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    torch.manual_seed(0)
    backend = get_backend("cuda")
    rows = bench_linear(backend, args.iters)
    rows += [bench_conv(backend, case, args.batch, args.iters) for case in RESNET50_CONVS]
    rows.append(bench_bmm(backend, args.iters))
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, median of {args.iters} iterations\n")
    print("| op | int8 (ms) | bf16 (ms) | bf16 / int8 | max diff vs reference (LSB) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, int8, bf16, diff in rows:
        print(f"| {name} | {int8:.3f} | {bf16:.3f} | {bf16 / int8:.2f}x | {diff} |")


if __name__ == "__main__":
    main()
