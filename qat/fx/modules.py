"""QAT modules: Conv/Linear with weight fake-quant, optional fused BatchNorm (folding simulated) and ReLU.

BN folding during QAT follows Jacob et al. 2018 / Krishnamoorthi 2018: the weight is folded with the
running statistics and fake-quantized; while BN uses batch statistics, it normalises the scaled conv output
with eps scaled to match, which equals BatchNorm of the unscaled output, as in the float model (no division
pass). Once BN uses running statistics (eval, or
frozen in training) the layer computes conv(x, fq(w * gamma / std)) + folded bias directly: the same
function, and the same arithmetic the int8 conv performs.

>>> from qat.quant.spec import QuantSpec
>>> conv = torch.nn.Conv2d(3, 8, 3)
>>> bn = torch.nn.BatchNorm2d(8).eval()
>>> q = QConv.from_float(conv, QuantizerConfig(QuantSpec(symmetric=True, granularity="per_channel")), bn, "relu")
>>> q.weight_fq.disable_fake_quant() and None
>>> x = torch.randn(2, 3, 8, 8)
>>> torch.allclose(q.eval()(x), torch.relu(bn(conv(x))), atol=1e-5)
True
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qat.quant import affine
from qat.quant.config import QuantizerConfig
from qat.quant.fake_quantize import QuantizerBase

# fused activation name -> (function, upper clip or None); int8 kernels clamp codes to the same bounds
FUSED_ACTIVATIONS = {
    "relu": (F.relu, None),
    "relu6": (F.relu6, 6.0),
}

CONV_FUNCTIONS = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}


@dataclass(frozen=True)
class _RunningStats:
    """A BatchNorm's running statistics (float32, updated in place) and what updating them from the batch
    statistics of y_scaled = (y - conv_bias) * factor needs."""

    mean: torch.Tensor
    var: torch.Tensor
    momentum: float
    conv_bias: torch.Tensor | None

    def update(self, mean_s: torch.Tensor, var_s: torch.Tensor, factor: torch.Tensor, count: int) -> None:
        """Torch ops (CPU, torch.compile); on CUDA ``qat.fx.triton_batchnorm`` computes the same in one launch."""
        with torch.no_grad():
            inv_factor = factor.detach().reciprocal()
            bias = self.conv_bias
            mean_y = mean_s * inv_factor if bias is None else torch.addcmul(bias.detach(), mean_s, inv_factor)
            self.mean.lerp_(mean_y, self.momentum)
            self.var.lerp_(var_s * inv_factor.square_().mul_(count / max(count - 1, 1)), self.momentum)


def _normalize(y: torch.Tensor, weight, bias, mean: torch.Tensor, invstd: torch.Tensor) -> torch.Tensor:
    """(y - mean) * invstd * weight + bias per channel (dim 1) as one addcmul, in y's dtype and memory format."""
    scale = invstd if weight is None else invstd * weight
    shift = -mean * scale if bias is None else bias - mean * scale
    shape = [1, -1] + [1] * (y.dim() - 2)
    return torch.addcmul(shift.reshape(shape), y, scale.reshape(shape)).to(y.dtype)  # (C,) -> (1, C, 1, ..)


