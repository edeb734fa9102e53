"""qat: quantization-aware training and post-training quantization that lowers to real int8 kernels."""
from qat.quant import FakeQuantize, Granularity, LearnableFakeQuantize, QuantSpec

__version__ = "0.1.0"

__all__ = ["FakeQuantize", "Granularity", "LearnableFakeQuantize", "QuantSpec", "__version__"]
