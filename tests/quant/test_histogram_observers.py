"""Histogram observers: histogram bookkeeping, clipping quality against min-max, per-channel, state."""
import doctest
import time

import pytest
import torch

from qat.quant import histogram, range_search
from qat.quant.affine import fake_quantize, qparams_from_minmax
from qat.quant.histogram import EntropyObserver, HistogramObserver, MSEObserver, PercentileObserver
from qat.quant.observers import MinMaxObserver
from qat.quant.range_search import Histograms, expected_fq_error
from qat.quant.spec import Granularity, QuantSpec

SYM_S8 = QuantSpec(bits=8, signed=True, symmetric=True)
ASYM_U8 = QuantSpec(bits=8, signed=False)
SPECS = {"s8_sym": SYM_S8, "u8_asym": ASYM_U8, "s4_sym_narrow": QuantSpec(bits=4, symmetric=True, narrow_range=True)}
CLIPPING = {
    "percentile": lambda spec, bins=2048: PercentileObserver(spec, percentile=99.99, bins=bins),
    "mse": lambda spec, bins=2048: MSEObserver(spec, bins=bins),
    "entropy": lambda spec, bins=2048: EntropyObserver(spec, bins=bins),
}
ALL = {"histogram": lambda spec, bins=2048: HistogramObserver(spec, bins=bins), **CLIPPING}


def per_channel(spec: QuantSpec, axis: int = 0) -> QuantSpec:
    return spec.with_(granularity=Granularity.PER_CHANNEL, axis=axis)


def fq_mse(observer, x: torch.Tensor, spec: QuantSpec, on: torch.Tensor | None = None) -> float:
    """Mean squared fake-quant error of x (or of x[on]) with the observer's qparams."""
    scale, zero_point = observer.calculate_qparams()
    err = (x - fake_quantize(x, scale, zero_point, spec)) ** 2
    return (err if on is None else err[on]).mean().item()


def observed(factory, spec, *batches, bins=2048):
    obs = factory(spec, bins=bins)
    for x in batches:
        obs(x)
    return obs


def with_outlier(n: int = 100_000, outlier: float = 1000.0) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.cat([torch.randn(n), torch.tensor([outlier])])
    bulk = torch.ones_like(x, dtype=torch.bool)
    bulk[-1] = False
    return x, bulk


# --- histogram bookkeeping ------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [SYM_S8, per_channel(SYM_S8, axis=1)], ids=["tensor", "channel_axis1"])
def test_total_count_equals_observed_elements(spec):
    batches = [torch.randn(4, 8, 5) * (1 + i) for i in range(4)]  # growing range: re-binned 3 times
    obs = observed(ALL["histogram"], spec, *batches, bins=256)
    totals = obs.histogram.sum(-1)  # () per-tensor, (8,) per-channel
    expected = 4 * 4 * 5 if spec.is_per_channel else 4 * 8 * 4 * 5
    torch.testing.assert_close(totals, torch.full_like(totals, expected), rtol=1e-12, atol=0)


def test_counts_are_exact_integers_without_growth():
    x = torch.randn(10_000)
    obs = observed(ALL["histogram"], SYM_S8, x, x[:3000], x[5000:])
    assert obs.histogram.sum().item() == 10_000 + 3000 + 5000
    assert torch.equal(obs.histogram, obs.histogram.round())
    everything = torch.cat([x, x[:3000], x[5000:]])
    expected = torch.histc(everything, 2048, x.min().item(), x.max().item()).double()
    assert (obs.histogram - expected).abs().sum() <= 6  # histc may place a value on an edge one bin off