class _BatchNormOfScaled(torch.autograd.Function):
    """BatchNorm (batch statistics, weight gamma) of y = y_scaled / factor, computed from y_scaled with weight
    |gamma| (f has gamma's sign, so y_scaled / |f| has y's): per channel,
    (y - mean_y) / sqrt(var_y + eps) = (y_scaled - mean_s) / sqrt(var_s + eps * factor^2), updating the
    running statistics with y's. Forward: one statistics pass and one normalising pass over y_scaled
    (on CUDA BatchNorm's own kernels, with one Triton launch each way for the per-channel arithmetic, |gamma|
    and its gradient included; on the CPU BatchNorm's statistics kernel and one addcmul); backward:
    BatchNorm's own, plus the gradient to `factor` through the eps term, -eps f |gamma| invstd^2
    sum(grad * x_hat), from per-channel values. That term
    cancels what the factor receives through y_scaled (BN of y does not depend on f); it is small only where
    var_s >> eps f^2, and dominant for a near-constant channel (a low-bit weight row with few non-zero
    codes), so it is kept. Eager mode only: torch.compile takes :func:`_bn_of_scaled_traced`."""

    @staticmethod
    def forward(ctx, y_scaled, gamma, bias, factor, eps: float, running: _RunningStats):
        count = y_scaled.numel() // y_scaled.shape[1]
        if y_scaled.is_cuda:
            from qat.fx.triton_batchnorm import finish_batch_stats

            mean, invstd0 = torch.batch_norm_stats(y_scaled, 0.0)  # eps 0: a constant channel reports 0
            invstd, weight = finish_batch_stats(mean, invstd0, factor, eps, running.mean, running.var,
                                                running.conv_bias, running.momentum, count, gamma)
            out = torch.batch_norm_elemt(y_scaled, weight, bias, mean, invstd, 0.0)
        else:  # BatchNorm's statistics kernel: channels_last aware, an order of magnitude faster than var_mean
            mean, var = torch.batch_norm_update_stats(y_scaled.float(), None, None, 0.0)  # (mean, biased var)
            invstd = torch.rsqrt(torch.addcmul(var, factor, factor, value=eps))
            running.update(mean, var, factor, count)
            weight = gamma.abs() if gamma is not None else None
            out = _normalize(y_scaled, weight, bias, mean, invstd)
        ctx.save_for_backward(y_scaled, gamma, weight, mean, invstd, factor)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, grad):
        y_scaled, gamma, weight, mean, invstd, factor = ctx.saved_tensors
        gamma_grad, factor_grad = ctx.needs_input_grad[1], ctx.needs_input_grad[3]
        scale_grads = gamma is not None and (gamma_grad or factor_grad)
        grad_y, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            grad.contiguous(memory_format=_memory_format(y_scaled)), y_scaled, weight, None, None, mean, invstd,
            True, 0.0, [ctx.needs_input_grad[0], scale_grads, ctx.needs_input_grad[2]],
        )
        grad_gamma = grad_factor = None
        if scale_grads and y_scaled.is_cuda:
            from qat.fx.triton_batchnorm import scale_grads as fused_scale_grads

            grad_gamma, grad_factor = fused_scale_grads(grad_weight, gamma, factor, invstd, ctx.eps, gamma_grad,
                                                        factor_grad)
        elif scale_grads:  # weight = |gamma|; f enters through invstd's eps term: d out / d invstd * d invstd / d f
            grad_gamma = grad_weight * gamma.sgn() if gamma_grad else None
            grad_factor = grad_weight * weight * factor * invstd.square() * -ctx.eps if factor_grad else None
        return grad_y, grad_gamma, grad_bias, grad_factor, None, None


