"""FakeQuantize modules: an observed or learned range + a QuantSpec, with the switches torch.ao users know.

>>> from qat.quant.observers import MinMaxObserver
>>> fq = FakeQuantize(QuantSpec(bits=8, signed=False), MinMaxObserver(QuantSpec(bits=8, signed=False)))
>>> y = fq(torch.tensor([0.0, 0.5, 1.0]))          # observes, then fake-quantizes
>>> round(fq.enable_observer(False).scale.item() * 255, 5)  # range [0, 1] on 255 steps
1.0
>>> torch.equal(fq.enable_fake_quant(False)(torch.tensor([0.3])), torch.tensor([0.3]))
True

Switch states are Python flags (no device synchronisation in forward), saved in the state_dict as extra
state, so a checkpoint resumes with the same modes.

``applies_relu``: the quantizer takes relu(x) (prepare sets it when the quantizer takes over the ReLU of the
layer before it, its only reader); the fused CUDA kernels and the CPU fake-quant fold that ReLU into their
observer and fake-quant passes instead of running it on its own (running-range observers take relu(x)'s
range from x's).
"""
from __future__ import annotations

import torch

from qat.quant import affine
from qat.quant.affine import dynamic_fake_quantize, fake_quantize
from qat.quant.learnable import lsq_fake_quantize, lsq_folds_relu, lsq_grad_scale, pact_fake_quantize, pact_scale
from qat.quant.observers import Observer
from qat.quant.spec import Granularity, QuantSpec
from qat.quant.state import ShapeFromStateDict, assign_


class QuantizerBase(ShapeFromStateDict):
    """Shared switches and state handling of every fake-quantizer."""

    def __init__(self, spec: QuantSpec, observer: Observer | None):
        super().__init__()
        self.spec = spec
        self.observer = observer
        self.observer_enabled = observer is not None
        self.fake_quant_enabled = True
        self.applies_relu = False

    def _take_relu(self, x: torch.Tensor, kernels_fold: bool) -> tuple[torch.Tensor, bool]:
        """(x, True) when the fake-quant kernels serving x will apply this quantizer's ReLU (`kernels_fold`),
        (relu(x), False) when it must be computed here, (x, False) without one."""
        if not self.applies_relu:
            return x, False
        if kernels_fold and self.fake_quant_enabled:
            return x, True
        return torch.relu(x), False

    def enable_observer(self, enabled: bool = True) -> "QuantizerBase":
        if not enabled and self.observer_enabled:
            self.observer.check_finite()
            self._on_observer_frozen()
        self.observer_enabled = bool(enabled) and self.observer is not None
        return self

    def disable_observer(self) -> "QuantizerBase":
        return self.enable_observer(False)

    def enable_fake_quant(self, enabled: bool = True) -> "QuantizerBase":
        self.fake_quant_enabled = bool(enabled)
        return self

    def disable_fake_quant(self) -> "QuantizerBase":
        return self.enable_fake_quant(False)

    def _on_observer_frozen(self) -> None:
        """Hook: settle the qparams once observation stops."""

    def get_extra_state(self) -> dict:
        return {"observer_enabled": self.observer_enabled, "fake_quant_enabled": self.fake_quant_enabled}

    def set_extra_state(self, state: dict) -> None:
        _require_fields(self, state, ("observer_enabled", "fake_quant_enabled"))
        self.observer_enabled = bool(state["observer_enabled"]) and self.observer is not None
        self.fake_quant_enabled = bool(state["fake_quant_enabled"])

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale float32, zero_point int32) in the spec's reduced shape, as int8 conversion uses them."""
        raise NotImplementedError(f"{type(self).__name__} must implement qparams()")

    def extra_repr(self) -> str:
        relu = ", relu first" if self.applies_relu else ""
        return f"{self.spec.short()}, observer={self.observer_enabled}, fake_quant={self.fake_quant_enabled}{relu}"


