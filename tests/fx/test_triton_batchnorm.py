"""The per-channel arithmetic kernel of the folded Conv-BN training step equals its torch ops: invstd of BN
of y from y_scaled's statistics, and the running statistics' update. Natively on CUDA; interpreted on CPU
tensors elsewhere."""
import pytest
import torch

from qat.fx.modules import _RunningStats

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("conv_bias", [False, True], ids=["no_bias", "bias"])
def test_finish_batch_stats_equals_torch_ops(fused_module, conv_bias):
    from qat.fx.triton_batchnorm import finish_batch_stats

    channels, count, eps, momentum = 37, 50, 1e-5, 0.1
    mean = torch.randn(channels, device=DEVICE)
    var = torch.rand(channels, device=DEVICE) * 3
    var[5] = 0.0  # a constant channel: the statistics kernel reports invstd 0 (eps 0)
    invstd0 = torch.where(var > 0, var.rsqrt(), torch.zeros_like(var))
    factor = torch.randn(channels, device=DEVICE) * 2
    bias = torch.randn(channels, device=DEVICE) if conv_bias else None
    start_mean, start_var = torch.randn(channels, device=DEVICE), torch.rand(channels, device=DEVICE) + 0.5

    running_mean, running_var = start_mean.clone(), start_var.clone()
    gamma = torch.randn(channels, device=DEVICE)
    gamma[3] = 0.0
    invstd, abs_gamma = finish_batch_stats(mean, invstd0, factor, eps, running_mean, running_var, bias, momentum,
                                           count, gamma)
    assert torch.equal(abs_gamma, gamma.abs())

    expected = _RunningStats(start_mean.clone(), start_var.clone(), momentum, bias)
    var_from_invstd = torch.where(invstd0 > 0, invstd0.pow(-2), 0.0)
    expected.update(mean, var_from_invstd, factor, count)
    torch.testing.assert_close(invstd, torch.rsqrt(var_from_invstd + eps * factor * factor), rtol=1e-6, atol=0)
    torch.testing.assert_close(running_mean, expected.mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(running_var, expected.var, rtol=1e-6, atol=1e-7)
    assert not torch.equal(running_var, start_var)


@pytest.mark.parametrize("wanted", [(True, True), (True, False), (False, True)], ids=["both", "gamma", "factor"])
def test_scale_grads_equal_torch_ops(fused_module, wanted):
    """The backward kernel gives gamma and f the gradients that autograd of |gamma| and the eps term's torch
    ops give, bit for bit (the same products in the same order)."""
    from qat.fx.triton_batchnorm import scale_grads

    channels, eps = 45, 1e-5
    grad_abs_gamma = torch.randn(channels, device=DEVICE)
    gamma = torch.randn(channels, device=DEVICE)
    gamma[7] = 0.0  # sgn(0) = 0
    factor = torch.randn(channels, device=DEVICE)
    invstd = torch.rand(channels, device=DEVICE) * 4 + 0.1
    grad_gamma, grad_factor = scale_grads(grad_abs_gamma, gamma, factor, invstd, eps, *wanted)
    leaf = gamma.clone().requires_grad_()
    (leaf.abs() * grad_abs_gamma).sum().backward()
    expected_factor = grad_abs_gamma * gamma.abs() * factor * invstd.square() * -eps
    assert (grad_gamma is None) != wanted[0] and (grad_factor is None) != wanted[1]
    if wanted[0]:
        assert torch.equal(grad_gamma, leaf.grad)
    if wanted[1]:
        assert torch.equal(grad_factor, expected_factor)
