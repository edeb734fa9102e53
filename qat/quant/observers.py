"""Range observers: watch tensors, propose (min, max), turn them into qparams.

Every observer keeps its statistics in buffers (so they checkpoint, resume and can be synchronised across
DDP ranks) in the reduced shape of its spec: () per-tensor, (C,) per-channel.

>>> obs = MinMaxObserver(QuantSpec(bits=8, signed=False))
>>> _ = obs(torch.tensor([-1.0, 0.5, 3.0]))
>>> obs.min_val.item(), obs.max_val.item()
(-1.0, 3.0)
"""
from __future__ import annotations

from enum import Enum

import torch

from qat.quant.affine import (
    is_dense,
    qparams_from_minmax,
    reduced_aminmax,
    reduced_minmax,
    triton_eager_applies,
)
from qat.quant.spec import Granularity, QuantSpec
from qat.quant.state import ShapeFromStateDict, assign_

OBSERVABLE = (Granularity.PER_TENSOR, Granularity.PER_CHANNEL)


class RunningRule(Enum):
    """How a running-range observer merges a batch's (min, max) into its range (the fused kernel's RULE)."""

    MIN_MAX = 0  # widen
    EMA = 1  # move towards the batch range by `momentum`


class Observer(ShapeFromStateDict):
    """Base class: records the range of what flows through; forward returns its input unchanged."""

    def __init__(self, spec: QuantSpec):
        super().__init__()
        if spec.granularity not in OBSERVABLE:
            raise ValueError(
                f"{type(self).__name__} observes per-tensor or per-channel ranges, got granularity="
                f"'{spec.granularity.value}' (per-token/per-group ranges are computed on the fly)"
            )
        self.spec = spec
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))
        self.has_data = False  # a Python flag, so the hot path never synchronises with the device

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.has_data = bool(torch.isfinite(self.min_val).all()) and self.min_val.numel() > 0

    def forward(self, x: torch.Tensor, relu: bool = False) -> torch.Tensor:
        """Observe `x` (`relu`: relu(x), which the running-range observers take from x's range without
        computing it) and return `x`."""
        if x.numel():
            self.observe(x.detach(), relu)
        return x

    def observe(self, x: torch.Tensor, relu: bool = False) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement observe()")

    def observe_into_qparams(self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                             relu: bool = False) -> bool:
        """Observe `x` (`relu`: relu(x), without computing it) and write the new qparams into `scale` /
        `zero_point` in place, fused: on CUDA, for an observer with a running rule whose buffers already have
        their shapes, one min/max reduction (per-tensor: a Triton pass) and one Triton kernel
        (:mod:`qat.quant.triton_observers`). Returns False, having done nothing, elsewhere: the caller
        observes and computes the qparams the plain way."""
        if not x.numel() or not triton_eager_applies(x, self.spec):
            return False
        reduced = () if self.spec.granularity is Granularity.PER_TENSOR else (x.shape[self.spec.axis],)
        rule = self.fused_update_rule(reduced, scale, zero_point)
        if rule is None:
            return False
        from qat.quant import triton_observers

        x = x.detach()
        if not reduced and is_dense(x) and x.numel() < triton_observers.MAX_NUMEL:
            lo, hi = triton_observers.tensor_minmax_partials(x), None
        else:
            lo, hi = reduced_aminmax(x, self.spec)
        triton_observers.update_range_and_qparams(lo, hi, self.min_val, self.max_val, scale, zero_point, self.spec,
                                                  *rule, relu)
        return True

    def fused_update_rule(self, reduced: tuple[int, ...], scale: torch.Tensor,
                          zero_point: torch.Tensor) -> tuple[RunningRule, float] | None:
        """The running rule when the fused kernels can merge a batch range into this observer and write
        `scale` / `zero_point`: data seen, and the range and qparams buffers all of the `reduced` shape."""
        rule = self.running_rule()
        if rule is None or not self.has_data or not self.min_val.shape == scale.shape == zero_point.shape == reduced:
            return None
        return rule

    def running_rule(self) -> tuple[RunningRule, float] | None:
        """(rule, momentum) when observe() merges each batch's range into a running one by a fixed rule
        (what the fused kernel implements), else None."""
        return None

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (min, max) the qparams are computed from; subclasses may clip outliers here."""
        return self.min_val, self.max_val

    def check_finite(self) -> None:
        """Raise FloatingPointError if the statistics hold NaN/Inf. It reads a device value (one host
        synchronisation), so the training hot path defers it to the points where qparams settle."""
        if self.has_data and not bool(torch.isfinite(self.min_val).all() & torch.isfinite(self.max_val).all()):
            raise FloatingPointError(
                f"{type(self).__name__} saw non-finite values (NaN/Inf): its range is "
                f"[{self.min_val.min().item()}, {self.max_val.max().item()}]. Check the inputs or the layer "
                "producing them."
            )

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.has_data:
            raise RuntimeError(f"{type(self).__name__} has seen no data: run calibration batches first")
        min_val, max_val = self.range()
        return qparams_from_minmax(min_val, max_val, self.spec)

    def extra_repr(self) -> str:
        return self.spec.short()


def _check_finite(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, who: str) -> None:
    """Raise at once on NaN/Inf (free on the CPU; on a GPU it waits for the device)."""
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise FloatingPointError(
            f"{who} saw non-finite values (NaN/Inf) in a tensor of shape {tuple(x.shape)}; "
            "the range would be meaningless. Check the inputs or the layer producing them."
        )


def _batch_range(x: torch.Tensor, spec: QuantSpec, relu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of x, or of relu(x) (both clamped at 0; NaN stays NaN), in the reduced shape of `spec`."""
    lo, hi = reduced_minmax(x, spec)
    return (lo.clamp_min(0.0), hi.clamp_min(0.0)) if relu else (lo, hi)


