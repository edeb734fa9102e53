"""GPU int8 throughput: our cuda-backend int8 vs bf16 eager on ResNet-50 (batch 256 and 1) and ViT-B/16 (batch 256).

    python scripts/bench_gpu_int8.py [--iters 20] [--warmup 5]
    python scripts/bench_gpu_int8.py --smoke                      # CPU, tiny shapes, reference backend
    TRITON_INTERPRET=1 python scripts/bench_gpu_int8.py --smoke --backend cuda --only linear  # CPU, Triton kernels
    (the ResNet-50 / ViT rows under the interpreter take over 15 minutes)

Rows (one markdown table):
* ResNet-50 224 px at batch 256 and batch 1, ViT-B/16 224 px at batch 256, each also with both models captured
  in a CUDA graph by qat.int8.capture_cuda_graph (the GPU's work without host launch overhead; at batch 1 the
  latency):
  qat.prepare (w8a8) -> calibrate
  on random images -> qat.convert(backend="cuda"), float32 input in channels_last, against the float model
  cast to bf16 (channels_last, cudnn.benchmark on). ms per batch, img/s and the int8 / bf16 speed ratio; the
  last column is the top-1 agreement of int8 with the fake-quant model on the timed batch.
* int8 Linear 4096x4096 at batch 4096 through the cuda kernel backend (uint8 in, requantized uint8 out)
  against bf16 F.linear; effective TOPS = 2*M*N*K / time. The last column is the max difference from the
  reference backend on 1024 rows, in LSB.

Times: CUDA events around each iteration, median over --iters iterations after --warmup untimed ones (the
first int8 call of each shape autotunes the Triton kernels: it happens in the warm-up), under
torch.inference_mode.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qat.fx import QuantConfig, calibrate, prepare
from qat.int8 import capture_cuda_graph, convert
from qat.kernels import get_backend
from qat.kernels.types import ActQParams, Int8Weight

X_QP = ActQParams(scale=0.02, zero_point=128, qmin=0, qmax=255)
OUT_QP = ActQParams(scale=0.5, zero_point=128, qmin=0, qmax=255)


@dataclass(frozen=True)
class Setup:
    """Where and how big: the real run (cuda) or the CPU smoke run of the script's logic."""

    device: torch.device
    backend: str
    batches: tuple[int, ...]  # ResNet-50 batch sizes; ViT-B/16 runs at the first
    image: int
    linear: int  # M = N = K of the Linear row


@dataclass(frozen=True)
class Workload:
    name: str
    build: Callable[[int], torch.nn.Module]  # image size -> float model
    batches: Callable[[Setup], tuple[int, ...]]


WORKLOADS = (
    Workload("ResNet-50", lambda image: torchvision.models.resnet50(weights=None), lambda s: s.batches),
    Workload("ViT-B/16", lambda image: torchvision.models.vit_b_16(weights=None, image_size=image),
             lambda s: s.batches[:1]),
)


def median_ms(fn: Callable[[], object], device: torch.device, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def model_rows(work: Workload, s: Setup, iters: int, warmup: int) -> list[tuple[str, ...]]:
    """One row per batch size: int8 (cuda backend) against bf16 eager, both channels_last."""
    model = work.build(s.image).eval().to(s.device)
    calibration = [torch.randn(8, 3, s.image, s.image, device=s.device) for _ in range(2)]
    prepared = prepare(model, QuantConfig.preset("w8a8"), (calibration[0],))
    calibrate(prepared, calibration)
    int8 = convert(prepared.eval(), backend=s.backend)
    bf16 = copy.deepcopy(model).to(dtype=torch.bfloat16, memory_format=torch.channels_last)
    rows = []
    for batch in work.batches(s):
        x = torch.randn(batch, 3, s.image, s.image, device=s.device).contiguous(memory_format=torch.channels_last)
        xb = x.to(torch.bfloat16)
        with torch.inference_mode():
            agree = (int8(x).argmax(1) == prepared(x).argmax(1)).float().mean().item()
            t_int8 = median_ms(lambda: int8(x), s.device, iters, warmup)
            t_bf16 = median_ms(lambda: bf16(xb), s.device, iters, warmup)
        rows.append((f"{work.name} {s.image}px, channels_last", str(batch), f"{t_int8:.2f} ms ({batch / t_int8 * 1e3:.0f} img/s)",
                     f"{t_bf16:.2f} ms ({batch / t_bf16 * 1e3:.0f} img/s)", f"{t_bf16 / t_int8:.2f}x",
                     f"top-1 vs fake-quant {100 * agree:.1f}%"))
        if s.device.type == "cuda":  # both captured in a CUDA graph: the GPU's work, no host launch overhead
            graphed_int8, graphed_bf16 = capture_cuda_graph(int8, x), capture_cuda_graph(bf16, xb)
            with torch.inference_mode():
                same = torch.equal(graphed_int8(x), int8(x))
                t_int8 = median_ms(lambda: graphed_int8(x), s.device, iters, warmup)
                t_bf16 = median_ms(lambda: graphed_bf16(xb), s.device, iters, warmup)
            rows.append((f"{work.name} {s.image}px, CUDA graph (both)", str(batch), f"{t_int8:.2f} ms",
                         f"{t_bf16:.2f} ms", f"{t_bf16 / t_int8:.2f}x", f"replay = eager int8: {same}"))
    return rows


def random_int8_weight(n: int, k: int, device: torch.device) -> Int8Weight:
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device)
    return Int8Weight(q=q, scale=torch.rand(n, device=device) * 0.01 + 1e-3)


