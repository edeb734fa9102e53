"""Codecs: how each module type, function and argument of an int8 graph becomes JSON + named tensors, and back.

Only what is listed here can be exported or loaded, so loading never constructs anything else.
"""
from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from qat.int8 import modules as q8
from qat.kernels import ActQParams, AttentionGrids, ConvGeometry, Int8Weight

FUNCTIONS: dict[str, Callable] = {
    "torch.flatten": torch.flatten, "torch.reshape": torch.reshape, "torch.transpose": torch.transpose,
    "torch.permute": torch.permute, "torch.squeeze": torch.squeeze, "torch.unsqueeze": torch.unsqueeze,
    "torch.cat": torch.cat, "torch.add": torch.add, "torch.mul": torch.mul, "torch.matmul": torch.matmul,
    "torch.softmax": torch.softmax, "torch.relu": torch.relu, "torch.sigmoid": torch.sigmoid,
    "torch.mean": torch.mean, "torch.chunk": torch.chunk, "torch.split": torch.split,
    "operator.add": operator.add, "operator.mul": operator.mul, "operator.getitem": operator.getitem,
    "operator.matmul": operator.matmul, "operator.truediv": operator.truediv, "operator.sub": operator.sub,
    "F.relu": F.relu, "F.relu6": F.relu6, "F.gelu": F.gelu, "F.silu": F.silu, "F.hardswish": F.hardswish,
    "F.hardsigmoid": F.hardsigmoid, "F.pad": F.pad, "F.max_pool2d": F.max_pool2d, "F.avg_pool2d": F.avg_pool2d,
    "F.adaptive_avg_pool2d": F.adaptive_avg_pool2d, "F.dropout": F.dropout, "F.layer_norm": F.layer_norm,
    "F.softmax": F.softmax,
}
SAFE_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device", "T", "mT"})


def tensor_attribute(value, name: str):
    """getattr restricted to harmless tensor attributes (what traced `x.shape` becomes)."""
    if name not in SAFE_ATTRIBUTES:
        raise ExportError(f"attribute access .{name} is not allowed in artifacts; allowed: {sorted(SAFE_ATTRIBUTES)}")
    return getattr(value, name)


FUNCTIONS["getattr"] = tensor_attribute
FUNCTION_NAMES = {fn: name for name, fn in FUNCTIONS.items()}
FUNCTION_NAMES[getattr] = "getattr"
METHODS = frozenset({"view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze", "unsqueeze",
                     "chunk", "split", "expand", "narrow", "unflatten", "size", "mean", "relu", "sigmoid",
                     "softmax", "add", "mul", "matmul", "float"})


class ExportError(ValueError):
    """The model holds something the artifact format cannot describe (the message names it)."""


# ---- arguments -------------------------------------------------------------------------------------------

def encode_arg(a: Any) -> Any:
    if isinstance(a, fx.Node):
        return {"node": a.name}
    if isinstance(a, (list, tuple)):
        return {"list" if isinstance(a, list) else "tuple": [encode_arg(x) for x in a]}
    if isinstance(a, slice):
        return {"slice": [encode_arg(a.start), encode_arg(a.stop), encode_arg(a.step)]}
    if isinstance(a, dict):
        return {"dict": {k: encode_arg(v) for k, v in a.items()}}
    if isinstance(a, float) and not math.isfinite(a):
        return {"float": repr(a)}
    if a is None or isinstance(a, (bool, int, float, str)):
        return a
    if isinstance(a, torch.dtype):
        return {"dtype": str(a).removeprefix("torch.")}
    raise ExportError(f"cannot export an argument of type {type(a).__name__}: {a!r}")


def decode_arg(a: Any, nodes: dict[str, fx.Node]) -> Any:
    if not isinstance(a, dict):
        return a
    (kind, value), = a.items()
    decoders = {
        "node": lambda v: nodes[v],
        "list": lambda v: [decode_arg(x, nodes) for x in v],
        "tuple": lambda v: tuple(decode_arg(x, nodes) for x in v),
        "slice": lambda v: slice(*(decode_arg(x, nodes) for x in v)),
        "dict": lambda v: {k: decode_arg(x, nodes) for k, x in v.items()},
        "float": float,
        "dtype": lambda v: _dtype(v),
    }
    return decoders[kind](value)


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ExportError(f"unknown dtype {name!r} in artifact")
    return dtype


# ---- modules ---------------------------------------------------------------------------------------------

def _qp(d: dict | None) -> ActQParams | None:
    return None if d is None else ActQParams(**d)


def _asdict(x) -> dict | None:
    return None if x is None else dataclasses.asdict(x)


def _weight_layer_encode(m: q8.Int8WeightLayer):
    config = {"in_qp": _asdict(m.in_qp), "out_qp": _asdict(m.out_qp), "relu": m.relu,
              "geometry": _asdict(m.geometry)}
    tensors = {"weight_int8": m.weight_int8, "weight_scale": m.weight_scale}
    if m.bias is not None:
        tensors["bias"] = m.bias
    return config, tensors