def _bn_of_scaled_traced(y_scaled, gamma, bias, factor, eps: float, running: _RunningStats) -> torch.Tensor:
    """:class:`_BatchNormOfScaled` as plain differentiable ops, which torch.compile fuses (autograd derives
    the same gradients, the eps term included)."""
    dims = [d for d in range(y_scaled.dim()) if d != 1]
    var, mean = torch.var_mean(y_scaled.float(), dim=dims, correction=0)
    running.update(mean.detach(), var.detach(), factor, y_scaled.numel() // y_scaled.shape[1])
    weight = gamma.abs() if gamma is not None else None
    return _normalize(y_scaled, weight, bias, mean, torch.rsqrt(var + eps * factor * factor))


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _fused_weight_quant(quantizer: QuantizerBase, weight: torch.Tensor):
    """``qat.fx.triton_folded_weight``'s view of the weight quantizer when its fused kernels serve this step
    (eager CUDA, a supported quantizer state), else None."""
    if not affine.triton_eager_applies(weight, quantizer.spec) or weight.dim() < 2:
        return None
    from qat.fx.triton_folded_weight import weight_quant

    return weight_quant(quantizer, weight)


class QuantizedWeightModule(nn.Module):
    """Shared parts of QAT Conv/Linear: a weight quantizer, optional fused BN and activation, and an
    optional input quantizer (used when the module is swapped in eagerly, outside the FX graph)."""

    weight_axis = 0

    def _init_common(self, weight_cfg: QuantizerConfig, bn: nn.Module | None, activation: str | None):
        if activation is not None and activation not in FUSED_ACTIVATIONS:
            raise ValueError(f"activation={activation!r} is invalid; allowed: {', '.join(FUSED_ACTIVATIONS)}")
        spec = weight_cfg.spec
        if spec.is_per_channel and spec.axis != self.weight_axis:
            weight_cfg = weight_cfg.with_(spec=spec.with_(axis=self.weight_axis))
        self.weight_fq: QuantizerBase = weight_cfg.build()
        self.bn = bn
        self.activation = activation
        self.activation_in_output_quantizer = False  # prepare: the output quantizer applies the ReLU
        self.bn_frozen = False
        self.input_fq: QuantizerBase | None = None

    @classmethod
    def from_float(cls, module: nn.Module, weight_cfg: QuantizerConfig, bn: nn.Module | None = None,
                   activation: str | None = None) -> "QuantizedWeightModule":
        """The QAT twin of a float Conv/Linear (weights copied), with BN and activation fused in."""
        return cls(module, weight_cfg, bn, activation)

    def freeze_bn_stats(self, frozen: bool = True) -> "QuantizedWeightModule":
        """Frozen: BN uses (and no longer updates) its running statistics, also in training."""
        self.bn_frozen = bool(frozen)
        return self

    def _bn_scale(self, running_var: torch.Tensor | None = None) -> torch.Tensor:
        """gamma / sqrt(running_var + eps): the per-output-channel factor folded into the weight."""
        running_var = self.bn.running_var if running_var is None else running_var
        std = torch.sqrt(running_var + self.bn.eps)
        gamma = self.bn.weight if self.bn.weight is not None else torch.ones_like(std)
        return gamma / std

    def folded_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Float weight and bias with BN folded in using running statistics (what int8 conversion uses)."""
        if self.bn is None:
            return self.weight, self.bias
        factor = self._bn_scale()
        bias = self.bias if self.bias is not None else torch.zeros_like(factor)
        beta = self.bn.bias if self.bn.bias is not None else torch.zeros_like(factor)
        folded_bias = (bias - self.bn.running_mean) * factor + beta
        return self.weight * self._broadcast(factor), folded_bias

    def _broadcast(self, per_channel: torch.Tensor) -> torch.Tensor:
        shape = [1] * self.weight.dim()
        shape[self.weight_axis] = -1
        return per_channel.reshape(shape)  # (C,) -> weight-shaped broadcast

    def _output_broadcast(self, per_channel: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        shape = [1] * out.dim()
        shape[1 if out.dim() > 2 else -1] = -1
        return per_channel.reshape(shape)  # (C,) -> broadcast over the output's channel dim

    def _folded_train_step(self, x: torch.Tensor) -> torch.Tensor:
        """Conv/Linear + BN on batch statistics with the weight folded as it will be after conversion.

        The layer computes y_scaled = layer(x, fq(w * f)) with f = gamma / sqrt(running_var + eps); the float
        result is y = y_scaled / f (+ bias). BN of y with batch statistics is BN of y_scaled with eps * f^2
        in place of eps and |gamma| in place of gamma (:class:`_BatchNormOfScaled`; f has gamma's sign, BN
        takes |f| out): no division pass over the output, and under bf16 autocast the output stays bf16.
        The running statistics get y's batch mean and variance.
        """
        bn = self.bn
        fused = _fused_weight_quant(self.weight_fq, self.weight)
        if fused is not None:  # CUDA: one Triton launch each way for everything up to the conv's weight
            from qat.fx.triton_folded_weight import folded_weight_fake_quantize

            weight, factor = folded_weight_fake_quantize(self.weight, bn.weight, bn.running_var, bn.eps, fused)
        else:
            factor = torch.rsqrt(bn.running_var + bn.eps)  # autograd keeps the rsqrt result, not running_var
            factor = factor * bn.weight if bn.weight is not None else factor
            weight = self.weight_fq(self.weight * self._broadcast(factor))
        y_scaled = self._compute(x, weight, None)
        momentum = bn.momentum if bn.momentum is not None else 0.1  # as before: no cumulative average
        running = _RunningStats(bn.running_mean, bn.running_var, momentum, self.bias)
        if torch.compiler.is_compiling():
            return _bn_of_scaled_traced(y_scaled, bn.weight, bn.bias, factor, bn.eps, running)
        return _BatchNormOfScaled.apply(y_scaled, bn.weight, bn.bias, factor, bn.eps, running)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_fq is not None:
            x = self.input_fq(x)
        if self.bn is None:
            y = self._compute(x, self.weight_fq(self.weight), self.bias)
        elif not self.training or self.bn_frozen:
            weight, bias = self.folded_weight_and_bias()  # BN on running statistics is exactly the fold
            y = self._compute(x, self.weight_fq(weight), bias)
        else:
            y = self._folded_train_step(x)
        if self.activation is not None and not self.activation_in_output_quantizer:
            y = FUSED_ACTIVATIONS[self.activation][0](y)
        return y

    def _compute(self, x, weight, bias):
        raise NotImplementedError(f"{type(self).__name__} must implement _compute()")

    def _copy_params(self, float_module: nn.Module) -> None:
        self.weight = nn.Parameter(float_module.weight.detach().clone(), float_module.weight.requires_grad)
        bias = float_module.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), bias.requires_grad)

    def extra_repr(self) -> str:
        parts = [f"bn={'frozen' if self.bn_frozen else 'live'}" if self.bn is not None else "no bn"]
        where = " (in the output quantizer)" if self.activation_in_output_quantizer else ""
        return ", ".join(parts + ([f"activation={self.activation}{where}"] if self.activation else []))


class QConv(QuantizedWeightModule):
    """Conv1d/2d/3d (any groups, stride, padding, dilation) with fake-quantized weight."""

    def __init__(self, conv: nn.Conv1d | nn.Conv2d | nn.Conv3d, weight_cfg, bn=None, activation=None):
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ValueError(f"QConv supports padding_mode='zeros' only, got {conv.padding_mode!r}")
        self.float_type = type(conv)
        self.conv_fn = CONV_FUNCTIONS[type(conv)]
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.in_channels, self.out_channels, self.kernel_size = conv.in_channels, conv.out_channels, conv.kernel_size
        self._copy_params(conv)
        self._init_common(weight_cfg, bn, activation)

    def _compute(self, x, weight, bias):
        return self.conv_fn(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


class QConvTranspose2d(QuantizedWeightModule):
    """ConvTranspose2d with fake-quantized weight (per-channel on axis 1: output channels)."""

    weight_axis = 1

    def __init__(self, conv: nn.ConvTranspose2d, weight_cfg, bn=None, activation=None):
        super().__init__()
        if conv.groups != 1:
            raise ValueError("QConvTranspose2d supports groups=1 only (per-output-channel weight scales)")
        self.float_type = type(conv)
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.output_padding, self.groups = conv.output_padding, conv.groups
        self.in_channels, self.out_channels, self.kernel_size = conv.in_channels, conv.out_channels, conv.kernel_size
        self._copy_params(conv)
        self._init_common(weight_cfg, bn, activation)

    def _compute(self, x, weight, bias):
        return F.conv_transpose2d(x, weight, bias, self.stride, self.padding, self.output_padding, self.groups, self.dilation)


class QLinear(QuantizedWeightModule):
    """Linear with fake-quantized weight, optional fused BatchNorm1d and activation."""

    def __init__(self, linear: nn.Linear, weight_cfg, bn=None, activation=None):
        super().__init__()
        self.float_type = type(linear)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._copy_params(linear)
        self._init_common(weight_cfg, bn, activation)

    def _compute(self, x, weight, bias):
        return F.linear(x, weight, bias)


# float module type -> QAT module type (convert has the matching table QAT -> int8)
FLOAT_TO_QAT: dict[type[nn.Module], type[QuantizedWeightModule]] = {
    nn.Conv1d: QConv,
    nn.Conv2d: QConv,
    nn.Conv3d: QConv,
    nn.ConvTranspose2d: QConvTranspose2d,
    nn.Linear: QLinear,
}

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def fold_relu_into_quantizer(layer: QuantizedWeightModule, quantizer: QuantizerBase) -> None:
    """The layer's ReLU moves into `quantizer`, which must be the only reader of the layer's output: the
    fused kernels then apply it inside the observer and fake-quant passes (no ReLU pass forward or
    backward); values and gradients are unchanged."""
    if layer.activation != "relu":
        raise ValueError(f"only a fused 'relu' moves into a quantizer, the layer has activation={layer.activation!r}")
    layer.activation_in_output_quantizer = True
    quantizer.applies_relu = True
