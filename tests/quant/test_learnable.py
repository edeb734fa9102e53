import math

import pytest
import torch

from qat.quant.affine import fake_quantize
from qat.quant.learnable import lsq_fake_quantize, lsq_grad_scale, pact_fake_quantize, pact_scale
from qat.quant.spec import QuantSpec


def _lsq_closed_form(x, s, z, qmin, qmax, g):
    """Esser et al. 2020 (eq. 3) plus LSQ+'s offset gradient, written per element."""
    d_s, d_z, d_x = 0.0, 0.0, []
    for v in (x / s).tolist():
        code = round(v) + z
        if code < qmin:
            d_s, d_z = d_s + (qmin - z), d_z - s
            d_x.append(0.0)
        elif code > qmax:
            d_s, d_z = d_s + (qmax - z), d_z - s
            d_x.append(0.0)
        else:
            d_s += round(v) - v
            d_x.append(1.0)
    return torch.tensor(d_x), d_s * g, d_z * g


@pytest.mark.parametrize("bits, signed", [(8, False), (4, True), (2, True), (4, False)])
def test_lsq_gradients_match_closed_form(bits, signed):
    spec = QuantSpec(bits=bits, signed=signed)
    x = (torch.randn(200) * 2).requires_grad_()
    s = torch.tensor(0.15, requires_grad=True)
    z = torch.tensor(3.0 if not signed else 0.0, requires_grad=True)
    g = lsq_grad_scale(x, spec)
    assert g == pytest.approx(1 / math.sqrt(200 * spec.qmax))
    lsq_fake_quantize(x, s, z, spec).sum().backward()
    d_x, d_s, d_z = _lsq_closed_form(x.detach(), 0.15, round(z.item()), spec.qmin, spec.qmax, g)
    assert torch.equal(x.grad, d_x)
    assert s.grad.item() == pytest.approx(d_s, rel=1e-4, abs=1e-6)
    assert z.grad.item() == pytest.approx(d_z, rel=1e-4, abs=1e-6)


def test_lsq_forward_equals_fixed_fake_quant():
    spec = QuantSpec(bits=4, signed=False)
    x = torch.randn(1000)
    s, z = torch.tensor(0.07), torch.tensor(5.0)
    fixed = fake_quantize(x, s, z.to(torch.int32), spec)
    assert torch.equal(lsq_fake_quantize(x, s, z, spec), fixed)


@pytest.mark.parametrize("qrange", [(0, 255), (-128, 127), (0, 15), (-8, 7)])
def test_lsq_matches_torch_learnable_per_tensor(qrange):
    qmin, qmax = qrange
    spec = QuantSpec(bits=8 if qmax > 15 else 4, signed=qmin < 0)
    x1 = (torch.randn(4096) * 3).requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    s1, z1 = torch.tensor([0.05], requires_grad=True), torch.tensor([2.0], requires_grad=True)
    s2, z2 = s1.detach().clone().requires_grad_(), z1.detach().clone().requires_grad_()
    g = lsq_grad_scale(x1, spec)
    ours = lsq_fake_quantize(x1, s1, z1, spec, grad_scale=g)
    theirs = torch._fake_quantize_learnable_per_tensor_affine(x2, s2, z2, qmin, qmax, g)
    assert torch.equal(ours, theirs)
    grad = torch.randn_like(ours)
    ours.backward(grad)
    theirs.backward(grad)
    assert torch.equal(x1.grad, x2.grad)
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(z1.grad, z2.grad, rtol=1e-4, atol=1e-6)