def _weight_layer_decode(cls):
    def decode(config, tensors, backend):
        geometry = None if config["geometry"] is None else ConvGeometry(**config["geometry"])
        weight = Int8Weight(tensors["weight_int8"], tensors["weight_scale"])
        return cls(weight, tensors.get("bias"), _qp(config["in_qp"]), _qp(config["out_qp"]), config["relu"],
                   backend, geometry)
    return decode


def _layer_add_encode(m: q8.Int8LayerAdd):
    config, tensors = _weight_layer_encode(m)
    config.update(layer_qp=_asdict(m.layer_qp), layer_relu=m.layer_relu, other_qp=_asdict(m.other_qp))
    return config, tensors


def _layer_add_decode(cls):
    def decode(config, tensors, backend):
        geometry = None if config["geometry"] is None else ConvGeometry(**config["geometry"])
        weight = Int8Weight(tensors["weight_int8"], tensors["weight_scale"])
        m = cls(weight, tensors.get("bias"), _qp(config["in_qp"]), _qp(config["layer_qp"]), config["layer_relu"],
                _qp(config["other_qp"]), backend, geometry)
        m.out_qp, m.relu = _qp(config["out_qp"]), config["relu"]
        return m
    return decode


def _keep_grid_encode(m: q8.KeepGrid):
    fn = m.fn
    if isinstance(fn, nn.Module):
        module_type, module_config, _ = encode_float_module(fn)
        target = {"module": module_type, "config": module_config}
    elif fn in FUNCTION_NAMES:
        target = {"function": FUNCTION_NAMES[fn]}
    else:
        raise ExportError(f"KeepGrid wraps an unsupported op {fn!r}")
    return {"fn": target, "args": encode_arg(m.args), "kwargs": encode_arg(m.kwargs), "qp": _asdict(m.qp)}, {}


def _keep_grid_decode(config, tensors, backend):
    target = config["fn"]
    fn = FUNCTIONS[target["function"]] if "function" in target else decode_float_module(
        target["module"], target["config"], {})
    return q8.KeepGrid(fn, decode_arg(config["args"], {}), decode_arg(config["kwargs"], {}), _qp(config["qp"]), backend)


def _binary_encode(m: q8.Int8Binary):
    return {"op": m.op, "a_qp": _asdict(m.a_qp), "b_qp": _asdict(m.b_qp), "out_qp": _asdict(m.out_qp),
            "relu": m.relu}, {}


def _binary_decode(config, tensors, backend):
    m = q8.Int8Binary(config["op"], _qp(config["a_qp"]), _qp(config["b_qp"]), backend)
    m.out_qp, m.relu = _qp(config["out_qp"]), config["relu"]
    return m


def _layer_norm_encode(m: q8.Int8LayerNorm):
    tensors = {name: t for name, t in (("weight", m.weight), ("bias", m.bias)) if t is not None}
    return {"in_qp": _asdict(m.in_qp), "out_qp": _asdict(m.out_qp), "eps": m.eps}, tensors


def _layer_norm_decode(config, tensors, backend):
    m = q8.Int8LayerNorm(_qp(config["in_qp"]), tensors.get("weight"), tensors.get("bias"), config["eps"], backend)
    m.out_qp = _qp(config["out_qp"])
    return m


def _softmax_decode(config, tensors, backend):
    m = q8.Int8Softmax(_qp(config["in_qp"]), backend)
    m.out_qp = _qp(config["out_qp"])
    return m


def _attention_encode(m: q8.Int8Attention):
    return {"grids": _asdict(m.grids), "out_qp": _asdict(m.out_qp)}, {}


def _attention_decode(config, tensors, backend):
    m = q8.Int8Attention(AttentionGrids(**{name: _qp(qp) for name, qp in config["grids"].items()}), backend)
    m.out_qp = _qp(config["out_qp"])
    return m


def _lookup_decode(config, tensors, backend):
    m = q8.Int8Lookup(tensors["values"], _qp(config["in_qp"]), backend)
    m.out_qp = _qp(config["out_qp"])
    return m


def _cat_decode(config, tensors, backend):
    m = q8.Int8Cat(tuple(_qp(q) for q in config["qps"]), config["dim"], backend)
    m.out_qp = _qp(config["out_qp"])
    return m