def test_growing_range_rebins_without_losing_counts():
    small, wide = torch.rand(20_000) * 2 - 1, torch.rand(20_000) * 20 - 10  # [-1, 1] then [-10, 10]
    obs = observed(ALL["histogram"], ASYM_U8, small, wide, bins=200)
    once = observed(ALL["histogram"], ASYM_U8, torch.cat([small, wide]), bins=200)
    assert obs.hist_min.item() == once.hist_min.item() and obs.hist_max.item() == once.hist_max.item()
    assert obs.histogram.sum().item() == pytest.approx(40_000, rel=1e-12)
    # the re-binned counts match binning everything at once, up to the mass of the bins a re-binned bin straddles
    gap = (obs.histogram.cumsum(0) - once.histogram.cumsum(0)).abs().max().item()
    assert gap <= once.histogram.max().item()
    inside = obs.histograms().cdf_at(torch.tensor([[1.0]])) - obs.histograms().cdf_at(torch.tensor([[-1.0]]))
    assert inside.item() == pytest.approx(20_000 + 2_000, rel=0.05)  # all of `small`, a tenth of `wide`


def test_per_channel_histograms_equal_per_tensor_ones():
    batches = [torch.randn(6, 3, 7) * torch.tensor([0.1, 1.0, 10.0])[:, None] * (1 + i) for i in range(3)]
    spec = per_channel(ASYM_U8, axis=1)
    channels = observed(ALL["histogram"], spec, *batches, bins=64)
    for c in range(3):
        alone = observed(ALL["histogram"], ASYM_U8, *(b[:, c] for b in batches), bins=64)
        torch.testing.assert_close(channels.histogram[c], alone.histogram, rtol=1e-12, atol=1e-9)
        assert channels.min_val[c] == alone.min_val and channels.max_val[c] == alone.max_val


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_raises(name, bad):
    obs = ALL[name](SYM_S8)
    with pytest.raises(FloatingPointError, match="non-finite"):
        obs(torch.tensor([0.0, bad, 1.0]))


def test_histogram_observer_range_is_minmax():
    x = torch.randn(3, 50) + torch.tensor([[-5.0], [0.0], [5.0]])
    for spec in (ASYM_U8, per_channel(ASYM_U8)):
        hist, minmax = observed(ALL["histogram"], spec, x), MinMaxObserver(spec)
        minmax(x)
        for a, b in zip(hist.range(), minmax.range()):
            assert torch.equal(a, b)


# --- clipping quality -----------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [SYM_S8, ASYM_U8], ids=["s8_sym", "u8_asym"])
def test_percentile_clips_an_outlier(spec):
    x, bulk = with_outlier()
    pct, minmax = observed(CLIPPING["percentile"], spec, x), MinMaxObserver(spec)
    minmax(x)
    lo, hi = pct.range()
    assert 3.0 < hi.item() < 5.0 and -5.0 < lo.item() < -3.0
    if spec.symmetric:
        assert lo.item() == -hi.item()
    assert fq_mse(pct, x, spec, bulk) < fq_mse(minmax, x, spec, bulk) / 100


def test_percentile_matches_torch_quantile():
    x = torch.randn(50_000).exp()  # skewed
    obs = PercentileObserver(ASYM_U8, percentile=99.0, bins=2048)
    obs(x)
    width = (obs.hist_max - obs.hist_min).item() / 2048
    assert obs.range()[1].item() == pytest.approx(torch.quantile(x, 0.99).item(), abs=width)
    assert obs.range()[0].item() == x.min().item()  # all-positive data: the min is not clipped


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS)
@pytest.mark.parametrize("dist", ["student_t2", "laplace"])
def test_mse_beats_minmax_on_heavy_tails_and_is_near_optimal(spec, dist):
    sampler = {"student_t2": torch.distributions.StudentT(2.0), "laplace": torch.distributions.Laplace(0.0, 1.0)}
    x = sampler[dist].sample((50_000,))
    mse, minmax = observed(CLIPPING["mse"], spec, x), MinMaxObserver(spec)
    minmax(x)
    assert fq_mse(mse, x, spec) < fq_mse(minmax, x, spec)
    lo, hi = minmax.range()
    if spec.symmetric:
        lo, hi = -torch.maximum(-lo, hi), torch.maximum(-lo, hi)
    assert fq_mse(mse, x, spec) <= brute_force_best_shrink(x, lo, hi, spec) * 1.01


