import pytest
import torch

from qat.quant.observers import MinMaxObserver, MovingAverageMinMaxObserver
from qat.quant.spec import QuantSpec

PER_CHANNEL = QuantSpec(symmetric=True, granularity="per_channel")


def test_minmax_tracks_running_extremes():
    obs = MinMaxObserver(QuantSpec(signed=False))
    obs(torch.tensor([-1.0, 2.0]))
    obs(torch.tensor([0.5, 3.0]))
    assert (obs.min_val.item(), obs.max_val.item()) == (-1.0, 3.0)
    s, z = obs.calculate_qparams()
    assert s.item() == pytest.approx(4 / 255) and z.item() == 64


def test_per_channel_minmax():
    w = torch.randn(5, 3, 3, 3)
    obs = MinMaxObserver(PER_CHANNEL)
    obs(w)
    torch.testing.assert_close(obs.max_val, w.flatten(1).amax(1))
    scale, zero = obs.calculate_qparams()
    assert scale.shape == (5,) and zero.eq(0).all()
    torch.testing.assert_close(scale, w.flatten(1).abs().amax(1) / 127.5)


def test_moving_average_blends_batches():
    obs = MovingAverageMinMaxObserver(QuantSpec(), momentum=0.25)
    obs(torch.tensor([-4.0, 4.0]))
    obs(torch.tensor([0.0, 8.0]))
    assert obs.min_val.item() == pytest.approx(-3.0) and obs.max_val.item() == pytest.approx(5.0)
    with pytest.raises(ValueError, match="momentum"):
        MovingAverageMinMaxObserver(QuantSpec(), momentum=0.0)


@pytest.mark.parametrize("observer", [MinMaxObserver, MovingAverageMinMaxObserver])
def test_nan_input_is_named(observer):
    with pytest.raises(FloatingPointError, match="NaN"):
        observer(QuantSpec())(torch.tensor([1.0, float("nan")]))


def test_no_data_is_named_and_dynamic_granularity_rejected():
    with pytest.raises(RuntimeError, match="seen no data"):
        MinMaxObserver(QuantSpec()).calculate_qparams()
    with pytest.raises(ValueError, match="per_token"):
        MinMaxObserver(QuantSpec(granularity="per_token"))


def test_state_dict_restores_per_channel_shape_without_forward():
    obs = MinMaxObserver(PER_CHANNEL)
    obs(torch.randn(7, 4))
    fresh = MinMaxObserver(PER_CHANNEL)
    fresh.load_state_dict(obs.state_dict())
    assert fresh.has_data and fresh.min_val.shape == (7,)
    for a, b in zip(fresh.calculate_qparams(), obs.calculate_qparams()):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("observer", [MinMaxObserver, MovingAverageMinMaxObserver])
def test_nan_on_gpu_is_kept_in_the_range_and_reported_by_check_finite(observer):
    """On a GPU the running observers do not wait for the device each batch: NaN lands in the range and
    check_finite (run when qparams settle) names it."""
    obs = observer(QuantSpec()).cuda()
    obs(torch.tensor([1.0, 2.0], device="cuda"))
    obs(torch.tensor([1.0, float("nan")], device="cuda"))  # no host synchronisation, no error yet
    with pytest.raises(FloatingPointError, match="non-finite"):
        obs.check_finite()


def test_check_finite_passes_on_finite_ranges():
    obs = MovingAverageMinMaxObserver(QuantSpec())
    obs(torch.tensor([-1.0, 2.0]))
    obs.check_finite()
    obs.min_val.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="MovingAverageMinMaxObserver saw non-finite"):
        obs.check_finite()
