"""Count the kernels and operator calls of one compiled training step (forward + backward).

    python scripts/count_compiled_kernels.py --model resnet18 --preset w8a8
    python scripts/count_compiled_kernels.py --model resnet50 --preset float
    python scripts/count_compiled_kernels.py --model resnet50 --preset w8a8 --device cuda --image-size 224

In default mode a compiled step launches each kernel from Python, so a QAT step whose GPU work is small pays in
launches (see BENCHMARKS.md, session 13). This script compiles the step with inductor for the CPU, our fake-quant
routed as on a GPU (the Triton operators, run by Triton's interpreter), and counts the calls in the generated
code's ``call`` functions: inductor's fused kernels, extern kernels (convolutions, matmuls) and operators. The
counts approximate the GPU's (inductor's fusion is the same; a GPU splits some large reductions in two).
``--device cuda`` compiles for the GPU instead and counts its Triton launches (``name.run(...)``) by kernel.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import sys
from pathlib import Path

CALL = re.compile(
    r"^[ \t]+(?:\w+ = )?(cpp_fused_\w+|extern_kernels\.\w+|torch\.ops\.[\w.]+|aten\.[\w.]+|\w+\.run)\(", re.M
)
# the wrapper's functions (top level, or methods of its Runner class), each up to the next def or class
RUNNER = re.compile(r"^[ \t]*def (?:call|partition_\d+)\(.*?(?=^[ \t]*def |^class |\Z)", re.M | re.S)
INDUCTOR_KERNEL = re.compile(r"^(cpp_fused_|triton_(poi|red|per|tem)_)")


def kernel_calls(code: str) -> collections.Counter:
    """The calls in a generated module's ``call`` function (and its graph partitions, where inductor made any),
    by kind (inductor's own kernels as one kind)."""
    bodies = [match.group(0) for match in RUNNER.finditer(code)]
    return collections.Counter(
        "inductor kernel" if INDUCTOR_KERNEL.match(c) else re.sub(r"(_\d+)?\.run$", "", c)  # _forward_kernel_3.run
        for body in bodies for c in CALL.findall(body)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18", help="a torchvision model name")
    parser.add_argument("--preset", default="w8a8", help="a QuantConfig preset, or float")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    if args.device == "cpu":  # CPU tensors through the Triton operators: the interpreter, set before triton loads
        os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("QAT_TRITON_AUTOTUNE", "0")
    import torch
    import torch.nn.functional as F
    import torchvision
    from torch._inductor.utils import run_and_get_code

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import qat
    from qat.quant import affine

    if args.device == "cpu":
        affine._kernel_input = lambda x: True  # CPU tensors take the GPU's route (the Triton operators, interpreted)
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)(num_classes=10)
    model = model.to(args.device, memory_format=torch.channels_last).train()
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=args.device)
    x = x.contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 10, (args.batch,), device=args.device)
    if args.preset != "float":
        model = qat.prepare(model, qat.QuantConfig.preset(args.preset), example_inputs=(x[:2],))
        qat.calibrate(model, [x], freeze=args.preset != "w8a8")  # w8a8: observers on, as in early QAT
        model.train()
    compiled = torch.compile(model)

    def step() -> None:
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.device == "cuda"):
            loss = F.cross_entropy(compiled(x), target)
        loss.backward()

    step()  # compile
    _, codes = run_and_get_code(step)
    total = 0
    for name, code in zip(("forward", "backward"), codes):
        calls = kernel_calls(code)
        total += sum(calls.values())
        print(f"{name}: {sum(calls.values())} calls: " + ", ".join(f"{k} {n}" for k, n in calls.most_common()))
    print(f"{args.model} {args.preset}: {total} calls per step")


if __name__ == "__main__":
    main()
