"""QuantConfig: which quantizer every layer gets, validated on construction.

>>> cfg = QuantConfig.preset("w4a4_lsq")
>>> cfg.weight.spec.bits, cfg.activation.range_method, cfg.first_last_8bit
(4, 'lsq_plus', True)
>>> cfg = QuantConfig.preset("w8a8").with_(skip=("fc",), name_overrides=(LayerOverride("layer1.*", weight_bits=4),))
>>> cfg.resolve("layer1.0.conv1", "Conv2d").weight.spec.bits
4
>>> cfg.resolve("fc", "Linear") is None
True
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, replace

from qat.quant.config import QuantizerConfig
from qat.quant.spec import QuantSpec

W8_PER_CHANNEL = QuantSpec(bits=8, signed=True, symmetric=True, granularity="per_channel")
A8_AFFINE = QuantSpec(bits=8, signed=False)
# The model input of the presets with learned activation ranges: observed, not learned. The image is 8-bit data
# already, and a learned range needs the gradient with respect to it, a data-gradient convolution of the first
# layer per step that float training never computes.
OBSERVED_INPUT = QuantizerConfig(A8_AFFINE, "minmax")
UNTRACEABLE_MODES = ("error", "leaf")


def _low_bit(bits: int) -> QuantConfig:
    """LSQ weights and LSQ+ layer inputs at `bits`; first/last layers and the residual stream (add/cat
    values) at 8 bits, as in the low-bit QAT literature, which keeps skip connections at high precision; the
    model input observed (OBSERVED_INPUT)."""
    weight = QuantizerConfig(
        QuantSpec(bits=bits, symmetric=True, narrow_range=True, granularity="per_channel"), "lsq",
        init_observer="mse", bins=256,
    )
    activation = QuantizerConfig(QuantSpec(bits=bits, signed=False), "lsq_plus", init_observer="mse", bins=512)
    residual = activation.with_(spec=activation.spec.with_(bits=8))
    return QuantConfig(weight=weight, activation=activation, first_last_8bit=True, op_activation=residual,
                       input_activation=OBSERVED_INPUT)


@dataclass(frozen=True)
class LayerOverride:
    """Changes for layers whose module path (fnmatch `pattern`) or type name (e.g. 'Linear') matches.

    weight / activation replace the quantizer configs; weight_bits / activation_bits only change bits.
    """

    pattern: str
    weight: QuantizerConfig | None = None
    activation: QuantizerConfig | None = None
    weight_bits: int | None = None
    activation_bits: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ValueError(f"LayerOverride.pattern={self.pattern!r} is invalid; allowed: a non-empty string")
        for name in ("weight_bits", "activation_bits"):
            bits = getattr(self, name)
            if bits is not None:
                QuantSpec(bits=bits)  # raises a ValueError naming bits and the allowed range

    def apply(self, layer: "LayerQuant") -> "LayerQuant":
        weight = self.weight or layer.weight
        activation = self.activation or layer.activation
        if self.weight_bits is not None:
            weight = weight.with_(spec=weight.spec.with_(bits=self.weight_bits))
        if self.activation_bits is not None:
            activation = activation.with_(spec=activation.spec.with_(bits=self.activation_bits))
        return LayerQuant(weight, activation)


@dataclass(frozen=True)
class LayerQuant:
    """The resolved quantizers of one layer: its weight and its input/output activations."""

    weight: QuantizerConfig
    activation: QuantizerConfig


@dataclass(frozen=True)
class QuantConfig:
    """weight / activation: defaults; a layer's activation config quantizes its input (and its output when only
    layers wanting that config read it). op_activation: the values add/mul/cat/matmul read and write, i.e. the
    residual stream of a ResNet (None: activation); a layer reading such a value at another precision gets its own
    requantizer. type_overrides match module type names, name_overrides module paths (applied after type overrides).
    skip: module path patterns kept in float. first_last_8bit: the first and last quantized layers use 8 bits
    (standard for low-bit QAT). input_activation: the quantizer of the model's inputs, or of values computed from
    them alone, where quantized compute reads them (None: the reader's activation config). leaf_modules: module path
    patterns the tracer must not enter. on_untraceable: 'error' (raise, naming the module and source line) or 'leaf'
    (make the failing submodule a leaf, quantized by module swap). fuse_bn: fold BatchNorm into the preceding layer."""

    weight: QuantizerConfig = QuantizerConfig(W8_PER_CHANNEL, "minmax")
    activation: QuantizerConfig = QuantizerConfig(A8_AFFINE, "ema")
    type_overrides: tuple[LayerOverride, ...] = ()
    name_overrides: tuple[LayerOverride, ...] = ()
    skip: tuple[str, ...] = ()
    first_last_8bit: bool = False
    op_activation: QuantizerConfig | None = None
    input_activation: QuantizerConfig | None = None
    leaf_modules: tuple[str, ...] = ()
    on_untraceable: str = "error"
    fuse_bn: bool = True

    def __post_init__(self) -> None:
        for name in ("weight", "activation"):
            if not isinstance(getattr(self, name), QuantizerConfig):
                raise ValueError(f"QuantConfig.{name} must be a QuantizerConfig, got {type(getattr(self, name)).__name__}")
        for name in ("op_activation", "input_activation"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, QuantizerConfig):
                raise ValueError(f"QuantConfig.{name} must be a QuantizerConfig or None, got {type(value).__name__}")
        if self.weight.spec.is_dynamic:
            raise ValueError("QuantConfig.weight spec is invalid; allowed granularities: per_tensor, per_channel")
        if self.on_untraceable not in UNTRACEABLE_MODES:
            raise ValueError(
                f"QuantConfig.on_untraceable={self.on_untraceable!r} is invalid; allowed: {', '.join(UNTRACEABLE_MODES)}"
            )
        for name in ("type_overrides", "name_overrides"):
            for item in getattr(self, name):
                if not isinstance(item, LayerOverride):
                    raise ValueError(f"QuantConfig.{name} items must be LayerOverride, got {item!r}")
        for name in ("skip", "leaf_modules"):
            if isinstance(getattr(self, name), str) or not all(isinstance(p, str) for p in getattr(self, name)):
                raise ValueError(f"QuantConfig.{name} must be a tuple of module path patterns, got {getattr(self, name)!r}")

    @classmethod
    def preset(cls, name: str) -> "QuantConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown QuantConfig preset {name!r}; available: {', '.join(PRESETS)}")
        return PRESETS[name]

    def with_(self, **changes) -> "QuantConfig":
        return replace(self, **changes)

    @property
    def op_quantizer(self) -> QuantizerConfig:
        """The quantizer config of values read and written by add/mul/cat/matmul."""
        return self.op_activation or self.activation

    def is_skipped(self, module_name: str) -> bool:
        return any(fnmatch.fnmatchcase(module_name, p) for p in self.skip)

    def resolve(self, module_name: str, type_name: str) -> LayerQuant | None:
        """The quantizers for a layer, or None when it is skipped (kept in float)."""
        if self.is_skipped(module_name):
            return None
        layer = LayerQuant(self.weight, self.activation)
        for override in self.type_overrides:
            if override.pattern == type_name:
                layer = override.apply(layer)
        for override in self.name_overrides:
            if fnmatch.fnmatchcase(module_name, override.pattern):
                layer = override.apply(layer)
        return layer

    def unused_patterns(self, module_names: list[str], type_names: set[str]) -> list[str]:
        """Override/skip patterns that matched nothing (a typo would otherwise pass silently)."""
        name_patterns = [o.pattern for o in self.name_overrides] + list(self.skip) + list(self.leaf_modules)
        unused = [p for p in name_patterns if not any(fnmatch.fnmatchcase(n, p) for n in module_names)]
        return unused + [o.pattern for o in self.type_overrides if o.pattern not in type_names]


def _presets() -> dict[str, QuantConfig]:
    return {
        "w8a8": QuantConfig(),
        "w8a8_ptq": QuantConfig(activation=QuantizerConfig(A8_AFFINE, "percentile", percentile=99.999)),
        "w8a8_minmax": QuantConfig(activation=QuantizerConfig(A8_AFFINE, "minmax")),
        "w8a8_lsq": QuantConfig(
            weight=QuantizerConfig(W8_PER_CHANNEL, "lsq"), activation=QuantizerConfig(A8_AFFINE, "lsq_plus"),
            input_activation=OBSERVED_INPUT,
        ),
        "w4a4_lsq": _low_bit(4),
        "w2a2_lsq": _low_bit(2),
    }


PRESETS: dict[str, QuantConfig] = _presets()
