"""Time one QAT training step against float training, side by side in one process; prints a markdown table.

    python scripts/bench_gpu_qat.py --model resnet50 --image-size 224 --batch 128
    python scripts/bench_gpu_qat.py --model resnet18 --image-size 32 --batch 512 --compile
    python scripts/bench_gpu_qat.py --model resnet18 --image-size 32 --batch 512 --compile --compile-mode reduce-overhead
    python scripts/bench_gpu_qat.py --model resnet18 --image-size 32 --batch 512 --profile
    python scripts/bench_gpu_qat.py --model resnet50 --image-size 224 --batch 128 --cuda-graph
    python scripts/bench_gpu_qat.py --device cpu --model resnet18 --batch 16 --threads 2 --iters 10 --warmup 3
    python scripts/bench_gpu_qat.py --device cpu --batch 2 --image-size 32 --iters 2 --warmup 1   # smoke test
    python scripts/bench_gpu_qat.py --device cpu --batch 8 --image-size 32 --iters 2 --warmup 1 --profile
    (the profile's 5 extra steps on one random batch of 2 can diverge: the W8A8 observer then stops the run on
    non-finite weights, naming them; a batch of 8 trains stably)

A step is forward + backward + SGD step (momentum 0.9; ``--fused-sgd``: torch's fused one) on a fixed random
batch, channels_last. Rows: float fp32, float under bf16 autocast, torch.ao ``prepare_qat_fx`` (default x86 QAT
qconfig, fp32), ours W8A8 (observers updating every step, as in early QAT) and ours W4A4 LSQ (ranges learned,
observers off), both under bf16 autocast; with ``--compile`` also float bf16 and ours under ``torch.compile``;
with ``--cuda-graph`` also float bf16 and ours with the whole step captured in one CUDA graph (no host overhead:
the GPU's work). Every variant is built (all stay in memory) and warmed up first; then the variants take
turns, one block of ``--block`` back-to-back steps each (CUDA events around the block; on the CPU one wall-clock
step), until each has taken ``--iters`` steps. A row is the median of its blocks' ms per step, so a slow spell of
the host slows every variant alike; the ratio is against float bf16 (eager).
``--profile`` prints torch.profiler's tables of each variant but torch.ao's; ``--reference`` runs ours on the
pure-torch fake-quant path instead of the fused Triton kernels.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import qat  # noqa: E402
from qat.quant.affine import fused_kernels  # noqa: E402


@dataclass(frozen=True)
class Setup:
    """What every variant shares: the batch, the device and the model recipe."""

    model: str
    num_classes: int
    x: torch.Tensor
    target: torch.Tensor
    fused_sgd: bool = False  # torch's single-kernel SGD (fused=True) in every variant, else its foreach default

    @property
    def device(self) -> torch.device:
        return self.x.device

    def float_model(self) -> nn.Module:
        torch.manual_seed(0)
        model = getattr(torchvision.models, self.model)(num_classes=self.num_classes)
        return model.to(self.device, memory_format=torch.channels_last).train()


@dataclass(frozen=True)
class Variant:
    """One row: how to build the model, and whether the step runs under bf16 autocast / torch.compile."""

    name: str
    build: Callable[[Setup], nn.Module]
    autocast: bool
    compiled: bool = False
    graphed: bool = False  # the whole step (forward, backward, SGD) captured once in a CUDA graph and replayed


def build_float(setup: Setup) -> nn.Module:
    return setup.float_model()


def build_torch_ao(setup: Setup) -> nn.Module:
    warnings.filterwarnings("ignore", module="torch.ao")  # deprecation notices: torch.ao is the baseline here
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    return prepare_qat_fx(setup.float_model(), get_default_qat_qconfig_mapping("x86"), (setup.x[:2],))


def build_ours(preset: str, observers_on: bool) -> Callable[[Setup], nn.Module]:
    def build(setup: Setup) -> nn.Module:
        model = qat.prepare(setup.float_model(), qat.QuantConfig.preset(preset), example_inputs=(setup.x[:2],))
        qat.calibrate(model, [setup.x[:32]], freeze=not observers_on)  # ranges from one batch, then train
        return model.train()

    return build


def variants_for(precision: str, compiled: bool, graphed: bool = False) -> list[Variant]:
    """The rows: float fp32 (and bf16), torch.ao, ours W8A8 / W4A4 LSQ at `precision`; compiled ones too."""
    low = precision == "bf16"
    rows = [Variant("float fp32", build_float, autocast=False)]
    rows += [Variant("float bf16", build_float, autocast=True)] if low else []
    rows += [
        Variant("torch.ao QAT fp32 (x86 qconfig)", build_torch_ao, autocast=False),
        Variant(f"ours W8A8 {precision}", build_ours("w8a8", observers_on=True), autocast=low),
        Variant(f"ours W4A4 LSQ {precision}", build_ours("w4a4_lsq", observers_on=False), autocast=low),
    ]
    if compiled:
        rows += [
            Variant(f"float {precision} compiled", build_float, autocast=low, compiled=True),
            Variant(f"ours W8A8 {precision} compiled", build_ours("w8a8", observers_on=True), autocast=low,
                    compiled=True),
            Variant(f"ours W4A4 LSQ {precision} compiled", build_ours("w4a4_lsq", observers_on=False), autocast=low,
                    compiled=True),
        ]
    if graphed:
        rows += [
            Variant(f"float {precision} CUDA graph", build_float, autocast=low, graphed=True),
            Variant(f"ours W8A8 {precision} CUDA graph", build_ours("w8a8", observers_on=True), autocast=low,
                    graphed=True),
            Variant(f"ours W4A4 LSQ {precision} CUDA graph", build_ours("w4a4_lsq", observers_on=False),
                    autocast=low, graphed=True),
        ]
    return rows


def make_optimizer(model: nn.Module, setup: Setup) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, fused=setup.fused_sgd or None)


@dataclass(frozen=True)
class GraphedStep:
    """A step captured in a CUDA graph; a call replays it. It holds the model and the optimizer: the graph reads
    and writes their tensors at fixed addresses, which must outlive it (freed, the next variant's build reuses
    them and the replay corrupts that variant or faults)."""

    graph: torch.cuda.CUDAGraph
    model: nn.Module
    optimizer: torch.optim.Optimizer

    def __call__(self) -> None:
        self.graph.replay()


def make_graphed_step(model: nn.Module, setup: Setup, autocast: bool) -> GraphedStep:
    """The step captured in a CUDA graph (warm-up on a side stream, autocast's cast cache off, gradients
    allocated inside the graph), as in PyTorch's whole-network capture recipe; a call replays it. Possible
    because a QAT step never synchronises with the host and its Python-side switches stay fixed."""
    optimizer = make_optimizer(model, setup)

    def body() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast, cache_enabled=False):
            loss = F.cross_entropy(model(setup.x), setup.target)
        loss.backward()
        optimizer.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            optimizer.zero_grad(set_to_none=True)
            body()
    torch.cuda.current_stream().wait_stream(side)
    optimizer.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return GraphedStep(graph, model, optimizer)


def make_step(model: nn.Module, setup: Setup, autocast: bool) -> Callable[[], None]:
    optimizer = make_optimizer(model, setup)
    device_type = setup.device.type

    def step() -> None:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(model(setup.x), setup.target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def time_block_ms(step: Callable[[], None], device: torch.device, steps: int) -> float:
    """Mean ms per step over `steps` back-to-back steps. On CUDA the steps are queued as in training (the host
    runs ahead of the device) between two events; on the CPU, wall-clock."""
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(steps):
            step()
        return (time.perf_counter() - start) * 1e3 / steps
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps


def profile(name: str, step: Callable[[], None], device: torch.device, steps: int = 5) -> None:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    if device.type == "cuda":
        print(f"\n### {name}: top kernels (GPU time) over {steps} steps\n")
        print(kernel_table(prof.events(), torch.autograd.DeviceType.CUDA, steps))
    print(f"\n### {name}: top host-side ops (CPU time) over {steps} steps\n")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=70))


def kernel_table(events, device_type, steps: int, rows: int = 25) -> str:
    """Time per step of the `device_type` events (the GPU's kernels; not the annotations that span them, such as
    the optimizer step's), summed by name, with their total. Built from the events themselves: `key_averages` merges
    a kernel traced by torch.compile with its launch's record of the same name and so counts it twice."""
    time_us, calls = collections.Counter(), collections.Counter()
    for event in events:
        if event.device_type == device_type and not event.is_user_annotation:
            time_us[event.name] += event.time_range.elapsed_us()
            calls[event.name] += 1
    lines = [f"{us / 1e3 / steps:9.3f} ms/step {calls[name] / steps:7.1f} calls/step  {name[:100]}"
             for name, us in time_us.most_common(rows)]
    total_ms, total_calls = sum(time_us.values()) / 1e3 / steps, sum(calls.values()) / steps
    return "\n".join(lines + [f"{total_ms:9.3f} ms/step {total_calls:7.1f} calls/step  (all kernels)"])


def run(variants: list[Variant], setup: Setup, args: argparse.Namespace) -> list[tuple[str, float]]:
    """Build and warm up every variant, then time them in turn: rounds of one block of steps per variant, so a
    slow spell of a shared host (or a GPU clock change) slows every variant alike. A row is the median over
    its blocks of the mean ms per step (blocks of `--block` steps on CUDA, single steps on the CPU)."""
    block = args.block if setup.device.type == "cuda" else 1
    steps = {}
    for variant in variants:
        started = time.perf_counter()
        model = variant.build(setup)
        model = torch.compile(model, mode=args.compile_mode) if variant.compiled else model
        steps[variant.name] = (make_graphed_step if variant.graphed else make_step)(model, setup, variant.autocast)
        for _ in range(args.warmup):
            steps[variant.name]()
        # progress on stderr (unbuffered): a run cut short by a time limit still shows how far it got
        print(f"{variant.name}: built and warmed up in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(max(1, args.iters // block)):
        for name, step in steps.items():
            times[name].append(time_block_ms(step, setup.device, block))
    rows = [(name, statistics.median(t)) for name, t in times.items()]
    for name, ms in rows:
        print(f"{name}: {ms:.2f} ms/step (blocks: {' '.join(f'{t:.2f}' for t in times[name])})", file=sys.stderr)
    for variant in variants:
        if args.profile and not variant.name.startswith("torch.ao"):
            profile(variant.name, steps[variant.name], setup.device)
    return rows


def table(rows: list[tuple[str, float]], baseline: str, title: str) -> str:
    base = dict(rows)[baseline]
    lines = [f"**{title}**", "", f"| variant | ms/step | vs {baseline} |", "|---|---:|---:|"]
    lines += [f"| {name} | {ms:.2f} | {ms / base:.2f}x |" for name, ms in rows]
    for kind in ("compiled", "CUDA graph"):
        if f"{baseline} {kind}" in dict(rows):
            kind_base = dict(rows)[f"{baseline} {kind}"]
            lines += ["", f"| {kind} variant | vs {baseline} {kind} |", "|---|---:|"]
            lines += [f"| {name} | {ms / kind_base:.2f}x |" for name, ms in rows if name.endswith(kind)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50", help="a torchvision model name (resnet50, resnet18, ...)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--block", type=int, default=5,
                        help="CUDA: steps per timed block; variants take turns block by block (--iters in all)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--compile", action="store_true", help="also time float bf16 and ours under torch.compile")
    parser.add_argument("--compile-mode", default=None, choices=["default", "reduce-overhead", "max-autotune"],
                        help="torch.compile's mode for every compiled variant (reduce-overhead: CUDA graphs)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="also time float bf16 and ours with the whole step captured in a CUDA graph")
    parser.add_argument("--profile", action="store_true",
                        help="print the top kernels and host-side ops of every variant but torch.ao's")
    parser.add_argument("--reference", action="store_true", help="ours on the pure-torch fake-quant path")
    parser.add_argument("--only", default=None,
                        help="run only variants whose name contains this (several: separated by commas)")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default=None,
                        help="of the float baseline and our QAT steps (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU runs)")
    parser.add_argument("--fused-sgd", action="store_true",
                        help="every variant steps with torch's fused SGD (one kernel) instead of the foreach one")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    precision = args.precision or ("bf16" if args.device.startswith("cuda") else "fp32")

    torch.backends.cudnn.benchmark = True
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    setup = Setup(args.model, args.num_classes, x.contiguous(memory_format=torch.channels_last),
                  torch.randint(0, args.num_classes, (args.batch,), device=device), args.fused_sgd)
    baseline = f"float {precision}"
    variants = variants_for(precision, args.compile, args.cuda_graph and device.type == "cuda")
    if args.only:
        wanted = args.only.split(",")
        variants = [v for v in variants if any(w in v.name for w in wanted) or v.name == baseline]
    with fused_kernels(False) if args.reference else contextlib.nullcontext():
        rows = run(variants, setup, args)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    title = (f"{args.model} {args.image_size}px batch {args.batch}, {name}, torch {torch.__version__}"
             f"{', reference fake-quant path' if args.reference else ''}{', fused SGD' if args.fused_sgd else ''}")
    print("\n" + table(rows, baseline, title))


if __name__ == "__main__":
    main()