def brute_force_best_shrink(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> float:
    """Least real fake-quant MSE of x over ranges [lo * f, hi * f], f on a fine geometric grid."""
    shrink = torch.logspace(0, -3, 400)
    scale, zero_point = qparams_from_minmax(lo * shrink, hi * shrink, spec)  # (400,) each
    copies = x.expand(400, -1)  # row k quantized with range k, as channels of a per-channel spec
    errors = ((copies - fake_quantize(copies, scale, zero_point, per_channel(spec))) ** 2).mean(dim=1)
    return errors.min().item()


def test_mse_shrinks_the_ends_of_an_asymmetric_range_independently():
    x, _ = with_outlier(outlier=100.0)
    lo, hi = observed(CLIPPING["mse"], ASYM_U8, x).range()
    assert lo.item() < -3.2 and 30.0 < hi.item() < 90.0  # one shared factor: lo = -4.3 * hi / 100


class _Fixed:
    def __init__(self, lo, hi, spec):
        self.qparams = qparams_from_minmax(lo, hi, spec)

    def calculate_qparams(self):
        return self.qparams


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS)
def test_expected_error_matches_real_fake_quant_error(spec):
    x = torch.randn(200_000) * 2 + 0.5
    h = Histograms(torch.histc(x, 4096, -12, 12)[None].double(), torch.tensor([-12.0]), torch.tensor([12.0]))
    shrink = torch.tensor([[1.0, 0.5, 0.25, 0.1, 0.02]], dtype=torch.float64)
    estimated = expected_fq_error(h, -12 * shrink, 12 * shrink, spec)[0]
    for f, est in zip(shrink[0].tolist(), estimated.tolist()):
        real = fq_mse(_Fixed(torch.tensor(-12 * f), torch.tensor(12 * f), spec), x, spec) * x.numel()
        assert est == pytest.approx(real, rel=0.03)


@pytest.mark.parametrize("spec", [SYM_S8, ASYM_U8], ids=["s8_sym", "u8_asym"])
def test_entropy_range_inside_minmax_and_beats_it_on_an_outlier(spec):
    x, bulk = with_outlier()
    ent, minmax = observed(CLIPPING["entropy"], spec, x), MinMaxObserver(spec)
    minmax(x)
    (lo, hi), (mn, mx) = ent.range(), minmax.range()
    assert mn <= lo <= 0 <= hi <= mx and hi < mx / 5  # narrowest window: 2^(bits-1) or 2^bits of 2048 bins
    assert lo < -3.0  # the outlier is on the right: the left end is not pulled in with it
    assert fq_mse(ent, x, spec, bulk) < fq_mse(minmax, x, spec, bulk) / 20  # TensorRT's window: >= 1/16 of the span


def test_entropy_keeps_the_range_of_uniform_data():
    x = torch.rand(200_000) * 2 - 1  # nothing to clip: clipping folds mass into a spike the grid cannot keep
    lo, hi = observed(CLIPPING["entropy"], SYM_S8, x).range()
    assert hi.item() > 0.97 * x.abs().max().item()


@pytest.mark.parametrize("spec", [SYM_S8, ASYM_U8], ids=["s8_sym", "u8_asym"])
def test_entropy_is_fast_for_2048_bins(spec):
    obs = observed(CLIPPING["entropy"], spec, torch.randn(100_000))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CPU time of one thread: not inflated by other processes on a busy machine
    try:
        start = time.process_time()
        obs.range()
        assert time.process_time() - start < 1.0
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", CLIPPING)
def test_relu_activations_keep_min_zero(name):
    x = torch.relu(torch.randn(50_000))
    x[7] = 50.0
    obs = observed(CLIPPING[name], ASYM_U8, x)
    lo, hi = obs.range()
    assert lo.item() == 0.0 and 0.0 < hi.item() < 50.0
    assert obs.calculate_qparams()[1].item() == 0


# --- per-channel, state, validation ---------------------------------------------------------------------


