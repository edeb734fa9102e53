"""int8 kernel backends behind one interface (``qat.kernels.types.KernelBackend``).

>>> get_backend("reference").name
'reference'
>>> default_backend("cpu")
'fbgemm'
"""
from __future__ import annotations

from typing import Callable

import torch

from qat.kernels.cuda import CudaBackend
from qat.kernels.fbgemm import FbgemmBackend
from qat.kernels.reference import ReferenceBackend, dequantize_activation, quantize_activation, requantize
from qat.kernels.types import ActQParams, AttentionGrids, ConvGeometry, Int8Weight, KernelBackend, Packed

BACKENDS: dict[str, Callable[[], KernelBackend]] = {
    "reference": ReferenceBackend,
    "fbgemm": FbgemmBackend,
    "cuda": CudaBackend,
}


def get_backend(name: str) -> KernelBackend:
    """A new backend instance by name; ValueError naming the choices for an unknown one."""
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; available: {', '.join(sorted(BACKENDS))}")
    return BACKENDS[name]()


def default_backend(device: torch.device | str) -> str:
    """'cuda' for CUDA devices, else 'fbgemm'."""
    return "cuda" if torch.device(device).type == "cuda" else "fbgemm"


__all__ = [
    "BACKENDS", "ActQParams", "AttentionGrids", "ConvGeometry", "Int8Weight", "KernelBackend", "Packed", "CudaBackend",
    "FbgemmBackend", "ReferenceBackend", "default_backend", "dequantize_activation", "get_backend",
    "quantize_activation", "requantize",
]
