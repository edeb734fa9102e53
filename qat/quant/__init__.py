"""Numerics layer: specs, qparams, fake-quant with STE, observers, learnable quantizers. Pure torch."""
from qat.quant.affine import dequantize, dynamic_fake_quantize, fake_quantize, qparams_from_minmax, quantize
from qat.quant.fake_quantize import FakeQuantize, LearnableFakeQuantize, QuantizerBase
from qat.quant.observers import MinMaxObserver, MovingAverageMinMaxObserver, Observer
from qat.quant.spec import Granularity, QuantSpec

__all__ = [
    "FakeQuantize",
    "Granularity",
    "LearnableFakeQuantize",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "Observer",
    "QuantSpec",
    "QuantizerBase",
    "dequantize",
    "dynamic_fake_quantize",
    "fake_quantize",
    "qparams_from_minmax",
    "quantize",
]
