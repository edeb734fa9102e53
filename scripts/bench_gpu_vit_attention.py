"""ViT-B/16 int8 (cuda backend) with the attention core fused and unfused, one process, timed alternately.

    python scripts/bench_gpu_vit_attention.py [--batch 256] [--rounds 15]

Both graphs come from one calibrated fake-quant model through ``qat.int8.lower.lower(..., fuse_attention=...)``;
the last column is the top-1 agreement with the fake-quant model on the timed batch. Needs a CUDA GPU.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qat.fx import QuantConfig, calibrate, prepare
from qat.int8.lower import lower


def elapsed_ms(fn, x: torch.Tensor) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn(x)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(weights=None).eval().cuda()
    calibration = [torch.randn(8, 3, 224, 224, device="cuda") for _ in range(2)]
    prepared = prepare(model, QuantConfig.preset("w8a8"), (calibration[0],))
    calibrate(prepared, calibration)
    prepared.eval()
    graphs = {"attention fused": lower(prepared, "cuda", fuse_attention=True),
              "attention unfused": lower(prepared, "cuda", fuse_attention=False)}
    x = torch.randn(args.batch, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    times = {name: [] for name in graphs}
    with torch.inference_mode():
        reference = prepared(x).argmax(1)
        agree = {name: (gm(x).argmax(1) == reference).float().mean().item() for name, gm in graphs.items()}
        for gm in graphs.values():
            for _ in range(3):
                elapsed_ms(gm, x)
        for _ in range(args.rounds):
            for name, gm in graphs.items():
                times[name].append(elapsed_ms(gm, x))
    print("| ViT-B/16 int8, batch %d | median | min | top-1 vs fake-quant |" % args.batch)
    print("| --- | ---: | ---: | ---: |")
    for name, t in times.items():
        print(f"| {name} | {statistics.median(t):.2f} ms | {min(t):.2f} ms | {100 * agree[name]:.1f}% |")


if __name__ == "__main__":
    main()
