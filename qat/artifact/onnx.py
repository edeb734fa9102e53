"""ONNX export in QDQ form: QuantizeLinear/DequantizeLinear around float ops, as onnxruntime and TensorRT read it.

The prepared (fake-quant) model is exported, not the int8 one: a copy is made export-ready first, with
every scale, zero point and clamp read from the fake-quant model, exactly as ``qat.convert`` reads them:

* each QAT Conv/Linear becomes ``op(x, DequantizeLinear(w_int8, s_w, axis), b)`` with BatchNorm folded in
  (int8 weight initializer, per-output-channel scales; the codes are those of the int8 model);
* each activation quantizer becomes ``DequantizeLinear(QuantizeLinear(x, s, z), s, z)`` with a uint8 zero
  point for unsigned grids and an int8 one for signed grids; learned quantizers (LSQ, LSQ+, PACT) export
  their current qparams.

Grids narrower than the 8-bit container (4-bit, reduce_range [0, 127], narrow range) get a ``Clip`` on the
integer codes between Q and DQ, so the model computes the same values; onnxruntime then runs those
activations through float kernels (its int8 kernels fuse plain Q/DQ pairs only). Weights of any width are
stored as their exact codes in an int8 initializer and need no clip. Per-token / per-group (dynamic)
quantizers have no QDQ form and raise :class:`OnnxExportError`.

onnxruntime's QuantizeLinear divides by the scale where fake-quant multiplies by ``1/s`` (float32), so a
value on a rounding tie can land one code apart: outputs agree with the int8 model within about 1 LSB.

>>> import os, tempfile, torch, torchvision
>>> import onnxruntime as ort
>>> from qat.fx import QuantConfig, calibrate, prepare
>>> model = torchvision.models.resnet18(num_classes=10).eval()
>>> x = torch.randn(2, 3, 64, 64)
>>> prepared = prepare(model, QuantConfig.preset("w8a8"), (x,)); calibrate(prepared, [x])
>>> path = export_onnx(prepared, os.path.join(tempfile.mkdtemp(), "resnet18.onnx"), (x,))
>>> session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
>>> logits = session.run(None, {"input": x.numpy()})[0]
>>> bool((torch.from_numpy(logits).argmax(1) == prepared(x).argmax(1)).all())
True
"""
from __future__ import annotations

import copy
import os
import uuid
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from qat.int8.lower import int8_weight
from qat.fx.modules import FUSED_ACTIVATIONS, QConv, QConvTranspose2d, QLinear, QuantizedWeightModule
from qat.fx.rewrite import undo_training_fusions
from qat.quant.fake_quantize import FakeQuantize, LearnableFakeQuantize, QuantizerBase

MIN_OPSET = 13  # per-axis QuantizeLinear/DequantizeLinear
_CONTAINERS = {torch.uint8: (0, 255), torch.int8: (-128, 127)}


class OnnxExportError(ValueError):
    """The model cannot be exported to ONNX QDQ as given (the message says why and what to do)."""


