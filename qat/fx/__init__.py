"""Graph pass: trace, plan, rewrite; QAT modules."""
from qat.fx.api import calibrate, coverage, enable_fake_quant, enable_observer, explain, freeze_bn_stats, prepare
from qat.fx.config import LayerOverride, QuantConfig
from qat.fx.tracer import UntraceableModelError

__all__ = [
    "LayerOverride",
    "QuantConfig",
    "UntraceableModelError",
    "calibrate",
    "coverage",
    "enable_fake_quant",
    "enable_observer",
    "explain",
    "freeze_bn_stats",
    "prepare",
]