INT8_CODECS: dict[type, tuple[Callable, Callable]] = {
    q8.Int8Linear: (_weight_layer_encode, _weight_layer_decode(q8.Int8Linear)),
    q8.Int8Conv2d: (_weight_layer_encode, _weight_layer_decode(q8.Int8Conv2d)),
    q8.Int8Conv2dAdd: (_layer_add_encode, _layer_add_decode(q8.Int8Conv2dAdd)),
    q8.Int8LinearAdd: (_layer_add_encode, _layer_add_decode(q8.Int8LinearAdd)),
    q8.Int8Conv1d: (_weight_layer_encode, _weight_layer_decode(q8.Int8Conv1d)),
    q8.Int8ConvTranspose2d: (_weight_layer_encode, _weight_layer_decode(q8.Int8ConvTranspose2d)),
    q8.Quantize: (lambda m: ({"qp": _asdict(m.qp)}, {}), lambda c, t, b: q8.Quantize(_qp(c["qp"]), b)),
    q8.Dequantize: (lambda m: ({"qp": _asdict(m.qp)}, {}), lambda c, t, b: q8.Dequantize(_qp(c["qp"]), b)),
    q8.Requantize: (lambda m: ({"in_qp": _asdict(m.in_qp), "out_qp": _asdict(m.out_qp)}, {}),
                    lambda c, t, b: q8.Requantize(_qp(c["in_qp"]), _qp(c["out_qp"]), b)),
    q8.Int8Binary: (_binary_encode, _binary_decode),
    q8.Int8Cat: (lambda m: ({"qps": [_asdict(q) for q in m.qps], "dim": m.dim, "out_qp": _asdict(m.out_qp)}, {}),
                 _cat_decode),
    q8.KeepGrid: (_keep_grid_encode, _keep_grid_decode),
    q8.Int8LayerNorm: (_layer_norm_encode, _layer_norm_decode),
    q8.Int8Attention: (_attention_encode, _attention_decode),
    q8.Int8Softmax: (lambda m: ({"in_qp": _asdict(m.in_qp), "out_qp": _asdict(m.out_qp)}, {}), _softmax_decode),
    q8.Int8Lookup: (lambda m: ({"in_qp": _asdict(m.in_qp), "out_qp": _asdict(m.out_qp)}, {"values": m.values}),
                    _lookup_decode),
    q8.Relabel: (lambda m: ({"in_qp": _asdict(m.in_qp), "out_qp": _asdict(m.out_qp)}, {}),
                 lambda c, t, b: q8.Relabel(_qp(c["in_qp"]), _qp(c["out_qp"]), b)),
}
INT8_TYPES = {cls.__name__: cls for cls in INT8_CODECS}

# float torch.nn modules: the constructor attributes to record (state tensors come from the state_dict)
FLOAT_MODULES: dict[type[nn.Module], tuple[str, ...]] = {
    nn.Identity: (), nn.ReLU: (), nn.ReLU6: (), nn.GELU: ("approximate",), nn.SiLU: (), nn.Sigmoid: (),
    nn.Hardswish: (), nn.Hardsigmoid: (), nn.Tanh: (), nn.Softmax: ("dim",),
    nn.Dropout: ("p",), nn.Flatten: ("start_dim", "end_dim"),
    nn.AdaptiveAvgPool2d: ("output_size",), nn.AdaptiveAvgPool1d: ("output_size",),
    nn.AvgPool2d: ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad"),
    nn.MaxPool2d: ("kernel_size", "stride", "padding", "dilation", "ceil_mode"),
    nn.LayerNorm: ("normalized_shape", "eps", "elementwise_affine"),
    nn.BatchNorm2d: ("num_features", "eps", "momentum"), nn.BatchNorm1d: ("num_features", "eps", "momentum"),
    nn.Linear: ("in_features", "out_features"),
    nn.Conv2d: ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"),
}
FLOAT_TYPES = {cls.__name__: cls for cls in FLOAT_MODULES}


def encode_float_module(m: nn.Module) -> tuple[str, dict, dict]:
    config = {name: encode_arg(getattr(m, name)) for name in FLOAT_MODULES[type(m)]}
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        config["bias"] = m.bias is not None
    return type(m).__name__, config, dict(m.state_dict())


def decode_float_module(type_name: str, config: dict, tensors: dict) -> nn.Module:
    module = FLOAT_TYPES[type_name](**{k: decode_arg(v, {}) for k, v in config.items()})
    if tensors:
        module.load_state_dict(tensors, strict=True)
    return module.eval()


def encode_module(m: nn.Module) -> tuple[str, dict, dict]:
    """(type name, JSON config, tensors) for a supported module; ExportError otherwise."""
    if type(m) in INT8_CODECS:
        config, tensors = INT8_CODECS[type(m)][0](m)
        return type(m).__name__, config, tensors
    if type(m) in FLOAT_MODULES:
        return encode_float_module(m)
    supported = sorted(INT8_TYPES) + sorted(FLOAT_TYPES)
    raise ExportError(f"cannot export a {type(m).__name__}; supported module types: {', '.join(supported)}")


def decode_module(type_name: str, config: dict, tensors: dict, backend: str) -> nn.Module:
    if type_name in INT8_TYPES:
        return INT8_CODECS[INT8_TYPES[type_name]][1](config, tensors, backend)
    if type_name in FLOAT_TYPES:
        return decode_float_module(type_name, config, tensors)
    raise ExportError(f"artifact names an unknown module type {type_name!r}")