class FakeQuantize(QuantizerBase):
    """Observer-driven fake quantization (observer None: per-token/per-group ranges from each tensor)."""

    def __init__(self, spec: QuantSpec, observer: Observer | None = None):
        if observer is None and not spec.is_dynamic:
            raise ValueError(f"a {spec.granularity.value} FakeQuantize needs an observer")
        super().__init__(spec, observer)
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int32))
        self._stale = False  # observer saw data the qparams do not reflect yet

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, relu = self._take_relu(x, kernels_fold=affine.fake_quantize_folds_relu(x, self.spec))
        if self.observer_enabled:
            fused = self.observer.observe_into_qparams(x, self.scale, self.zero_point, relu)
            if not fused:
                self.observer(x, relu)
            self._stale = not fused
        if not self.fake_quant_enabled:
            return x
        if self.spec.is_dynamic:
            return dynamic_fake_quantize(x, self.spec)
        if self._stale:
            self.calculate_qparams()
        return fake_quantize(x, self.scale, self.zero_point, self.spec, relu=relu)

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Recompute scale/zero_point from the observer into the buffers and return them."""
        scale, zero_point = self.observer.calculate_qparams()
        assign_(self.scale, scale)
        assign_(self.zero_point, zero_point)
        self._stale = False
        return self.scale, self.zero_point

    def _on_observer_frozen(self) -> None:
        if self._stale:
            self.calculate_qparams()

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.observer is not None:
            self.observer.check_finite()
        if self._stale:
            self.calculate_qparams()
        return self.scale, self.zero_point


class LearnableFakeQuantize(QuantizerBase):
    """LSQ / LSQ+ / PACT: the range is a parameter, initialised from an observer pass.

    While the observer is enabled, the parameters follow the observer's range (derived lazily: when fake
    quantization needs them or the observer is switched off, so range searches run once per calibration);
    once it is disabled, they are trained. A quantizer never observed initialises itself from the first
    tensor it sees.
    """

    METHODS = ("lsq", "lsq_plus", "pact")

    def __init__(self, spec: QuantSpec, observer: Observer, method: str = "lsq"):
        if method not in self.METHODS:
            raise ValueError(f"method={method!r} is invalid; allowed: {', '.join(self.METHODS)}")
        super().__init__(spec, observer)
        self.method = method
        self.initialized = False
        self._stale = False  # observed data not yet turned into parameters (range searches run once, lazily)
        if method == "pact":
            self.alpha = torch.nn.Parameter(torch.tensor(1.0))
        else:
            self.scale = torch.nn.Parameter(torch.tensor(1.0))
            zero = torch.tensor(0.0)
            self.zero_point = torch.nn.Parameter(zero) if method == "lsq_plus" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, relu = self._take_relu(x, kernels_fold=self.method != "pact" and lsq_folds_relu(x, self.spec))
        if self.observer_enabled or not self.initialized:
            self.observer(x, relu)
            self._stale = True
        if self._stale and (self.fake_quant_enabled or not self.observer_enabled):
            self.reinitialize_from_observer()
        if not self.fake_quant_enabled:
            return x
        if self.method == "pact":
            return pact_fake_quantize(x, self.alpha, self.spec)
        return lsq_fake_quantize(x, self.scale, self.zero_point, self.spec, relu=relu)

    def reinitialize_from_observer(self) -> None:
        """Set the learned range from the observer's current statistics (e.g. after a DDP merge)."""
        scale, zero_point = self.observer.calculate_qparams()
        if self.method == "pact":
            min_val, max_val = self.observer.range()
            alpha = torch.maximum(max_val, -min_val) if self.spec.signed else max_val
            assign_(self.alpha, torch.clamp(alpha.float(), min=1e-4))
        else:
            assign_(self.scale, scale)
            if self.zero_point is not None:
                assign_(self.zero_point, zero_point.float())
        self.initialized = True
        self._stale = False

    def _on_observer_frozen(self) -> None:
        if self._stale:
            self.reinitialize_from_observer()

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._stale:
            self.observer.check_finite()
            self.reinitialize_from_observer()
        with torch.no_grad():
            if self.method == "pact":
                scale = pact_scale(self.alpha, self.spec)
                return scale, torch.zeros_like(scale, dtype=torch.int32)
            scale = torch.clamp(self.scale.float(), min=torch.finfo(torch.float32).eps)
            if self.zero_point is None:
                return scale, torch.full_like(scale, self.spec.fixed_zero_point, dtype=torch.int32)
            zp = torch.round(torch.clamp(self.zero_point, self.spec.qmin, self.spec.qmax))
            return scale, zp.to(torch.int32)

    def get_extra_state(self) -> dict:
        return {**super().get_extra_state(), "initialized": self.initialized}

    def set_extra_state(self, state: dict) -> None:
        super().set_extra_state(state)
        _require_fields(self, state, ("initialized",))
        self.initialized = bool(state["initialized"])

    def extra_repr(self) -> str:
        return f"{self.method}, {super().extra_repr()}"


