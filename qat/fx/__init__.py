"""Graph pass: trace, plan, rewrite; QAT modules."""
from qat.fx.api import calibrate, check_finite, coverage, enable_fake_quant, enable_observer, explain, freeze_bn_stats, prepare
from qat.fx.config import LayerOverride, QuantConfig
from qat.fx.tracer import UntraceableModelError

__all__ = [
    "LayerOverride",
    "QuantConfig",
    "UntraceableModelError",
    "calibrate",
    "check_finite",
    "coverage",
    "enable_fake_quant",
    "enable_observer",
    "explain",
    "freeze_bn_stats",
    "prepare",
]
