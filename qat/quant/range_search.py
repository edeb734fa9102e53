"""Clipping-range search on batches of histograms: percentile, expected fake-quant MSE, KL divergence.

All functions work on :class:`Histograms`, C uniform-bin histograms at once (C = 1 per-tensor, C =
channels per-channel), vectorised over channels and candidates. Inside a bin the density is taken as
uniform, so the CDF is piecewise linear; that model is used for re-binning, folding and quantiles.

>>> h = Histograms(torch.tensor([[1.0, 2.0, 1.0, 0.0]], dtype=torch.float64), torch.tensor([0.0]), torch.tensor([4.0]))
>>> h.cdf_at(torch.tensor([[1.5, 10.0]])).tolist()
[[2.0, 4.0]]
>>> h.rebin(torch.tensor([0.0]), torch.tensor([8.0])).counts.tolist()
[[3.0, 1.0, 0.0, 0.0]]
>>> h.quantile(torch.tensor([0.5])).tolist()
[1.5]
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qat.quant.affine import qparams_from_minmax
from qat.quant.spec import QuantSpec

CHUNK_ELEMENTS = 1 << 20  # bound on C * candidates * bins per vectorised step (a few tens of MB in float64)
KL_SMOOTHING = 1e-4  # counts given to an empty quantized bin where the reference has mass


@dataclass(frozen=True)
class Histograms:
    """counts (C, B) float64 over uniform bins spanning [lo[c], hi[c]] (lo, hi: (C,), hi > lo)."""

    counts: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor

    @property
    def bins(self) -> int:
        return self.counts.shape[-1]

    @property
    def bin_width(self) -> torch.Tensor:
        return (self.hi.double() - self.lo.double()) / self.bins  # (C,)

    def edges(self) -> torch.Tensor:
        steps = torch.arange(self.bins + 1, device=self.counts.device, dtype=torch.float64)
        return self.lo.double()[:, None] + self.bin_width[:, None] * steps  # (C, B+1)

    def cumulative(self) -> torch.Tensor:
        return torch.nn.functional.pad(self.counts.cumsum(-1), (1, 0))  # (C, B+1), cumulative[:, 0] = 0

    def cdf_at(self, points: torch.Tensor) -> torch.Tensor:
        """Mass below each of `points` (C, K): linear inside a bin, 0 below lo, the total above hi."""
        pos = ((points.double() - self.lo.double()[:, None]) / self.bin_width[:, None]).clamp(0, self.bins)
        idx = pos.floor().long().clamp(max=self.bins - 1)
        return self.cumulative().gather(1, idx) + (pos - idx) * self.counts.gather(1, idx)

    def rebin(self, lo: torch.Tensor, hi: torch.Tensor) -> "Histograms":
        """The same mass on B uniform bins over [lo, hi]; mass outside [lo, hi] lands in the end bins."""
        new = Histograms(self.counts, lo, hi)
        mass = self.cdf_at(new.edges())  # (C, B+1)
        mass[:, 0], mass[:, -1] = 0.0, self.counts.sum(-1)
        return Histograms(mass.diff(dim=-1).clamp(min=0.0), lo, hi)

    def fold_abs(self) -> "Histograms":
        """Histograms of |x| over [0, max(-lo, hi)] with the same number of bins."""
        amax = torch.maximum(-self.lo.double(), self.hi.double())
        t = Histograms(self.counts, torch.zeros_like(amax), amax).edges()  # (C, B+1) thresholds
        mass = self.cdf_at(t) - self.cdf_at(-t)  # mass inside [-t, t]
        mass[:, -1] = self.counts.sum(-1)
        return Histograms(mass.diff(dim=-1).clamp(min=0.0), torch.zeros_like(amax), amax)

    def quantile(self, q: torch.Tensor) -> torch.Tensor:
        """Per-channel value below which a fraction q (C,) of the mass lies (inverse of cdf_at)."""
        cum = self.cumulative()
        target = (q.double() * cum[:, -1])[:, None]  # (C, 1)
        k = torch.searchsorted(cum.contiguous(), target, right=False).clamp(1, self.bins)  # first cum >= target
        below, count = cum.gather(1, k - 1), self.counts.gather(1, k - 1)
        frac = torch.where(count > 0, (target - below) / count.clamp(min=1e-300), torch.zeros_like(count))
        return (self.lo.double() + self.bin_width * ((k - 1) + frac.clamp(0, 1))[:, 0]).float()


def percentile_range(h: Histograms, percentile: float, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip both tails at `percentile` (e.g. 99.99); symmetric: clip |x| so that -lo == hi.

    >>> counts = torch.ones(1, 100, dtype=torch.float64)
    >>> lo, hi = percentile_range(Histograms(counts, torch.tensor([-1.0]), torch.tensor([1.0])), 99.0, False)
    >>> round(lo.item(), 4), round(hi.item(), 4)
    (-0.98, 0.98)
    """
    keep = torch.full_like(h.lo, percentile / 100.0, dtype=torch.float64)
    if symmetric:
        t = h.fold_abs().quantile(keep)
        return -t, t
    return h.quantile(1.0 - keep), h.quantile(keep)