class _QuantizeDequantize(torch.autograd.Function):
    """Fake-quant in PyTorch; QuantizeLinear -> [Clip] -> DequantizeLinear in ONNX."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, axis: int | None, qmin: int, qmax: int):
        z = zero_point.to(torch.int32)
        if axis is None:
            return torch.fake_quantize_per_tensor_affine(x, scale, z, qmin, qmax)
        return torch.fake_quantize_per_channel_affine(x, scale, z, axis, qmin, qmax)

    @staticmethod
    def symbolic(g, x, scale, zero_point, axis, qmin, qmax):
        kw = {} if axis is None else {"axis_i": axis}
        q = g.op("QuantizeLinear", x, scale, zero_point, **kw)
        dtype = torch.uint8 if qmin >= 0 else torch.int8
        if (qmin, qmax) != _CONTAINERS[dtype]:
            lo = g.op("Constant", value_t=torch.tensor(qmin, dtype=dtype))
            hi = g.op("Constant", value_t=torch.tensor(qmax, dtype=dtype))
            q = g.op("Clip", q, lo, hi)
        return g.op("DequantizeLinear", q, scale, zero_point, **kw)


class _DequantizeWeight(torch.autograd.Function):
    """int8 codes times per-channel scales in PyTorch; DequantizeLinear of an int8 initializer in ONNX."""

    @staticmethod
    def forward(ctx, q, scale, zero_point, axis: int):
        shape = [1] * q.dim()
        shape[axis] = -1
        return (q.float() - zero_point.float().view(shape)) * scale.view(shape)  # (C,) -> broadcast on axis

    @staticmethod
    def symbolic(g, q, scale, zero_point, axis):
        return g.op("DequantizeLinear", q, scale, zero_point, axis_i=axis)


def _check_ready(fq: QuantizerBase, name: str) -> None:
    if isinstance(fq, FakeQuantize) and fq.observer is not None and not fq.observer.has_data:
        raise OnnxExportError(f"quantizer '{name}' has observed no data: run qat.calibrate (or train) first")
    if isinstance(fq, LearnableFakeQuantize) and not fq.initialized:
        raise OnnxExportError(f"learnable quantizer '{name}' was never initialised: run calibration batches first")


class QuantDequant(nn.Module):
    """Frozen QDQ pair of a fake-quantizer: per-tensor, or per-channel on ``axis``; zero point uint8/int8."""

    def __init__(self, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, axis: int | None):
        super().__init__()
        dtype = torch.uint8 if qmin >= 0 else torch.int8
        self.register_buffer("scale", scale.detach().float().clone())
        self.register_buffer("zero_point", zero_point.detach().to(dtype).clone())
        self.qmin, self.qmax, self.axis = qmin, qmax, axis

    @classmethod
    def from_quantizer(cls, fq: QuantizerBase, name: str) -> nn.Module:
        """The quantizer's current qparams as a QDQ module; Identity when its fake-quant is switched off."""
        if not fq.fake_quant_enabled:
            return nn.Identity()
        spec = fq.spec
        if spec.is_dynamic:
            raise OnnxExportError(
                f"quantizer '{name}' is {spec.granularity.value} ({spec.short()}): ONNX QDQ has no per-token/"
                "per-group form; use per-tensor activations for these layers or skip them in the QuantConfig")
        _check_ready(fq, name)
        scale, zero_point = fq.qparams()
        if spec.is_per_channel:
            return cls(scale.reshape(-1), zero_point.reshape(-1), spec.qmin, spec.qmax, spec.axis)
        return cls(scale.reshape(()), zero_point.reshape(()), spec.qmin, spec.qmax, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x if x.dtype == torch.float32 else x.float()
        return _QuantizeDequantize.apply(x, self.scale, self.zero_point, self.axis, self.qmin, self.qmax)

    def extra_repr(self) -> str:
        axis = "tensor" if self.axis is None else f"axis={self.axis}"
        return f"[{self.qmin}, {self.qmax}], {axis}"


def _conv_op(m: QConv) -> Callable:
    return partial(m.conv_fn, stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups)


def _conv_transpose_op(m: QConvTranspose2d) -> Callable:
    return partial(F.conv_transpose2d, stride=m.stride, padding=m.padding, output_padding=m.output_padding,
                   groups=m.groups, dilation=m.dilation)


# QAT layer type -> the float op of its export form, called as op(x, weight, bias)
LAYER_OPS: dict[type[QuantizedWeightModule], Callable[[QuantizedWeightModule], Callable]] = {
    QConv: _conv_op,
    QConvTranspose2d: _conv_transpose_op,
    QLinear: lambda m: F.linear,
}


class ExportLayer(nn.Module):
    """A QAT Conv/Linear in export form: ``act(op(qdq(x), DequantizeLinear(w_int8), folded_bias))``.

    The weight is BN-folded and quantized with the layer's weight quantizer (the int8 model's codes); with
    the weight quantizer's fake-quant off, the folded float weight is used as the prepared model does.
    """

    def __init__(self, m: QuantizedWeightModule, name: str):
        super().__init__()
        self.op = LAYER_OPS[type(m)](m)
        self.axis = m.weight_axis
        self.input_qdq = None if m.input_fq is None else QuantDequant.from_quantizer(m.input_fq, f"{name}.input_fq")
        self.activation = None if m.activation is None else FUSED_ACTIVATIONS[m.activation][0]
        if m.weight_fq.fake_quant_enabled:
            _check_ready(m.weight_fq, f"{name}.weight_fq")
            weight, bias = int8_weight(m, name)
            self.register_buffer("weight_int8", weight.q)
            self.register_buffer("weight_scale", weight.scale)
            self.register_buffer("weight_zero_point", torch.zeros(weight.scale.shape, dtype=torch.int8))
            self.register_buffer("weight_float", None)
        else:
            with torch.no_grad():
                folded, bias = m.folded_weight_and_bias()
            self.register_buffer("weight_int8", None)
            self.register_buffer("weight_float", folded.detach().float().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def weight(self) -> torch.Tensor:
        if self.weight_int8 is None:
            return self.weight_float
        return _DequantizeWeight.apply(self.weight_int8, self.weight_scale, self.weight_zero_point, self.axis)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_qdq is not None:
            x = self.input_qdq(x)
        y = self.op(x, self.weight(), self.bias)
        return y if self.activation is None else self.activation(y)


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent_path) if parent_path else root, name, module)


