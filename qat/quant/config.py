"""QuantizerConfig: a QuantSpec plus how its range is found; builds the FakeQuantize module.

>>> cfg = QuantizerConfig(QuantSpec(bits=4, signed=True, symmetric=True), range_method="lsq")
>>> type(cfg.build()).__name__
'LearnableFakeQuantize'
>>> QuantizerConfig(QuantSpec(), range_method="median")
Traceback (most recent call last):
...
ValueError: QuantizerConfig.range_method='median' is invalid; allowed: minmax, ema, percentile, mse, entropy, lsq, lsq_plus, pact
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from qat.quant.fake_quantize import FakeQuantize, LearnableFakeQuantize, QuantizerBase
from qat.quant.histogram import EntropyObserver, MSEObserver, PercentileObserver
from qat.quant.observers import MinMaxObserver, MovingAverageMinMaxObserver, Observer
from qat.quant.spec import QuantSpec


@dataclass(frozen=True)
class QuantizerConfig:
    """spec: the integer grid. range_method: an observer name or a learned method (LSQ/LSQ+/PACT, which
    initialise from `init_observer`). momentum: EMA weight of a new batch. percentile: kept mass for the
    percentile observer. bins: histogram bins of the histogram observers."""

    spec: QuantSpec = QuantSpec()
    range_method: str = "minmax"
    init_observer: str = "minmax"
    momentum: float = 0.01
    percentile: float = 99.99
    bins: int = 2048

    def __post_init__(self) -> None:
        allowed = tuple(OBSERVERS) + LearnableFakeQuantize.METHODS
        if self.range_method not in allowed:
            _fail("range_method", self.range_method, ", ".join(allowed))
        if self.init_observer not in OBSERVERS:
            _fail("init_observer", self.init_observer, ", ".join(OBSERVERS))
        if not 0.0 < self.momentum <= 1.0:
            _fail("momentum", self.momentum, "a float in (0, 1]")
        if not 50.0 < self.percentile <= 100.0:
            _fail("percentile", self.percentile, "a float in (50, 100]")
        if not isinstance(self.bins, int) or self.bins < 16:
            _fail("bins", self.bins, "an int >= 16")

    @property
    def learnable(self) -> bool:
        return self.range_method in LearnableFakeQuantize.METHODS

    def with_(self, **changes) -> "QuantizerConfig":
        return replace(self, **changes)

    def build(self) -> QuantizerBase:
        """A fresh fake-quant module for this config."""
        if self.spec.is_dynamic:
            return FakeQuantize(self.spec, None)
        if self.learnable:
            return LearnableFakeQuantize(self.spec, OBSERVERS[self.init_observer](self), self.range_method)
        return FakeQuantize(self.spec, OBSERVERS[self.range_method](self))

    def short(self) -> str:
        return f"{self.spec.short()} {self.range_method}"


def _fail(field: str, value, allowed: str) -> None:
    raise ValueError(f"QuantizerConfig.{field}={value!r} is invalid; allowed: {allowed}")


OBSERVERS: dict[str, Callable[[QuantizerConfig], Observer]] = {
    "minmax": lambda c: MinMaxObserver(c.spec),
    "ema": lambda c: MovingAverageMinMaxObserver(c.spec, momentum=c.momentum),
    "percentile": lambda c: PercentileObserver(c.spec, percentile=c.percentile, bins=c.bins),
    "mse": lambda c: MSEObserver(c.spec, bins=c.bins),
    "entropy": lambda c: EntropyObserver(c.spec, bins=c.bins),
}
