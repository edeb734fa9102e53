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

# softmax over a dim given as an argument (the last one is what int8 lowering takes)
SOFTMAX_FUNCTIONS: frozenset = frozenset({torch.softmax, F.softmax})

# elementwise float functions of one tensor (other arguments constant): over an int8 input, a table of its
# 256 codes computes them (ReLU and ReLU6 keep the grid or fuse into layers instead)
ELEMENTWISE_MODULES: frozenset = frozenset({
    nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU, nn.ELU, nn.Mish,
    nn.Softplus,
})
ELEMENTWISE_FUNCTIONS: frozenset = frozenset({
    F.gelu, F.silu, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.hardswish, F.hardsigmoid, F.leaky_relu,
    F.elu, F.mish, F.softplus,
})
ELEMENTWISE_METHODS: frozenset = frozenset({"sigmoid", "tanh"})

# modules that are the identity in eval mode
EVAL_IDENTITY_MODULES: frozenset = frozenset({nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                                              nn.AlphaDropout})

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


def is_last_dim_softmax(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Softmax over dim -1 of one tensor in its own dtype: ``torch.softmax``, ``F.softmax``, ``x.softmax`` or
    an ``nn.Softmax(dim=-1)`` module."""
    module = module_of(node, modules)
    if module is not None:
        return type(module) is nn.Softmax and module.dim == -1 and len(node.args) == 1 and not node.kwargs
    is_call = (node.op == "call_function" and node.target in SOFTMAX_FUNCTIONS) or (
        node.op == "call_method" and node.target == "softmax")
    if not is_call or len(node.args) > 2:
        return False
    kwargs = {k: v for k, v in node.kwargs.items() if k != "_stacklevel"}
    dim = node.args[1] if len(node.args) == 2 else kwargs.pop("dim", None)
    return dim == -1 and kwargs.pop("dtype", None) is None and not kwargs


def elementwise_function(node: fx.Node, modules: dict[str, nn.Module]):
    """The function a node applies elementwise to its first argument and nothing else read from the graph
    (a module of the table, or a function / method of it), or None. In-place ones count only when nothing
    else reads the input."""
    if not node.args or node.all_input_nodes != [node.args[0]]:
        return None
    module = module_of(node, modules)
    if node.op == "call_module":
        fn = module if type(module) in ELEMENTWISE_MODULES else None
        inplace = getattr(module, "inplace", False)
    elif node.op == "call_function":
        fn = node.target if node.target in ELEMENTWISE_FUNCTIONS else None
        inplace = node.kwargs.get("inplace", False) or any(a is True for a in node.args[1:])
    elif node.op == "call_method" and node.target in ELEMENTWISE_METHODS:
        fn, inplace = getattr(torch, node.target), False
    else:
        return None
    return None if inplace and len(node.args[0].users) > 1 else fn


def is_eval_identity(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A call of a module that returns its input in eval mode (Dropout, Identity)."""
    return type(module_of(node, modules)) in EVAL_IDENTITY_MODULES and len(node.args) == 1 and not node.kwargs