def linear_row(s: Setup, iters: int, warmup: int) -> tuple[str, ...]:
    m = n = k = s.linear
    backend, reference = get_backend(s.backend), get_backend("reference")
    packed = backend.pack_linear(random_int8_weight(n, k, s.device), torch.randn(n, device=s.device))
    x = torch.randint(0, 256, (m, k), dtype=torch.uint8, device=s.device)
    xb = torch.randn(m, k, device=s.device, dtype=torch.bfloat16)
    wb = torch.randn(n, k, device=s.device, dtype=torch.bfloat16)
    bias = torch.randn(n, device=s.device, dtype=torch.bfloat16)
    with torch.inference_mode():
        t_int8 = median_ms(lambda: backend.linear(x, X_QP, packed, OUT_QP), s.device, iters, warmup)
        t_bf16 = median_ms(lambda: F.linear(xb, wb, bias), s.device, iters, warmup)
        rows = x[:1024]
        got = backend.from_backend(backend.linear(backend.to_backend(rows, X_QP), X_QP, packed, OUT_QP), OUT_QP)
        want = reference.linear(rows, X_QP, reference.pack_linear(packed.weight, packed.bias), OUT_QP)
        diff = (got.int() - want.int()).abs().max().item()
    ops = 2 * m * n * k / 1e9  # per ms -> tera-ops per second
    return (f"Linear {n}x{k} (uint8 in/out)", str(m), f"{t_int8:.3f} ms ({ops / t_int8:.0f} TOPS)",
            f"{t_bf16:.3f} ms ({ops / t_bf16:.0f} TFLOPS)", f"{t_bf16 / t_int8:.2f}x", f"max diff vs reference {diff} LSB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="run the script's logic on CPU with tiny shapes")
    parser.add_argument("--backend", default=None, help="kernel backend (default: cuda; reference with --smoke)")
    parser.add_argument("--only", choices=["resnet50", "vit", "linear"], nargs="*", help="a subset of the rows")
    args = parser.parse_args()
    if args.smoke:
        setup = Setup(torch.device("cpu"), args.backend or "reference", (2, 1), 32, 64)
        args.iters, args.warmup = 2, 1
    elif torch.cuda.is_available():
        setup = Setup(torch.device("cuda"), args.backend or "cuda", (256, 1), 224, 4096)
        torch.backends.cudnn.benchmark = True
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    else:
        sys.exit("needs a CUDA device (or --smoke to check the script on CPU)")
    torch.manual_seed(0)
    only = set(args.only or ["resnet50", "vit", "linear"])
    rows = []
    for key, work in zip(("resnet50", "vit"), WORKLOADS):
        if key in only:
            rows += model_rows(work, setup, args.iters, args.warmup)
    if "linear" in only:
        rows.append(linear_row(setup, args.iters, args.warmup))
    print(f"\nmedian of {args.iters} iterations after {args.warmup} warm-up iterations (autotuning included there)\n")
    print("| workload | batch | ours int8 | bf16 eager | int8 speed / bf16 | check |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
