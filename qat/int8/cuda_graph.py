"""Low-latency int8 inference on CUDA: the whole forward captured once in a CUDA graph, then replayed.

At batch 1 an int8 network is bound by the host launching its kernels one by one; a replay launches them
all at once. The batch shape is fixed at capture.

>>> import torch
>>> if torch.cuda.is_available():  # doctest: +SKIP
...     run = capture_cuda_graph(int8_model, torch.randn(1, 3, 224, 224, device="cuda"))
...     logits = run(image)   # same shape and dtype as the example
"""
from __future__ import annotations

from collections.abc import Callable

import torch


def capture_cuda_graph(
    module: torch.nn.Module, example: torch.Tensor, warmup: int = 3
) -> Callable[[torch.Tensor], torch.Tensor]:
    """`module` (inference, on CUDA) captured for inputs shaped and typed like `example`; the returned
    function copies its input into the graph's input buffer, replays, and returns a copy of the output.
    Warm-up calls (Triton compilation and autotuning, cuDNN algorithm choice) run on a side stream first."""
    if not example.is_cuda:
        raise ValueError(f"capture_cuda_graph needs a CUDA example input, got one on {example.device}")
    static_input = example.clone()
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                module(static_input)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_output = module(static_input)

    def run(x: torch.Tensor) -> torch.Tensor:
        if x.shape != static_input.shape or x.dtype != static_input.dtype:
            raise ValueError(
                f"this CUDA graph was captured for inputs of shape {tuple(static_input.shape)} and dtype "
                f"{static_input.dtype}, got {tuple(x.shape)} {x.dtype}; capture another one for that shape"
            )
        static_input.copy_(x)
        graph.replay()
        return static_output.clone()

    return run