@pytest.mark.parametrize("name", CLIPPING)
def test_per_channel_weights_get_one_range_per_channel(name):
    w = torch.randn(64, 3, 3, 3) * torch.linspace(0.01, 2.0, 64)[:, None, None, None]
    w[5, 0, 0, 0] = 40.0  # one channel with an outlier
    spec = per_channel(SYM_S8)
    obs, minmax = observed(CLIPPING[name], spec, w, bins=256), MinMaxObserver(spec)
    minmax(w)
    (lo, hi), (mn, mx) = obs.range(), minmax.range()
    assert lo.shape == hi.shape == (64,) and obs.calculate_qparams()[0].shape == (64,)
    assert bool(((mn <= lo) & (lo <= hi) & (hi <= mx)).all())
    for c in (0, 5, 63):  # the vectorised search agrees with one channel searched alone
        alone = observed(CLIPPING[name], SYM_S8, w[c], bins=256).range()
        torch.testing.assert_close((lo[c], hi[c]), alone, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("spec", [ASYM_U8, per_channel(SYM_S8)], ids=["tensor", "channel"])
def test_state_dict_round_trip_without_forward(name, spec):
    x = torch.randn(8, 4, 6) * 3
    trained = observed(ALL[name], spec, x, x * 2, bins=128)
    fresh = ALL[name](spec, bins=128)
    fresh.load_state_dict(trained.state_dict())
    for a, b in zip(fresh.calculate_qparams(), trained.calculate_qparams()):
        assert torch.equal(a, b)
    fresh(x * 5), trained(x * 5)  # and observation continues identically
    assert torch.equal(fresh.histogram, trained.histogram)


@pytest.mark.parametrize("name", ALL)
def test_all_zero_input_gives_finite_qparams(name):
    obs = observed(ALL[name], ASYM_U8, torch.zeros(100))
    scale, zero_point = obs.calculate_qparams()
    assert torch.isfinite(scale) and scale.item() > 0 and zero_point.item() == 0
    assert obs.histogram.sum().item() == 100


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: HistogramObserver(SYM_S8, bins=1), "bins"),
        (lambda: PercentileObserver(SYM_S8, percentile=30.0), "percentile"),
        (lambda: MSEObserver(SYM_S8, candidates=1), "candidates"),
        (lambda: MSEObserver(SYM_S8, min_shrink=1.0), "min_shrink"),
        (lambda: EntropyObserver(SYM_S8, max_candidates=0), "max_candidates"),
        (lambda: EntropyObserver(QuantSpec(granularity="per_token")), "per-tensor or per-channel"),
    ],
)
def test_invalid_arguments_are_rejected(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_no_data_is_an_error():
    with pytest.raises(RuntimeError, match="no data"):
        MSEObserver(SYM_S8).calculate_qparams()


@pytest.mark.parametrize("module", [histogram, range_search], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.gpu
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("spec", [ASYM_U8, per_channel(SYM_S8)], ids=["tensor", "channel"])
def test_cuda_matches_cpu(name, spec):
    batches = [torch.randn(16, 8, 9, 9) * 3, torch.randn(16, 8, 9, 9) * 12]
    cpu = observed(ALL[name], spec, *batches, bins=512)
    gpu = observed(lambda s, bins: ALL[name](s, bins=bins).cuda(), spec, *(b.cuda() for b in batches), bins=512)
    torch.testing.assert_close(gpu.histogram.cpu(), cpu.histogram, rtol=1e-9, atol=1e-9)
    for on_gpu, on_cpu in zip(gpu.calculate_qparams(), cpu.calculate_qparams()):
        assert on_gpu.is_cuda
        torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=1e-4, atol=0)


def test_entropy_is_not_pulled_in_by_the_zero_spike_of_relu_outputs():
    """Half the mass of ReLU(N(0,1)) is exact zeros, which cost nothing; the KL window must still cover ~3.5 sigma."""
    torch.manual_seed(0)
    x = torch.randn(200_000).relu()
    for spec in (QuantSpec(signed=False), QuantSpec(symmetric=True)):
        observer = EntropyObserver(spec)
        observer(x)
        lo, hi = observer.range()
        assert lo.item() == 0.0 and 3.0 < hi.item() <= x.max().item()
