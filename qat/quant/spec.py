"""QuantSpec: what a quantizer represents (bits, sign, symmetry, range, granularity).

A spec is a frozen, validated value. It says nothing about *how* the range is found (observer or learned);
that lives in :class:`qat.quant.config.QuantizerConfig`.

>>> spec = QuantSpec(bits=8, signed=False)
>>> spec.qmin, spec.qmax
(0, 255)
>>> QuantSpec(bits=4, signed=True, symmetric=True, narrow_range=True).qmin
-7
>>> QuantSpec(bits=8, granularity=Granularity.PER_CHANNEL, axis=0).is_per_channel
True
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, replace

MIN_BITS, MAX_BITS = 2, 8


class Granularity(str, enum.Enum):
    """How many (scale, zero_point) pairs a tensor gets."""

    PER_TENSOR = "per_tensor"  # one pair
    PER_CHANNEL = "per_channel"  # one per index of `axis` (weights: axis 0 = output channels)
    PER_TOKEN = "per_token"  # one per row of the last dim, computed on the fly (activations)
    PER_GROUP = "per_group"  # one per `group_size` consecutive elements of the last dim


def _fail(field: str, value, allowed: str) -> None:
    raise ValueError(f"QuantSpec.{field}={value!r} is invalid; allowed: {allowed}")


@dataclass(frozen=True)
class QuantSpec:
    """Integer grid of a quantizer.

    bits: 2..8.  signed: int range [-2^(b-1), 2^(b-1)-1] else [0, 2^b-1].
    symmetric: zero point fixed (0 if signed, 2^(b-1) if unsigned); else affine.
    narrow_range: drop the most negative value (symmetric signed only), e.g. int8 in [-127, 127].
    reduce_range: use one bit less of range (fbgemm without VNNI); the clamp is part of the spec,
    so fake-quant and int8 kernels agree on it.
    """

    bits: int = 8
    signed: bool = True
    symmetric: bool = False
    narrow_range: bool = False
    reduce_range: bool = False
    granularity: Granularity = Granularity.PER_TENSOR
    axis: int | None = None
    group_size: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.granularity, str) and not isinstance(self.granularity, Granularity):
            allowed = ", ".join(g.value for g in Granularity)
            if self.granularity not in {g.value for g in Granularity}:
                _fail("granularity", self.granularity, allowed)
            object.__setattr__(self, "granularity", Granularity(self.granularity))
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS:
            _fail("bits", self.bits, f"an int in [{MIN_BITS}, {MAX_BITS}]")
        for flag in ("signed", "symmetric", "narrow_range", "reduce_range"):
            if not isinstance(getattr(self, flag), bool):
                _fail(flag, getattr(self, flag), "True or False")
        if self.narrow_range and not (self.symmetric and self.signed):
            _fail("narrow_range", True, "True only with symmetric=True and signed=True")
        if self.reduce_range and self.bits < 3:
            _fail("reduce_range", True, "True only with bits >= 3")
        self._validate_granularity()

    def _validate_granularity(self) -> None:
        g = self.granularity
        if g is Granularity.PER_CHANNEL:
            if self.axis is None:
                object.__setattr__(self, "axis", 0)
            if not isinstance(self.axis, int) or isinstance(self.axis, bool):
                _fail("axis", self.axis, "an int (the channel dimension)")
        elif self.axis is not None:
            _fail("axis", self.axis, f"None unless granularity='{Granularity.PER_CHANNEL.value}'")
        if g is Granularity.PER_GROUP:
            if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
                _fail("group_size", self.group_size, "a positive int with granularity='per_group'")
        elif self.group_size is not None:
            _fail("group_size", self.group_size, f"None unless granularity='{Granularity.PER_GROUP.value}'")

    @property
    def effective_bits(self) -> int:
        return self.bits - 1 if self.reduce_range else self.bits

    @property
    def qmin(self) -> int:
        b = self.effective_bits
        if not self.signed:
            return 0
        return -(2 ** (b - 1)) + (1 if self.narrow_range else 0)

    @property
    def qmax(self) -> int:
        b = self.effective_bits
        return 2 ** (b - 1) - 1 if self.signed else 2**b - 1

    @property
    def fixed_zero_point(self) -> int:
        """Zero point when it is not learned or observed: 0, or mid-range for symmetric unsigned grids."""
        return (self.qmin + self.qmax + 1) // 2 if self.symmetric and not self.signed else 0

    @property
    def is_per_channel(self) -> bool:
        return self.granularity is Granularity.PER_CHANNEL

    @property
    def is_dynamic(self) -> bool:
        """Per-token and per-group ranges are computed from each tensor, not from an observer."""
        return self.granularity in (Granularity.PER_TOKEN, Granularity.PER_GROUP)

    @property
    def storage_dtype_name(self) -> str:
        return "int8" if self.signed else "uint8"

    def with_(self, **changes) -> "QuantSpec":
        """A validated copy with some fields changed."""
        return replace(self, **changes)

    def short(self) -> str:
        """Compact human-readable form, used by `qat.explain`: e.g. 'u8 asym/tensor', 's4 sym/ch0'."""
        sign = "s" if self.signed else "u"
        kind = "sym" if self.symmetric else "asym"
        gran = {
            Granularity.PER_TENSOR: "tensor",
            Granularity.PER_CHANNEL: f"ch{self.axis}",
            Granularity.PER_TOKEN: "token",
            Granularity.PER_GROUP: f"g{self.group_size}",
        }[self.granularity]
        extra = ("n" if self.narrow_range else "") + ("r" if self.reduce_range else "")
        return f"{sign}{self.bits}{extra} {kind}/{gran}"
