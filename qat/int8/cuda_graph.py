"""Low-latency int8 inference on CUDA: the whole forward captured once in a CUDA graph, then replayed.

At batch 1 an int8 network is bound by the host launching its kernels one by one; a replay launches them
all at once. The batch shape is fixed at capture.

>>> import torch
>>> if torch.cuda.is_available():  # doctest: +SKIP
...     run = capture_cuda_graph(int8_model, torch.randn(1, 3, 224, 224, device="cuda"))
...     logits = run(image)   # same shape and dtype as the example
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CapturedForward:
    """A module's forward captured in a CUDA graph: call it with an input shaped and typed like the example.

    It holds the module: the graph reads the module's weights at their addresses, which must outlive it."""

    module: torch.nn.Module
    graph: torch.cuda.CUDAGraph
    static_input: torch.Tensor
    static_output: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Copies x into the graph's input buffer, replays, and returns a copy of the output."""
        if x.shape != self.static_input.shape or x.dtype != self.static_input.dtype:
            raise ValueError(
                f"this CUDA graph was captured for inputs of shape {tuple(self.static_input.shape)} and dtype "
                f"{self.static_input.dtype}, got {tuple(x.shape)} {x.dtype}; capture another one for that shape"
            )
        self.static_input.copy_(x)
        self.graph.replay()
        return self.static_output.clone()


def capture_cuda_graph(module: torch.nn.Module, example: torch.Tensor, warmup: int = 3) -> CapturedForward:
    """`module` (inference, on CUDA) captured for inputs shaped and typed like `example`.
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
    return CapturedForward(module, graph, static_input, static_output)
