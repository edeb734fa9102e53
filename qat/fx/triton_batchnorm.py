"""One Triton launch each way per folded Conv-BN training step for the per-channel BatchNorm arithmetic on CUDA.

After BatchNorm's statistics kernel has read the scaled conv output y_s = y * f (f = gamma / sqrt(running_var +
eps), per channel), the step needs, per channel, a dozen small torch ops on (C,) vectors; ``finish_batch_stats``
does them in one pass and writes the running statistics in place:

    var_s  = 1 / invstd0^2 (0 where the statistics kernel reports a constant channel)
    invstd = 1 / sqrt(var_s + eps * f^2)                   BN of y, computed on y_s (see qat.fx.modules)
    |gamma|                                                the BN weight of y_s (f has gamma's sign)
    running_mean += momentum * (mean_s / f + conv_bias - running_mean)
    running_var  += momentum * (var_s / f^2 * n / (n - 1) - running_var)

Backward, ``scale_grads`` turns BatchNorm's gradient to |gamma| (g) into those of gamma and f, in the order of
the torch ops it replaces (seven launches of 1-2 us each per layer before):

    grad_gamma = g * sign(gamma)
    grad_f     = g * |gamma| * f * invstd^2 * -eps          the eps term of invstd (see qat.fx.modules)

Imported lazily for CUDA tensors (eager mode); the CPU and torch.compile take the torch ops of
``qat.fx.modules``, which compute the same values.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from qat.quant.triton_fake_quant import NO_FMA

_BLOCK = 1024


@triton.jit
def _finish_kernel(mean_ptr, invstd0_ptr, factor_ptr, conv_bias_ptr, running_mean_ptr, running_var_ptr, invstd_ptr,
                   gamma_ptr, abs_gamma_ptr, channels, eps, momentum, unbias, HAS_BIAS: tl.constexpr,
                   HAS_GAMMA: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < channels
    mean = tl.load(mean_ptr + offs, mask=valid, other=0.0)
    invstd0 = tl.load(invstd0_ptr + offs, mask=valid, other=1.0)
    f = tl.load(factor_ptr + offs, mask=valid, other=1.0)
    var = tl.where(invstd0 > 0, 1.0 / (invstd0 * invstd0), 0.0)
    tl.store(invstd_ptr + offs, 1.0 / tl.sqrt_rn(var + eps * (f * f)), mask=valid)
    inv_f = 1.0 / f
    mean_y = mean * inv_f
    if HAS_BIAS:
        mean_y += tl.load(conv_bias_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    var_y = var * (inv_f * inv_f) * unbias
    running_mean = tl.load(running_mean_ptr + offs, mask=valid, other=0.0)
    running_var = tl.load(running_var_ptr + offs, mask=valid, other=0.0)
    tl.store(running_mean_ptr + offs, running_mean + momentum * (mean_y - running_mean), mask=valid)
    tl.store(running_var_ptr + offs, running_var + momentum * (var_y - running_var), mask=valid)
    if HAS_GAMMA:
        tl.store(abs_gamma_ptr + offs, tl.abs(tl.load(gamma_ptr + offs, mask=valid, other=0.0)), mask=valid)


@triton.jit
def _scale_grads_kernel(grad_ptr, gamma_ptr, factor_ptr, invstd_ptr, grad_gamma_ptr, grad_factor_ptr, channels,
                        neg_eps, GAMMA_GRAD: tl.constexpr, FACTOR_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < channels
    g = tl.load(grad_ptr + offs, mask=valid, other=0.0)
    gamma = tl.load(gamma_ptr + offs, mask=valid, other=0.0)
    if GAMMA_GRAD:
        sign = tl.where(gamma > 0, 1.0, tl.where(gamma < 0, -1.0, 0.0))
        tl.store(grad_gamma_ptr + offs, g * sign, mask=valid)
    if FACTOR_GRAD:
        f = tl.load(factor_ptr + offs, mask=valid, other=0.0)
        invstd = tl.load(invstd_ptr + offs, mask=valid, other=0.0)
        tl.store(grad_factor_ptr + offs, g * tl.abs(gamma) * f * (invstd * invstd) * neg_eps, mask=valid)


def finish_batch_stats(mean: Tensor, invstd0: Tensor, factor: Tensor, eps: float, running_mean: Tensor,
                       running_var: Tensor, conv_bias: Tensor | None, momentum: float, count: int,
                       gamma: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """(invstd, |gamma|) of BN of y = y_s / f from y_s's batch statistics (mean, invstd0 with eps 0:
    torch.batch_norm_stats), updating running_mean / running_var (float32, in place) with y's mean and unbiased
    variance. All (C,); |gamma| is None without gamma."""
    invstd = mean.new_empty(mean.shape)
    abs_gamma = torch.empty_like(gamma) if gamma is not None else None
    channels = mean.numel()
    _finish_kernel[(triton.cdiv(channels, _BLOCK),)](
        mean, invstd0, factor, conv_bias if conv_bias is not None else mean, running_mean, running_var, invstd,
        gamma if gamma is not None else mean, abs_gamma if abs_gamma is not None else mean, channels, float(eps),
        float(momentum), count / max(count - 1, 1), HAS_BIAS=conv_bias is not None, HAS_GAMMA=gamma is not None,
        BLOCK=_BLOCK, **NO_FMA,
    )
    return invstd, abs_gamma


def scale_grads(grad_abs_gamma: Tensor, gamma: Tensor, factor: Tensor, invstd: Tensor, eps: float,
                gamma_grad: bool, factor_grad: bool) -> tuple[Tensor | None, Tensor | None]:
    """(grad of gamma, grad of f) from BatchNorm's gradient to its weight |gamma| (see the module docstring);
    each None where not wanted. All (C,) float32."""
    channels = gamma.numel()
    grad_gamma = torch.empty_like(gamma) if gamma_grad else None
    grad_factor = torch.empty_like(factor) if factor_grad else None
    _scale_grads_kernel[(triton.cdiv(channels, _BLOCK),)](
        grad_abs_gamma, gamma, factor, invstd, grad_gamma if gamma_grad else gamma,
        grad_factor if factor_grad else factor, channels, -float(eps), GAMMA_GRAD=gamma_grad,
        FACTOR_GRAD=factor_grad, BLOCK=_BLOCK, **NO_FMA,
    )
    return grad_gamma, grad_factor
