"""CPU int8 latency: our fbgemm int8 vs float32 eager vs torch.ao's int8 (x86), torchvision resnet18 at 224 px.

    python scripts/bench_cpu_int8.py [--threads 2] [--batches 1 32] [--repeats 30] [--profile]

All three models are built from one float resnet18 in one process: ours by qat.prepare (w8a8) -> calibrate
-> qat.convert(backend="fbgemm"); torch.ao's by prepare_qat_fx with get_default_qat_qconfig_mapping("x86")
-> the same calibration batches -> convert_fx. (This script, not the library, imports torch.ao: it is the
baseline.) Each repeat times every model once, in turn (interleaved, so background load hits all alike);
the table gives medians in ms. --profile adds torch.profiler tables of both int8 models per batch size.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qat.int8 import convert  # noqa: E402
from qat.fx import QuantConfig, calibrate, prepare  # noqa: E402

IMAGE = (3, 224, 224)


def calibration_batches(count: int = 4, batch_size: int = 8) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(batch_size, *IMAGE, generator=generator) for _ in range(count)]


def ours_int8(model: torch.nn.Module, batches: list[torch.Tensor]) -> tuple[torch.nn.Module, torch.nn.Module]:
    prepared = prepare(model, QuantConfig.preset("w8a8"), (batches[0],))
    calibrate(prepared, batches)
    return prepared.eval(), convert(prepared, backend="fbgemm")


def torch_ao_int8(model: torch.nn.Module, batches: list[torch.Tensor]) -> torch.nn.Module:
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_qat_fx

    torch.backends.quantized.engine = "x86"
    prepared = prepare_qat_fx(copy.deepcopy(model).train(), get_default_qat_qconfig_mapping("x86"), (batches[0],))
    prepared.eval()  # observers and fake-quant stay on; BatchNorm uses its running statistics
    with torch.no_grad():
        for x in batches:
            prepared(x)
    return convert_fx(prepared)


def time_once(model: torch.nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    model(x)
    return (time.perf_counter() - start) * 1e3


def interleaved_medians(models: dict[str, torch.nn.Module], x: torch.Tensor, repeats: int, warmup: int = 3) -> dict:
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(warmup):
        for model in models.values():
            model(x)
    for _ in range(repeats):
        for name, model in models.items():
            times[name].append(time_once(model, x))
    return {name: statistics.median(t) for name, t in times.items()}


def profile(model: torch.nn.Module, x: torch.Tensor, rows: int = 18) -> str:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for _ in range(3):
        model(x)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            model(x)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=30, help="timed forwards per model (bs >= 8: a third)")
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler tables of both int8 models")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # torch.ao / quantized-tensor deprecation notices
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    batches = calibration_batches()
    prepared, ours = ours_int8(model, batches)
    models = {"fp32": model, "torch.ao": torch_ao_int8(model, batches), "ours": ours}
    print(f"resnet18 {IMAGE[1]}px, {args.threads} threads, torch {torch.__version__}, "
          f"engine {torch.backends.quantized.engine}, load average {os.getloadavg()[0]:.1f}")
    rows = []
    with torch.inference_mode():
        for batch in args.batches:
            x = torch.randn(batch, *IMAGE)
            agree = (ours(x).argmax(1) == prepared(x).argmax(1)).float().mean().item()
            repeats = args.repeats if batch < 8 else max(5, args.repeats // 3)
            rows.append((batch, repeats, agree, interleaved_medians(models, x, repeats)))
            if args.profile:
                for name in ("ours", "torch.ao"):
                    print(f"\nprofile of {name}, batch {batch}\n{profile(models[name], x)}")
    print("\n| batch | fp32 (ms) | torch.ao int8 (ms) | ours int8 (ms) | ours / torch.ao | fp32 / ours | fp32 / torch.ao |"
          " ours vs fake-quant top-1 |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for batch, repeats, agree, t in rows:
        print(f"| {batch} | {t['fp32']:.1f} | {t['torch.ao']:.1f} | {t['ours']:.1f} | {t['ours'] / t['torch.ao']:.2f}x "
              f"| {t['fp32'] / t['ours']:.2f}x | {t['fp32'] / t['torch.ao']:.2f}x | {100 * agree:.0f}% |")
    print(f"\nmedians of {', '.join(str(r[1]) for r in rows)} interleaved repeats; goal: ours / torch.ao <= 0.90x")


if __name__ == "__main__":
    main()