def _rounding_error_integral(u: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """An antiderivative of e(u) = (u - clamp(round(u), qmin, qmax))^2, for u in code units.

    Inside [qmin - 1/2, qmax + 1/2] e is periodic with integral 1/12 per step; outside, it is the squared
    distance to the clamp value. float64 keeps differences of the cubic tails accurate.
    """
    inside = u.clamp(qmin - 0.5, qmax + 0.5)
    k = torch.floor(inside + 0.5)
    above = u.clamp(min=qmax + 0.5) - qmax  # >= 1/2: distance to qmax past the last rounding step
    below = u.clamp(max=qmin - 0.5) - qmin  # <= -1/2
    return k / 12.0 + ((inside - k) ** 3 + above**3 + below**3) / 3.0


def expected_fq_error(h: Histograms, lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Expected sum of (x - fake_quantize(x))^2 over the histogram's mass for ranges [lo, hi] (C, K) -> (C, K).

    Uses the spec's real grid (qparams_from_minmax: rounded zero point, clamp to [qmin, qmax]) and
    integrates the error over each bin, assuming a uniform density inside it.
    """
    scale, zero_point = qparams_from_minmax(lo, hi, spec)
    s, z = scale.double()[..., None], zero_point.double()[..., None]  # (C, K, 1)
    integral = _rounding_error_integral(h.edges()[:, None, :] / s + z, spec.qmin, spec.qmax)  # (C, K, B+1)
    per_bin_mean = integral.diff(dim=-1) * (s / h.bin_width[:, None, None])  # mean of e over each bin
    return (per_bin_mean * h.counts[:, None, :]).sum(-1) * s[..., 0] ** 2


def _chunked(total: int, per_item: int):
    step = max(1, CHUNK_ELEMENTS // max(per_item, 1))
    return (slice(i, i + step) for i in range(0, total, step))


@dataclass(frozen=True)
class ShrinkGrid:
    """Shrink factors tried by the MSE search: `count` on a geometric grid in [min_shrink, 1], then `count`
    on a linear grid between the best one's neighbours."""

    count: int
    min_shrink: float

    def coarse(self, channels: int, device) -> torch.Tensor:
        grid = torch.logspace(0.0, math.log10(self.min_shrink), self.count, device=device, dtype=torch.float64)
        return grid.expand(channels, -1)  # (C, K)

    def refined(self, best: torch.Tensor) -> torch.Tensor:
        ratio = (1.0 / self.min_shrink) ** (1.0 / max(self.count - 1, 1))
        left, right = best / ratio, (best * ratio).clamp(max=1.0)  # (C, 1)
        return left + (right - left) * torch.linspace(0.0, 1.0, self.count, device=best.device, dtype=torch.float64)


def _best_factor(h: Histograms, spec: QuantSpec, lo, hi, shrink_lo: bool, shrink_hi: bool, grid: ShrinkGrid):
    """The factor f (C, 1) minimising the expected error of [lo * f, hi * f], scaling only the chosen sides."""

    def argmin_of(factors: torch.Tensor) -> torch.Tensor:  # (C, K) -> (C, 1)
        errors = []
        for part in _chunked(factors.shape[1], h.counts.shape[0] * (h.bins + 1)):
            f, unchanged = factors[:, part], torch.ones_like(factors[:, part])
            lo_f, hi_f = (f if shrink_lo else unchanged), (f if shrink_hi else unchanged)
            errors.append(expected_fq_error(h, lo * lo_f, hi * hi_f, spec))
        return factors.gather(1, torch.cat(errors, dim=1).argmin(dim=1, keepdim=True))

    return argmin_of(grid.refined(argmin_of(grid.coarse(h.counts.shape[0], h.counts.device))))


def mse_range(h: Histograms, spec: QuantSpec, grid: ShrinkGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """Range minimising the expected fake-quant MSE among shrunk versions of the histogram's span.

    Symmetric: +-max|x| shrunk by one factor. Asymmetric: the two ends shrunk independently, by
    coordinate descent (the max with the min fixed, then the min, twice).

    >>> x = torch.cat([torch.randn(100_000), torch.tensor([100.0])])  # rounding x100000 vs clipping x1
    >>> h = Histograms(torch.histc(x, 2048, -100, 100)[None].double(), torch.tensor([-100.0]), torch.tensor([100.0]))
    >>> lo, hi = mse_range(h, QuantSpec(symmetric=True), ShrinkGrid(100, 1e-3))
    >>> 60.0 < hi.item() < 75.0 and lo.item() == -hi.item()
    True
    """
    lo, hi = h.lo.double()[:, None], h.hi.double()[:, None]  # (C, 1)
    if spec.symmetric:
        amax = torch.maximum(-lo, hi)
        amax = amax * _best_factor(h, spec, -amax, amax, True, True, grid)
        return (-amax[:, 0]).float(), amax[:, 0].float()
    best_lo, best_hi = lo, hi
    for _ in range(2):
        best_hi = hi * _best_factor(h, spec, best_lo, hi, False, True, grid)
        best_lo = lo * _best_factor(h, spec, lo, best_hi, True, False, grid)
    return best_lo[:, 0].float(), best_hi[:, 0].float()


def _kl_divergences(h: Histograms, start: torch.Tensor, stop: torch.Tensor, levels: int) -> torch.Tensor:
    """KL(P || Q) per candidate bin window [start, stop) (C, K) -> (C, K), TensorRT style.

    P: the window's counts with the mass outside folded into its end bins. Q: the window's own counts
    merged into `levels` groups of (near) equal width, each group's sum spread evenly over the bins
    where P is non-zero; where that leaves Q zero (outliers folded into an empty group) it gets
    KL_SMOOTHING counts, as MXNet's and TVM's KL calibrators smooth, instead of an infinite divergence.
    """
    k = torch.arange(h.bins, device=h.counts.device)  # (B,)
    start, stop = start[..., None], stop[..., None]  # (C, K, 1)
    inside = (k >= start) & (k < stop)  # (C, K, B)
    counts = h.counts[:, None, :]  # (C, 1, B)
    cum = h.cumulative()[:, None, :].expand(-1, start.shape[1], -1)  # (C, K, B+1)
    below, above = cum.gather(2, start), cum[..., -1:] - cum.gather(2, stop)  # (C, K, 1)
    window = torch.where(inside, counts, 0.0)
    p = window + (k == start) * below + (k == stop - 1) * above
    group = (((k - start) * levels) // (stop - start)).clamp(0, levels - 1)  # (C, K, B)
    nonzero = inside & (p > 0)
    group_sum = torch.zeros(*group.shape[:2], levels, dtype=torch.float64, device=k.device)
    group_sum.scatter_add_(2, group, window)
    group_nonzero = torch.zeros_like(group_sum).scatter_add_(2, group, nonzero.double())
    q = torch.where(nonzero, group_sum.gather(2, group) / group_nonzero.gather(2, group).clamp(min=1.0), 0.0)
    q = torch.where(nonzero, q.clamp(min=KL_SMOOTHING), q)  # folded outliers in an empty group: finite KL
    p, q = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    return torch.where(nonzero, p * (torch.log(p.clamp(min=1e-300)) - torch.log(q.clamp(min=1e-300))), 0.0).sum(-1)


def _spread(first: torch.Tensor, last: torch.Tensor, count: int) -> torch.Tensor:
    """`count` integers evenly spaced from first to last (C, 1) -> (C, K)."""
    steps = torch.linspace(0.0, 1.0, count, device=first.device, dtype=torch.float64)
    return (first + (last - first) * steps).round().long()


def _best_window(h: Histograms, start: torch.Tensor, stop: torch.Tensor, levels: int):
    """The (start, stop) pair, each (C, 1), of least KL divergence among candidate windows (C, K)."""
    start, stop = torch.broadcast_tensors(start, stop)
    divergences = torch.cat([
        _kl_divergences(h, start[:, part], stop[:, part], levels)
        for part in _chunked(start.shape[1], h.counts.shape[0] * h.bins)
    ], dim=1)  # (C, K)
    best = divergences.argmin(dim=1, keepdim=True)
    return start.gather(1, best), stop.gather(1, best)


def _without_zero_bin(h: Histograms, zero: torch.Tensor) -> Histograms:
    """Drop the bin holding 0.0: zero is exactly representable, and the spike of exact zeros after a ReLU
    would otherwise dominate the divergence and pull the threshold far in (seen: ReLU(N(0,1)) clipped at 1.7)."""
    counts = h.counts.clone()
    index = torch.clamp(zero.floor().long(), 0, h.bins - 1)  # (C, 1)
    counts.scatter_(1, index, 0.0)
    return Histograms(counts, h.lo, h.hi)


def entropy_range(h: Histograms, spec: QuantSpec, max_candidates: int) -> tuple[torch.Tensor, torch.Tensor]:
    """KL-divergence calibration (TensorRT): the bin window whose quantized version loses the least.

    Symmetric: windows [0, i) of the |x| histogram, i from the number of positive levels (2^(bits-1))
    up to all bins. Asymmetric: windows of at least 2^bits bins containing zero, the upper end chosen
    first (lower end at the span's min), then the lower end. At most `max_candidates` ends are tried
    per step, evenly strided.

    >>> x = torch.cat([torch.randn(10000), torch.tensor([100.0])])
    >>> h = Histograms(torch.histc(x, 2048, -100, 100)[None].double(), torch.tensor([-100.0]), torch.tensor([100.0]))
    >>> lo, hi = entropy_range(h, QuantSpec(symmetric=True), 256)
    >>> hi.item() < 10.0 and lo.item() == -hi.item()
    True
    """
    levels = spec.qmax - spec.qmin + 1
    if spec.symmetric:
        h, levels = h.fold_abs(), levels // 2
    bins, count = h.bins, min(max_candidates, h.bins)
    narrowest = min(levels, bins)
    zero = (-h.lo.double() / h.bin_width)[:, None]  # (C, 1) fractional bin index of 0.0
    h = _without_zero_bin(h, zero)
    first = torch.zeros_like(zero, dtype=torch.long)
    lowest_stop = torch.clamp(zero.ceil().long(), min=narrowest)
    _, stop = _best_window(h, first, _spread(lowest_stop, torch.full_like(first, bins), count), levels)
    last_start = torch.minimum(zero.floor().long(), stop - narrowest)
    start_count = min(count, int(last_start.max()) + 1)  # 1 for |x| or all-positive data: start stays 0
    start, stop = _best_window(h, _spread(first, last_start, start_count), stop, levels)
    lo, hi = h.lo.double() + start[:, 0] * h.bin_width, h.lo.double() + stop[:, 0] * h.bin_width
    if spec.symmetric:
        return (-hi).float(), hi.float()
    return lo.float(), hi.float()
