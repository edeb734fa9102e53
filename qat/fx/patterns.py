"""Tables that classify graph nodes for the planner: quantizable layers, fusable BN/activations, scale-keeping
ops and quantized functional ops. Extending support means adding a row, not a branch."""
from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from qat.fx.modules import BN_TYPES, FLOAT_TO_QAT

BN_FOR_LAYER: dict[type[nn.Module], tuple[type[nn.Module], ...]] = {
    nn.Conv1d: (nn.BatchNorm1d,),
    nn.Conv2d: (nn.BatchNorm2d,),
    nn.Conv3d: (nn.BatchNorm3d,),
    nn.ConvTranspose2d: (nn.BatchNorm2d,),
    nn.Linear: (nn.BatchNorm1d,),
}

ACTIVATION_MODULES: dict[type[nn.Module], str] = {nn.ReLU: "relu", nn.ReLU6: "relu6"}
ACTIVATION_FUNCTIONS: dict[object, str] = {F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu6: "relu6"}
ACTIVATION_METHODS: dict[str, str] = {"relu": "relu", "relu_": "relu"}

# ops whose output lies on its input's grid: they need no quantizer of their own
SCALE_KEEPING_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
    nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, nn.ReLU, nn.ZeroPad2d, nn.ChannelShuffle,
)
SCALE_KEEPING_FUNCTIONS: frozenset = frozenset({
    torch.flatten, torch.reshape, torch.transpose, torch.permute, torch.squeeze, torch.unsqueeze,
    torch.chunk, torch.split, torch.narrow, operator.getitem, F.max_pool1d, F.max_pool2d, F.relu, torch.relu,
    F.dropout, F.adaptive_max_pool2d, F.pad,
})
SCALE_KEEPING_METHODS: frozenset = frozenset({
    "view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze", "unsqueeze", "chunk",
    "split", "expand", "narrow", "unflatten", "relu", "relu_",
})

# functional ops quantized when all their inputs are activations; value = op kind
BINARY_FUNCTIONS: dict[object, str] = {
    operator.add: "add", operator.iadd: "add", torch.add: "add",
    operator.mul: "mul", operator.imul: "mul", torch.mul: "mul",
    operator.matmul: "matmul", torch.matmul: "matmul", torch.bmm: "matmul",
}
BINARY_METHODS: dict[str, str] = {"add": "add", "add_": "add", "mul": "mul", "mul_": "mul", "matmul": "matmul", "bmm": "matmul"}
CAT_FUNCTIONS: frozenset = frozenset({torch.cat, torch.concat, torch.concatenate})

# x * c, c * x and x / c by a Python number c
SCALAR_MULTIPLY: frozenset = frozenset({operator.mul, torch.mul})
SCALAR_DIVIDE: frozenset = frozenset({operator.truediv, torch.div})

# reads of a tensor's metadata that an int8 value answers as its float value would (not dtype)
METADATA_ATTRIBUTES: frozenset = frozenset({"shape", "ndim", "device"})
METADATA_METHODS: frozenset = frozenset({"size", "dim"})


def module_of(node: fx.Node, modules: dict[str, nn.Module]) -> nn.Module | None:
    return modules.get(node.target) if node.op == "call_module" else None


def is_layer(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    return type(module_of(node, modules)) in FLOAT_TO_QAT


def is_bn(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    return isinstance(module_of(node, modules), BN_TYPES)


def activation_kind(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """'relu'/'relu6' when the node applies a fusable activation to its first argument."""
    if node.op == "call_module":
        return ACTIVATION_MODULES.get(type(modules.get(node.target)))
    if node.op == "call_function":
        return ACTIVATION_FUNCTIONS.get(node.target)
    if node.op == "call_method":
        return ACTIVATION_METHODS.get(node.target)
    return None


def keeps_scale(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), SCALE_KEEPING_MODULES)
    if node.op == "call_function":
        return node.target in SCALE_KEEPING_FUNCTIONS
    return node.op == "call_method" and node.target in SCALE_KEEPING_METHODS


def binary_kind(node: fx.Node) -> str | None:
    if node.op == "call_function":
        return BINARY_FUNCTIONS.get(node.target)
    if node.op == "call_method":
        return BINARY_METHODS.get(node.target)
    return None


def is_cat(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in CAT_FUNCTIONS


def reads_metadata(node: fx.Node) -> bool:
    """``x.shape`` / ``x.ndim`` / ``x.device`` / ``x.size()`` / ``x.dim()``: no value of x is read."""
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) == 2 and node.args[1] in METADATA_ATTRIBUTES
    return node.op == "call_method" and node.target in METADATA_METHODS


def power_of_two_factor(node: fx.Node) -> tuple[fx.Node, float] | None:
    """(x, c) when the node computes x * c, c * x or x / (1 / c) with c a power of two: an exact scaling of
    every float32 value (short of overflow), which can move into a scale."""
    if node.op != "call_function" or node.kwargs or len(node.args) != 2:
        return None
    x, c = node.args
    if node.target in SCALAR_MULTIPLY and isinstance(x, (int, float)):
        x, c = c, x
    if not isinstance(x, fx.Node) or isinstance(c, bool) or not isinstance(c, (int, float)) or c <= 0:
        return None
    if node.target in SCALAR_DIVIDE:
        c = 1.0 / c
    elif node.target not in SCALAR_MULTIPLY:
        return None
    return (x, float(c)) if math.frexp(c)[0] == 0.5 else None


def is_last_dim_layer_norm(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """An nn.LayerNorm module over the last dim, called on one tensor."""
    module = module_of(node, modules)
    return isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1 and len(node.args) == 1 \
        and not node.kwargs
