"""qat: quantization-aware training and post-training quantization that lowers to real int8 kernels.

>>> import qat, torch
>>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(288, 4))
>>> x = torch.randn(2, 3, 8, 8)
>>> prepared = qat.prepare(model.eval(), qat.QuantConfig.preset("w8a8"), example_inputs=(x,))
>>> qat.calibrate(prepared, [x])
>>> int8 = qat.convert(prepared, backend="reference")
>>> bool((int8(x).argmax(1) == prepared(x).argmax(1)).all())
True
"""
__version__ = "0.1.0"

from qat.quant import FakeQuantize, Granularity, LearnableFakeQuantize, QuantSpec  # noqa: E402
from qat.quant.config import QuantizerConfig  # noqa: E402
from qat.fx import (  # noqa: E402
    LayerOverride, QuantConfig, UntraceableModelError, calibrate, coverage, enable_fake_quant, enable_observer,
    explain, freeze_bn_stats, prepare,
)
from qat.int8 import compare, convert  # noqa: E402
from qat.artifact import export, export_onnx, load  # noqa: E402

__all__ = [
    "FakeQuantize", "Granularity", "LayerOverride", "LearnableFakeQuantize", "QuantConfig", "QuantSpec",
    "QuantizerConfig", "UntraceableModelError", "__version__", "calibrate", "compare", "convert", "coverage",
    "enable_fake_quant", "enable_observer", "explain", "export", "export_onnx", "freeze_bn_stats", "load", "prepare",
]