def _called_layers(model: nn.Module) -> list[str]:
    """QAT layers whose forward runs: graph call targets and self-quantizing layers inside leaf modules.
    (Layers whose parent reads only their weight quantizer, like Swin's attention, keep their module.)"""
    graph = getattr(model, "graph", None)
    targets = {n.target for n in graph.nodes if n.op == "call_module"} if graph is not None else set()
    return [name for name, m in model.named_modules()
            if isinstance(m, QuantizedWeightModule) and type(m) in LAYER_OPS
            and (name in targets or m.input_fq is not None)]


def _check_exportable(model: nn.Module) -> None:
    if hasattr(model, "qat_backend"):
        raise OnnxExportError(
            f"this is an int8 model converted for the '{model.qat_backend}' backend; ONNX QDQ export reads the "
            "fake-quant model: pass the prepared model (the one given to qat.convert) instead")
    if not any(isinstance(m, QuantizerBase) for m in model.modules()):
        raise OnnxExportError("the model has no fake-quant modules: pass a model produced by qat.prepare")


def exportable(prepared: nn.Module) -> nn.Module:
    """An eval-mode copy of `prepared` in export form (QAT layers -> ExportLayer, quantizers -> QuantDequant).

    Its PyTorch forward computes what the exported ONNX graph computes; `prepared` is left unchanged.
    """
    _check_exportable(prepared)
    model = copy.deepcopy(prepared).eval()
    undo_training_fusions(model)  # export layers apply their own activation; one node per quantizer
    for q in model.modules():
        if isinstance(q, QuantizerBase):
            q.disable_observer()  # settles stale qparams; exports freeze what the model computes now
    for name in _called_layers(model):
        _set_submodule(model, name, ExportLayer(model.get_submodule(name), name))
    for name, q in list(model.named_modules()):
        if isinstance(q, QuantizerBase):
            _set_submodule(model, name, QuantDequant.from_quantizer(q, name))
    return model


def _io_names(model: nn.Module, example_inputs: tuple) -> tuple[list[str], list[str]]:
    with torch.no_grad():
        out = model(*example_inputs)
    outputs = list(out) if isinstance(out, (tuple, list)) else [out]
    if not all(isinstance(o, torch.Tensor) for o in outputs):
        raise OnnxExportError("export_onnx supports models returning a tensor or a tuple of tensors")
    inputs = ["input"] if len(example_inputs) == 1 else [f"input_{i}" for i in range(len(example_inputs))]
    return inputs, ["output"] if len(outputs) == 1 else [f"output_{i}" for i in range(len(outputs))]


def _check_arguments(example_inputs: tuple, opset: int) -> None:
    if not isinstance(example_inputs, tuple) or not all(isinstance(t, torch.Tensor) for t in example_inputs):
        raise TypeError("example_inputs must be a tuple of tensors, e.g. (torch.randn(1, 3, 32, 32),)")
    if opset < MIN_OPSET:
        raise OnnxExportError(f"opset={opset} is too old: per-channel QuantizeLinear/DequantizeLinear need >= {MIN_OPSET}")


def export_onnx(prepared: nn.Module, path: str | os.PathLike, example_inputs: tuple, opset: int = 17) -> str:
    """Write `prepared` (a calibrated or trained fake-quant model) to `path` as a QDQ ONNX model.

    The batch dimension of every input and output is dynamic. The file is checked with ``onnx.checker`` and
    written atomically (temporary file renamed into place). Returns the path as a string.
    """
    import onnx

    _check_arguments(example_inputs, opset)
    model = exportable(prepared).cpu()
    example_inputs = tuple(t.detach().cpu() for t in example_inputs)
    inputs, outputs = _io_names(model, example_inputs)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")  # same folder: os.replace stays atomic
    try:
        with warnings.catch_warnings():
            for category in (DeprecationWarning, FutureWarning, torch.jit.TracerWarning):
                warnings.simplefilter("ignore", category)
            warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")  # strided slices stay ops
            torch.onnx.export(model, example_inputs, tmp, dynamo=False, opset_version=opset, input_names=inputs,
                              output_names=outputs, dynamic_axes={n: {0: "batch"} for n in inputs + outputs})
        onnx.checker.check_model(tmp, full_check=True)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return str(path)