def _check_finite_without_sync(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, who: str) -> None:
    """The running observers' check: immediate on the CPU in eager mode; on a GPU or under torch.compile
    deferred to Observer.check_finite. Deferring loses nothing: min/max/lerp propagate NaN and Inf into the
    stored range."""
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        _check_finite(x, lo, hi, who)


class MinMaxObserver(Observer):
    """Running min and max over everything observed."""

    def observe(self, x: torch.Tensor, relu: bool = False) -> None:
        lo, hi = _batch_range(x, self.spec, relu)
        _check_finite_without_sync(x, lo, hi, type(self).__name__)
        if self.has_data and self.min_val.shape == lo.shape:
            lo, hi = torch.minimum(lo, self.min_val), torch.maximum(hi, self.max_val)
        assign_(self.min_val, lo)
        assign_(self.max_val, hi)
        self.has_data = True

    def running_rule(self) -> tuple[RunningRule, float]:
        return RunningRule.MIN_MAX, 0.0


class MovingAverageMinMaxObserver(Observer):
    """Exponential moving average of each batch's min and max (momentum = weight of the new batch)."""

    def __init__(self, spec: QuantSpec, momentum: float = 0.01):
        super().__init__(spec)
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum={momentum!r} is invalid; allowed: a float in (0, 1]")
        self.momentum = momentum

    def observe(self, x: torch.Tensor, relu: bool = False) -> None:
        lo, hi = _batch_range(x, self.spec, relu)
        _check_finite_without_sync(x, lo, hi, type(self).__name__)
        if self.has_data and self.min_val.shape == lo.shape:
            lo = torch.lerp(self.min_val, lo, self.momentum)
            hi = torch.lerp(self.max_val, hi, self.momentum)
        assign_(self.min_val, lo)
        assign_(self.max_val, hi)
        self.has_data = True

    def running_rule(self) -> tuple[RunningRule, float]:
        return RunningRule.EMA, self.momentum
