"""Histogram observers: keep a histogram of what flows through and clip outliers when choosing the range.

Per-tensor or per-channel (one histogram per index of `spec.axis`), all channels binned at once. The
search itself (percentile, expected fake-quant MSE, KL divergence) lives in :mod:`qat.quant.range_search`.

>>> from qat.quant.observers import MinMaxObserver
>>> x = torch.cat([torch.randn(100_000), torch.tensor([1000.0])])
>>> spec = QuantSpec(bits=8, signed=True, symmetric=True)
>>> minmax, clipped = MinMaxObserver(spec), PercentileObserver(spec)
>>> _, _ = minmax(x), clipped(x)
>>> minmax.range()[1].item(), clipped.range()[1].item() < 10.0
(1000.0, True)
"""
from __future__ import annotations

import torch

from qat.quant.affine import SCALE_EPS, reduced_minmax
from qat.quant.observers import Observer, _check_finite
from qat.quant.range_search import Histograms, ShrinkGrid, entropy_range, mse_range, percentile_range
from qat.quant.spec import QuantSpec
from qat.quant.state import assign_


def _positive_int(owner: str, field: str, value, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{owner}.{field}={value!r} is invalid; allowed: an int >= {least}")


def histogram_span(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The span a histogram of data in [lo, hi] covers: widened to contain 0 (as every quantization grid
    does) and to a width of at least SCALE_EPS (an all-zero channel still gets proper bins)."""
    span_lo = lo.clamp(max=0.0)
    return span_lo, torch.maximum(hi.clamp(min=0.0), span_lo + SCALE_EPS)


class HistogramObserver(Observer):
    """Running min/max plus a `bins`-bin histogram per channel whose span grows with the data.

    Buffers, with R the reduced shape (() per-tensor, (C,) per-channel): min_val, max_val (running
    extremes), hist_min, hist_max (the span, see :func:`histogram_span`), histogram (R + (bins,), float64
    counts). When new data leaves the span, the old counts are re-binned onto the grown span (mass is
    spread proportionally over the new bins, so the total is kept). The base class clips nothing: its
    range is the min-max range; subclasses override :meth:`search_range`.

    >>> obs = HistogramObserver(QuantSpec(granularity="per_channel", axis=0), bins=4)
    >>> _ = obs(torch.tensor([[0.0, 1.0, 2.0, 3.0], [-1.0, -1.0, -1.0, 1.0]]))
    >>> obs.histogram.tolist()
    [[1.0, 1.0, 1.0, 1.0], [3.0, 0.0, 0.0, 1.0]]
    >>> obs.hist_min.tolist(), obs.hist_max.tolist()
    ([0.0, -1.0], [3.0, 1.0])
    """

    def __init__(self, spec: QuantSpec, bins: int = 2048):
        super().__init__(spec)
        _positive_int(type(self).__name__, "bins", bins, 2)
        self.register_buffer("hist_min", torch.tensor(0.0))
        self.register_buffer("hist_max", torch.tensor(0.0))
        self.register_buffer("histogram", torch.zeros(bins, dtype=torch.float64))

    @property
    def bins(self) -> int:
        return self.histogram.shape[-1]

    def histograms(self) -> Histograms:
        """The state as (C, bins) histograms (C = 1 per-tensor)."""
        return Histograms(self.histogram.reshape(-1, self.bins), self.hist_min.reshape(-1), self.hist_max.reshape(-1))

    def observe(self, x: torch.Tensor, relu: bool = False) -> None:
        x = torch.relu(x) if relu else x
        lo, hi = reduced_minmax(x, self.spec)
        _check_finite(x, lo, hi, type(self).__name__)
        resume = self.has_data and self.min_val.shape == lo.shape
        if resume:
            lo, hi = torch.minimum(lo, self.min_val), torch.maximum(hi, self.max_val)
        span_lo, span_hi = histogram_span(lo, hi)
        counts = self._grown(span_lo.reshape(-1), span_hi.reshape(-1)) if resume else 0.0
        counts = counts + self._batch_counts(x, span_lo.reshape(-1), span_hi.reshape(-1))  # (C, bins)
        assign_(self.min_val, lo)
        assign_(self.max_val, hi)
        assign_(self.hist_min, span_lo)
        assign_(self.hist_max, span_hi)
        assign_(self.histogram, counts.reshape(*lo.shape, self.bins))
        self.has_data = True

    def _grown(self, span_lo: torch.Tensor, span_hi: torch.Tensor) -> torch.Tensor:
        """The stored counts on the new spans (C,) -> (C, bins); channels whose span is unchanged are kept."""
        old = self.histograms()
        changed = (span_lo != old.lo) | (span_hi != old.hi)  # (C,)
        return torch.where(changed[:, None], old.rebin(span_lo, span_hi).counts, old.counts)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        if not self.spec.is_per_channel:
            return x.float().reshape(1, -1)  # (1, N)
        channels_first = x.float().movedim(self.spec.axis, 0)
        return channels_first.reshape(channels_first.shape[0], -1)  # (C, N)

    def _batch_counts(self, x: torch.Tensor, span_lo: torch.Tensor, span_hi: torch.Tensor) -> torch.Tensor:
        """Counts of `x` per channel on `bins` uniform bins over [span_lo, span_hi] (C,) -> (C, bins)."""
        rows = self._rows(x)  # (C, N)
        channels, bins = rows.shape[0], self.bins
        per_unit = (bins / (span_hi - span_lo))[:, None]  # (C, 1) bins per unit of x
        index = ((rows - span_lo[:, None]) * per_unit).floor().clamp(0, bins - 1).long()  # (C, N)
        flat = index + torch.arange(channels, device=rows.device)[:, None] * bins  # channel c -> c*bins + index
        return torch.bincount(flat.reshape(-1), minlength=channels * bins).reshape(channels, bins).double()

    def search_range(self, h: Histograms) -> tuple[torch.Tensor, torch.Tensor]:
        """The clipped (lo, hi), each (C,), chosen from the histograms; the base class clips nothing."""
        return h.lo, h.hi

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The clipped range in the reduced shape, inside [min_val, max_val].

        Only bounds beyond zero are clipped: a bound on the near side of zero (the min of all-positive
        data, e.g. 0 after a ReLU) stays as observed, since the grid includes zero regardless.
        """
        if not self.has_data:
            return self.min_val, self.max_val
        lo, hi = (t.reshape(self.min_val.shape).to(self.min_val) for t in self.search_range(self.histograms()))
        lo = torch.where(self.min_val < 0, torch.maximum(lo, self.min_val).clamp(max=0.0), self.min_val)
        hi = torch.where(self.max_val > 0, torch.minimum(hi, self.max_val).clamp(min=0.0), self.max_val)
        return torch.minimum(lo, hi), hi

    def extra_repr(self) -> str:
        return f"{self.spec.short()}, bins={self.bins}"


class PercentileObserver(HistogramObserver):
    """Clip each tail at `percentile` percent of the mass (symmetric specs: clip |x|, so -lo == hi).

    >>> obs = PercentileObserver(QuantSpec(signed=False), percentile=99.0, bins=1000)
    >>> _ = obs(torch.linspace(0.0, 10.0, 10_001))
    >>> [round(v.item(), 2) for v in obs.range()]
    [0.0, 9.9]
    """

    def __init__(self, spec: QuantSpec, percentile: float = 99.99, bins: int = 2048):
        super().__init__(spec, bins)
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"PercentileObserver.percentile={percentile!r} is invalid; allowed: a float in (50, 100]")
        self.percentile = float(percentile)

    def search_range(self, h: Histograms) -> tuple[torch.Tensor, torch.Tensor]:
        return percentile_range(h, self.percentile, self.spec.symmetric)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, percentile={self.percentile}"


class MSEObserver(HistogramObserver):
    """The range minimising the expected ||x - fake_quantize(x)||^2, estimated from the histogram.

    Candidates: the observed span (or +-max|x| if symmetric) shrunk by `candidates` factors on a
    geometric grid in [min_shrink, 1], refined by a linear grid between the best one's neighbours;
    asymmetric specs shrink the two ends independently (see :func:`qat.quant.range_search.mse_range`).

    >>> spec = QuantSpec(bits=8, signed=True, symmetric=True)
    >>> obs = MSEObserver(spec)
    >>> _ = obs(torch.cat([torch.randn(100_000), torch.tensor([100.0])]))  # rounding x100000 vs clipping x1
    >>> lo, hi = obs.range()
    >>> 60.0 < hi.item() < 75.0
    True
    """

    def __init__(self, spec: QuantSpec, bins: int = 2048, candidates: int = 100, min_shrink: float = 1e-3):
        super().__init__(spec, bins)
        _positive_int(type(self).__name__, "candidates", candidates, 2)
        if not 0.0 < min_shrink < 1.0:
            raise ValueError(f"MSEObserver.min_shrink={min_shrink!r} is invalid; allowed: a float in (0, 1)")
        self.candidates, self.min_shrink = candidates, float(min_shrink)

    def search_range(self, h: Histograms) -> tuple[torch.Tensor, torch.Tensor]:
        return mse_range(h, self.spec, ShrinkGrid(self.candidates, self.min_shrink))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, candidates={self.candidates}, min_shrink={self.min_shrink}"


class EntropyObserver(HistogramObserver):
    """TensorRT-style KL-divergence calibration (see :func:`qat.quant.range_search.entropy_range`).

    Tries at most `max_candidates` thresholds, evenly strided between the narrowest window (one bin
    per quantization level) and the full span; `max_candidates >= bins` tries every bin edge.

    >>> obs = EntropyObserver(QuantSpec(bits=8, signed=True, symmetric=True))
    >>> samples = torch.randn(100_000, generator=torch.Generator().manual_seed(0))  # the draw decides between
    >>> _ = obs(torch.cat([samples, torch.tensor([1000.0])]))  # the narrowest window and the next candidate
    >>> obs.range()[1].item()  # the narrowest window: 128 of 2048 bins of |x| in [0, 1000]
    62.5
    """

    def __init__(self, spec: QuantSpec, bins: int = 2048, max_candidates: int = 512):
        super().__init__(spec, bins)
        _positive_int(type(self).__name__, "max_candidates", max_candidates, 1)
        self.max_candidates = max_candidates

    def search_range(self, h: Histograms) -> tuple[torch.Tensor, torch.Tensor]:
        return entropy_range(h, self.spec, self.max_candidates)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, max_candidates={self.max_candidates}"
