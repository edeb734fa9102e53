"""Side-by-side evaluation of model variants (float, fake-quant, int8): accuracy, size and latency.

Plain torch loops (no Trainer), so every variant, whatever its kernels, is measured the same way.

    >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    >>> batches = [(torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 0]))]
    >>> result = measure("float", net, batches, torch.device("cpu"), latency_iters=2)
    >>> result.name, result.num_images, result.size_bytes > 0
    ('float', 4, True)
"""
from __future__ import annotations

import io
import itertools
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qat.train.module import observers_paused


@dataclass(frozen=True)
class VariantResult:
    """One variant's test accuracy (%), serialized size and median latency of one forward pass."""

    name: str
    top1: float
    top5: float
    num_images: int
    size_bytes: int
    latency_ms: float
    latency_batch_size: int
    device: str

    @property
    def size_mb(self) -> float:
        return self.size_bytes / 2**20


def state_dict_bytes(model: nn.Module) -> int:
    """Size of the model's state_dict as torch.save writes it."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


@torch.no_grad()
def accuracy(
    model: nn.Module, batches: Iterable, device: torch.device, limit: int | None = None
) -> tuple[float, float, int]:
    """(top-1 %, top-5 %, images) over `batches` of (inputs, labels), at most `limit` batches."""
    correct1 = correct5 = seen = 0
    for x, y in itertools.islice(batches, limit):
        logits = model(x.to(device)).float().cpu()
        k = min(5, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices  # [B, k]
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(dim=-1).sum().item()
        seen += len(y)
    if seen == 0:
        raise ValueError("no test batches to evaluate")
    return 100.0 * correct1 / seen, 100.0 * correct5 / seen, seen


@torch.no_grad()
def latency_ms(
    model: nn.Module, example: torch.Tensor, device: torch.device, iters: int = 20, warmup: int = 3
) -> float:
    """Median wall time (ms) of one forward pass on `example` after `warmup` passes."""
    example = example.to(device)
    times = []
    for i in range(warmup + iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        model(example)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure(
    name: str,
    model: nn.Module,
    batches: Iterable,
    device: torch.device,
    limit: int | None = None,
    latency_batch_size: int = 32,
    latency_iters: int = 20,
    size_from: Path | None = None,
) -> VariantResult:
    """Evaluate `model` (already on `device`) in eval mode with observers paused; the size is that of
    `size_from` when it is a file (an exported artifact), else of the state_dict."""
    model = model.eval()
    batches = iter(batches)
    first = next(batches)
    with observers_paused(model):
        top1, top5, seen = accuracy(model, itertools.chain([first], batches), device, limit)
        example = _batch_of(first[0], latency_batch_size)
        latency = latency_ms(model, example, device, latency_iters)
    size = size_from.stat().st_size if size_from is not None and size_from.is_file() else state_dict_bytes(model)
    return VariantResult(name, top1, top5, seen, size, latency, latency_batch_size, str(device))


def _batch_of(inputs: torch.Tensor, batch_size: int) -> torch.Tensor:
    """`batch_size` inputs, repeating the given ones when there are fewer: [batch_size, ...]."""
    repeats = -(-batch_size // len(inputs))
    return inputs.repeat(repeats, *[1] * (inputs.dim() - 1))[:batch_size]

