"""Public graph-pass API: prepare, calibrate, explain, and mode switches over a whole model.

>>> import torchvision
>>> model = torchvision.models.resnet18(num_classes=10).eval()
>>> x = torch.randn(2, 3, 64, 64)
>>> prepared = prepare(model, QuantConfig.preset("w8a8"), example_inputs=(x,))
>>> calibrate(prepared, [x])
>>> sum(isinstance(m, QuantizedWeightModule) for m in prepared.modules())
21
"""
from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import fx, nn

from qat.fx.attention import decompose_attention
from qat.fx.config import QuantConfig
from qat.fx.modules import FLOAT_TO_QAT, QuantizedWeightModule
from qat.fx.plan import QuantPlan, plan, propagate_shapes
from qat.fx.rewrite import rewrite, set_preserved_attr
from qat.fx.tracer import trace
from qat.quant.fake_quantize import QuantizerBase


def _check_patterns(model: nn.Module, config: QuantConfig) -> None:
    names = [n for n, _ in model.named_modules()]
    type_names = {type(m).__name__ for m in model.modules()}
    unused = config.unused_patterns(names, type_names)
    if unused:
        raise ValueError(
            f"QuantConfig names modules that the model does not have: {', '.join(map(repr, unused))} "
            f"(module paths look like {names[1:4]}; type names like {sorted(type_names)[:4]})"
        )


def prepare(model: nn.Module, config: QuantConfig, example_inputs: tuple, inplace: bool = False) -> fx.GraphModule:
    """Trace `model`, plan and insert fake quantization; returns a GraphModule in the model's mode.

    example_inputs: a tuple of tensors the model accepts (used to tell tensors from sizes in the graph).
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig (e.g. QuantConfig.preset('w8a8')), got {type(config).__name__}")
    if not isinstance(example_inputs, tuple):
        raise TypeError("example_inputs must be a tuple of the model's inputs, e.g. (torch.randn(1, 3, 32, 32),)")
    model = model if inplace else copy.deepcopy(model)
    decompose_attention(model)
    _check_patterns(model, config)
    traced = trace(model, config.leaf_modules, fallback_to_leaf=config.on_untraceable == "leaf")
    gm = traced.graph_module
    propagate_shapes(gm, example_inputs)
    decisions = plan(gm, config, traced.leaves)
    gm = rewrite(gm, decisions, config)
    device = model_device(model)
    for quantizer in quantizers(gm):
        quantizer.to(device)  # built on the CPU; the model may live on a GPU
    set_preserved_attr(gm, "qat_plan", decisions)
    set_preserved_attr(gm, "qat_config", config)
    return gm.train(model.training)


def quantizers(model: nn.Module) -> Iterable[QuantizerBase]:
    return (m for m in model.modules() if isinstance(m, QuantizerBase))


def enable_observer(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Switch every observer on or off; switching off first checks the observed ranges (check_finite)."""
    if not enabled:
        check_finite(model)
    for q in quantizers(model):
        q.enable_observer(enabled)
    return model


def check_finite(model: nn.Module) -> None:
    """Raise FloatingPointError naming the first quantizer whose observer saw NaN/Inf.

    On a GPU the running observers do not check each batch (that would wait for the device every step);
    NaN/Inf stay in their ranges, and this check (run by calibrate and when observers are switched off)
    reports them.
    """
    for name, module in model.named_modules():
        observer = getattr(module, "observer", None) if isinstance(module, QuantizerBase) else None
        if observer is None:
            continue
        try:
            observer.check_finite()
        except FloatingPointError as err:
            raise FloatingPointError(f"quantizer '{name}': {err}") from err


def enable_fake_quant(model: nn.Module, enabled: bool = True) -> nn.Module:
    for q in quantizers(model):
        q.enable_fake_quant(enabled)
    return model


def freeze_bn_stats(model: nn.Module, frozen: bool = True) -> nn.Module:
    for m in model.modules():
        if isinstance(m, QuantizedWeightModule):
            m.freeze_bn_stats(frozen)
    return model


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's first parameter, else of its first buffer (int8 models hold only buffers); CPU
    for a model with neither."""
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), torch.empty(0))
    return tensor.device


def calibrate(model: nn.Module, batches: Iterable, num_batches: int | None = None, freeze: bool = True) -> None:
    """Run observers over `batches` (tensors, or (input, target) pairs) in eval mode without gradients.

    Fake quantization is off while observing (each layer sees float inputs, as in standard PTQ); afterwards
    it is on, and with `freeze` the observers are off, so the ranges stay fixed.
    """
    was_training = model.training
    device = model_device(model)
    model.eval()
    enable_fake_quant(model, False)
    enable_observer(model, True)
    seen = 0
    with torch.no_grad():
        for batch in batches:
            if num_batches is not None and seen >= num_batches:
                break
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            model(x.to(device))
            seen += 1
    if seen == 0:
        raise ValueError("calibrate() got no batches: pass a non-empty iterable of inputs")
    check_finite(model)
    for q in quantizers(model):
        if q.observer is not None and q.observer.has_data:
            q.qparams()  # scales take their final shapes now, before torch.compile or DDP wraps the model
    if freeze:
        enable_observer(model, False)
    enable_fake_quant(model, True)
    model.train(was_training)


def plan_of(model: nn.Module) -> QuantPlan:
    plan_ = getattr(model, "qat_plan", None)
    if plan_ is None:
        raise ValueError("this model was not produced by qat.prepare (it has no quantization plan)")
    return plan_


def coverage(model: nn.Module) -> tuple[int, int]:
    """(quantized Conv/Linear layers, all Conv/Linear layers) of a prepared model."""
    quantized = sum(isinstance(m, QuantizedWeightModule) for m in model.modules())
    floating = sum(type(m) in FLOAT_TO_QAT for m in model.modules())
    return quantized, quantized + floating


def explain(model: nn.Module) -> str:
    """The quantization plan of a prepared model, one row per layer / op, and its coverage."""
    quantized, total = coverage(model)
    acts = len({a.quantizer for a in plan_of(model).activations})
    return f"{plan_of(model).table()}\n\n{quantized}/{total} Conv/Linear layers quantized, {acts} activation quantizers"