def _require_fields(quantizer: QuantizerBase, state: dict, fields: tuple[str, ...]) -> None:
    """ValueError naming the quantizer kind when a saved extra state lacks its fields (saved by another kind)."""
    missing = [name for name in fields if name not in state]
    if missing:
        raise ValueError(f"{type(quantizer).__name__} cannot load an extra state without {', '.join(missing)} "
                         f"(it has {', '.join(sorted(state)) or 'nothing'}): it was saved by another quantizer kind; "
                         "load a state dict of a model prepared with the same QuantConfig")


def is_per_tensor_lsq(quantizer: QuantizerBase) -> bool:
    """A per-tensor LSQ / LSQ+ quantizer: the kind :func:`quantize_chain` can fuse."""
    return (isinstance(quantizer, LearnableFakeQuantize) and quantizer.method != "pact"
            and quantizer.spec.granularity is Granularity.PER_TENSOR)


def _trained_lsq(quantizer: QuantizerBase) -> bool:
    """A per-tensor LSQ / LSQ+ quantizer being trained: its range is its parameters (no observer pass)."""
    return (is_per_tensor_lsq(quantizer) and quantizer.fake_quant_enabled and not quantizer.observer_enabled
            and quantizer.initialized and not quantizer._stale)


def chain_fuses(x: torch.Tensor, first: QuantizerBase, second: QuantizerBase) -> bool:
    """:func:`quantize_chain` runs the two quantizers as one fused pass each way: both are per-tensor LSQ /
    LSQ+ quantizers being trained, on a tensor the fused kernels serve (CUDA)."""
    return (_trained_lsq(first) and _trained_lsq(second) and not second.applies_relu and x.numel() > 0
            and affine.triton_applies(x, first.spec))


def quantize_chain(x: torch.Tensor, first: QuantizerBase, second: QuantizerBase) -> tuple[torch.Tensor, torch.Tensor]:
    """(first(x), second(first(x))): a value on one grid that is also requantized to another, such as the 8-bit
    residual stream read at 4 bits by the next convolutions (prepare puts two such calls in one). Where
    :func:`chain_fuses`, one pass forward and one backward (the forward reads x once and not y1; the backward
    adds y1's two gradients itself), with the values and gradients of the two calls; the modules' forward
    hooks do not run then. Else the two calls.

    >>> from qat.quant.observers import MinMaxObserver
    >>> spec = QuantSpec(bits=4, signed=False)
    >>> first, second = (LearnableFakeQuantize(spec, MinMaxObserver(spec)) for _ in range(2))
    >>> y1, y2 = quantize_chain(torch.rand(16), first, second)
    >>> torch.equal(y2, second.disable_observer()(y1))
    True
    """
    if not chain_fuses(x, first, second):
        y1 = first(x)
        return y1, second(y1)
    from qat.quant.triton_fake_quant import LearnedGrid, lsq_chain_fake_quantize

    grids = [LearnedGrid(q.scale, q.zero_point, q.spec, lsq_grad_scale(x, q.spec)) for q in (first, second)]
    return lsq_chain_fake_quantize(x, *grids, relu=first.applies_relu)