def test_lsq_matches_torch_learnable_per_channel():
    spec = QuantSpec(bits=4, signed=True, symmetric=True, granularity="per_channel")
    w = torch.randn(8, 16, 3, 3)
    s = (w.flatten(1).abs().amax(1) / 7).requires_grad_()
    zero = torch.zeros(8)
    w1, w2 = w.clone().requires_grad_(), w.clone().requires_grad_()
    s2 = s.detach().clone().requires_grad_()
    g = lsq_grad_scale(w, spec)
    assert g == pytest.approx(1 / math.sqrt(16 * 9 * 7))
    ours = lsq_fake_quantize(w1, s, None, spec, grad_scale=g)
    theirs = torch._fake_quantize_learnable_per_channel_affine(w2, s2, zero, 0, -8, 7, g)
    assert torch.equal(ours, theirs)
    ours.sum().backward()
    theirs.sum().backward()
    assert torch.equal(w1.grad, w2.grad)
    torch.testing.assert_close(s.grad, s2.grad, rtol=1e-4, atol=1e-6)


def test_pact_gradients_closed_form():
    spec = QuantSpec(bits=4, signed=False)
    x = torch.tensor([-1.0, 0.3, 1.2, 2.5, 4.0], requires_grad=True)
    alpha = torch.tensor(2.0, requires_grad=True)
    y = pact_fake_quantize(x, alpha, spec)
    s = 2.0 / 15
    expected = [0.0, round(0.3 / s) * s, round(1.2 / s) * s, 2.0, 2.0]
    torch.testing.assert_close(y, torch.tensor(expected))
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0, 0.0]
    assert alpha.grad.item() == 2.0  # two inputs above alpha
    assert pact_scale(alpha, spec).item() == pytest.approx(s)


def test_signed_pact_clips_both_sides():
    spec = QuantSpec(bits=4, signed=True, symmetric=True)
    x = torch.tensor([-5.0, -0.5, 0.5, 3.0], requires_grad=True)
    alpha = torch.tensor(1.0, requires_grad=True)
    y = pact_fake_quantize(x, alpha, spec)
    assert y[0].item() == pytest.approx(-1.0) and y[-1].item() == pytest.approx(1.0)
    y.sum().backward()
    assert alpha.grad.item() == 0.0  # +1 above, -1 below
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="symmetric"):
        pact_fake_quantize(x, alpha, QuantSpec(bits=4, signed=True))


@pytest.mark.parametrize("learned_zero", [False, True])
def test_per_tensor_cpu_fast_path_equals_the_generic_autograd(learned_zero):
    """The few-pass CPU kernel (fused forward, dot-product scale gradient) against _LSQ on a channels_last
    activation: same values, same input gradients, scale / zero-point gradients to float tolerance."""
    from qat.quant.learnable import _LSQ

    torch.manual_seed(1)
    x = (torch.randn(4, 8, 6, 6) * 2).to(memory_format=torch.channels_last)
    grad = torch.randn(4, 8, 6, 6)  # contiguous: a layout other than x's
    results = []
    for fast in (True, False):
        xi = x.clone().requires_grad_()
        s = torch.tensor(0.07, requires_grad=True)
        z = torch.tensor(3.3, requires_grad=learned_zero)
        spec = QuantSpec(bits=4, signed=False)
        if fast:
            y = lsq_fake_quantize(xi, s, z, spec, grad_scale=0.5)
        else:
            y = _LSQ.apply(xi, s, z, spec.qmin, spec.qmax, 0.5)
        y.backward(grad)
        results.append((y.detach(), xi.grad, s.grad, z.grad))
    (y1, gx1, gs1, gz1), (y2, gx2, gs2, gz2) = results
    assert torch.equal(y1, y2) and torch.equal(gx1, gx2)
    assert torch.allclose(gs1, gs2, rtol=1e-5, atol=1e-6)
    assert (gz1 is None and gz2 is None) or torch.allclose(gz1, gz2, rtol=1e-5, atol=1e-6)


def test_per_tensor_cpu_path_allows_in_place_ops_on_its_output():
    """Networks with inplace activations (Hardswish, SiLU) modify the quantizer's output before backward."""
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    s = torch.tensor(0.1, requires_grad=True)
    y = lsq_fake_quantize(x, s, None, QuantSpec(bits=4, signed=True))
    torch.nn.functional.hardswish(y, inplace=True).sum().backward()
    assert torch.isfinite(s.grad) and x.grad.shape == x.shape
