"""Convert: lower a prepared fake-quant model to int8 modules backed by a kernel backend.

>>> import torch, torchvision
>>> from qat.fx import QuantConfig, calibrate, prepare
>>> model = torchvision.models.resnet18(num_classes=10).eval()
>>> x = torch.randn(2, 3, 64, 64)
>>> prepared = prepare(model, QuantConfig.preset("w8a8"), (x,)); calibrate(prepared, [x])
>>> int8 = convert(prepared, backend="reference")
>>> bool((int8(x).argmax(1) == prepared(x).argmax(1)).all())
True
"""
from __future__ import annotations

from torch import fx

from qat.int8.compare import LayerAgreement, compare, layer_agreement
from qat.int8.cuda_graph import capture_cuda_graph
from qat.int8.lower import ConversionError, lower
from qat.kernels import BACKENDS, default_backend


def convert(prepared: fx.GraphModule, backend: str | None = None) -> fx.GraphModule:
    """An int8 copy of `prepared` (left unchanged). backend: 'reference', 'fbgemm', 'cuda' or None (by the
    model's device: cuda on GPU, else fbgemm). The int8 model runs on the device of the prepared model."""
    if not hasattr(prepared, "qat_plan"):
        raise ValueError("convert() needs a model produced by qat.prepare (it has no quantization plan)")
    if backend is None:
        tensor = next(prepared.parameters(), None)
        backend = default_backend(tensor.device if tensor is not None else "cpu")
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; available: {', '.join(sorted(BACKENDS))}")
    return lower(prepared, backend)


__all__ = ["ConversionError", "LayerAgreement", "capture_cuda_graph", "compare", "convert", "layer_agreement"]
