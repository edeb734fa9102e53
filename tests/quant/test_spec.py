import pytest

from qat.quant.spec import Granularity, QuantSpec


@pytest.mark.parametrize(
    "kwargs, qrange",
    [
        (dict(bits=8, signed=True), (-128, 127)),
        (dict(bits=8, signed=False), (0, 255)),
        (dict(bits=8, signed=True, symmetric=True, narrow_range=True), (-127, 127)),
        (dict(bits=4, signed=True), (-8, 7)),
        (dict(bits=4, signed=False), (0, 15)),
        (dict(bits=2, signed=True, symmetric=True, narrow_range=True), (-1, 1)),
        (dict(bits=8, signed=False, reduce_range=True), (0, 127)),
        (dict(bits=8, signed=True, reduce_range=True), (-64, 63)),
    ],
)
def test_integer_range(kwargs, qrange):
    spec = QuantSpec(**kwargs)
    assert (spec.qmin, spec.qmax) == qrange


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(bits=1), "bits"),
        (dict(bits=9), "bits"),
        (dict(bits=8.0), "bits"),
        (dict(bits=True), "bits"),
        (dict(signed="yes"), "signed"),
        (dict(symmetric=1), "symmetric"),
        (dict(narrow_range=True), "narrow_range"),
        (dict(narrow_range=True, symmetric=True, signed=False), "narrow_range"),
        (dict(reduce_range=True, bits=2), "reduce_range"),
        (dict(granularity="per_row"), "granularity"),
        (dict(granularity="per_channel", axis="0"), "axis"),
        (dict(axis=1), "axis"),
        (dict(granularity="per_group"), "group_size"),
        (dict(granularity="per_group", group_size=0), "group_size"),
        (dict(group_size=32), "group_size"),
    ],
)
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"QuantSpec\.{field}=.*allowed"):
        QuantSpec(**kwargs)


def test_granularity_from_string_and_default_axis():
    spec = QuantSpec(granularity="per_channel")
    assert spec.granularity is Granularity.PER_CHANNEL and spec.axis == 0
    assert QuantSpec(granularity="per_token").is_dynamic


def test_spec_is_frozen_and_hashable():
    spec = QuantSpec()
    with pytest.raises(AttributeError):
        spec.bits = 4
    assert spec == QuantSpec() and hash(spec) == hash(QuantSpec())
    assert spec.with_(bits=4).bits == 4
    with pytest.raises(ValueError, match="bits"):
        spec.with_(bits=12)
