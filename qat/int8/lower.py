"""Lower a prepared (fake-quant) GraphModule to int8 modules, reading every scale, zero point and clamp from
the fake-quant model itself, so the int8 model computes what the fake-quant model computed.

Walk the graph in order, tracking which values are int8 (and on which grid):
  activation quantizer after an int8-capable op  -> becomes that op's output qparams (requantize epilogue)
  activation quantizer on a float value          -> Quantize
  QAT Conv/Linear with an int8 input             -> Int8Conv*/Int8Linear (BN folded, ReLU fused)
  add / mul / matmul / cat of int8 inputs        -> Int8Binary / Int8Cat
  LayerNorm (last dim) of an int8 value          -> Int8LayerNorm (requantized by its quantizer, if any)
  softmax (last dim) of an int8 value            -> Int8Softmax (likewise)
  elementwise function of an int8 value          -> Int8Lookup (GELU, SiLU, sigmoid, ...: a 256-entry table)
  int8 x * c, c a power of two (1/sqrt(d))       -> Relabel: x's codes on x's scale times c (no pass)
  add of a conv / Linear output read only by     -> Int8Conv2dAdd / Int8LinearAdd (layer + add in one
  the add                                           epilogue), when the backend fuses them (``fuses_layer_add``)
  softmax(q @ k_t [* c]) @ v, each step int8      -> Int8Attention (one kernel, scores and probabilities in
  and read only by the next                         registers), when the backend fuses it (``fuses_attention``)
  grid-keeping op on an int8 value               -> left as is (shape ops) or KeepGrid (pool, ReLU, pad)
  shape / ndim / device / size() of an int8 value -> left reading the int8 value (no Dequantize)
  anything else reading an int8 value            -> gets a Dequantize in front (runs in float)
Dropout and Identity modules (the identity in eval mode) leave the graph first, so that they come between
no op and its quantizer.
"""
from __future__ import annotations

import copy
import dataclasses
import operator

import torch
from torch import fx, nn

from qat.fx import patterns
from qat.fx.api import model_device
from qat.fx.modules import QConv, QConvTranspose2d, QLinear, QuantizedWeightModule
from qat.fx.rewrite import activation_quantizer_name, set_preserved_attr, undo_training_fusions
from qat.int8 import modules as q8
from qat.kernels import BACKENDS, ActQParams, AttentionGrids, ConvGeometry, Int8Weight
from qat.quant.affine import quantize
from qat.quant.fake_quantize import QuantizerBase

SHAPE_METHODS = frozenset({"view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze",
                           "unsqueeze", "chunk", "split", "expand", "narrow", "unflatten"})
SHAPE_FUNCTIONS = frozenset({torch.flatten, torch.reshape, torch.transpose, torch.permute, torch.squeeze,
                             torch.unsqueeze, torch.chunk, torch.split, torch.narrow})


class ConversionError(ValueError):
    """A layer cannot be lowered to int8 as configured (the message names it)."""


def act_qparams(fq: QuantizerBase, relu6: bool = False) -> ActQParams | None:
    """Per-tensor activation qparams of a quantizer, or None when it is dynamic (per-token) and stays float."""
    if fq.spec.is_dynamic or fq.spec.is_per_channel:
        return None
    scale, zero = fq.qparams()
    qmin, qmax = fq.spec.qmin, fq.spec.qmax
    qp = ActQParams(float(scale.reshape(())), int(zero.reshape(())), qmin, qmax)
    if relu6:  # clamp(round(min(y, 6) / s) + z) == clamp codes at round(6 / s) + z: round is monotone
        six = int(torch.round(torch.tensor(6.0) * qp.inv_scale)) + qp.zero_point
        qp = ActQParams(qp.scale, qp.zero_point, max(qmin, qp.zero_point), min(qmax, six))
    return qp


def int8_weight(module: QuantizedWeightModule, name: str) -> tuple[Int8Weight, torch.Tensor | None]:
    """The module's (BN-folded) weight quantized with its weight quantizer's qparams, and its float bias."""
    spec = module.weight_fq.spec
    if not spec.symmetric or not spec.signed:
        raise ConversionError(f"layer '{name}': int8 kernels need signed symmetric weights, got {spec.short()}")
    with torch.no_grad():
        weight, bias = module.folded_weight_and_bias()
        scale, zero = module.weight_fq.qparams()
        q = quantize(weight, scale, zero, spec)
    per_channel = scale.float().reshape(-1).expand(module.out_channels if hasattr(module, "out_channels")
                                                   else module.out_features).contiguous()
    return Int8Weight(q, per_channel.clone()), (None if bias is None else bias.detach().float())


def _geometry(m: nn.Module) -> ConvGeometry:
    if isinstance(m, QConvTranspose2d):
        return ConvGeometry(m.stride, m.padding, m.dilation, m.groups, m.output_padding)
    if m.float_type is nn.Conv1d:
        return ConvGeometry((1, m.stride[0]), (0, m.padding[0]), (1, m.dilation[0]), m.groups)
    return ConvGeometry(m.stride, m.padding, m.dilation, m.groups)


def int8_layer(m: QuantizedWeightModule, name: str, in_qp: ActQParams, backend: str) -> q8.Int8WeightLayer:
    weight, bias = int8_weight(m, name)
    relu = m.activation == "relu"
    if isinstance(m, QLinear):
        return q8.Int8Linear(weight, bias, in_qp, None, relu, backend)
    if isinstance(m, QConvTranspose2d):
        return q8.Int8ConvTranspose2d(weight, bias, in_qp, None, relu, backend, _geometry(m))
    if isinstance(m, QConv) and m.float_type is nn.Conv1d:
        weight = Int8Weight(weight.q.unsqueeze(2), weight.scale)  # [out, in, k] -> [out, in, 1, k]
        return q8.Int8Conv1d(weight, bias, in_qp, None, relu, backend, _geometry(m))
    if isinstance(m, QConv) and m.float_type is nn.Conv2d:
        return q8.Int8Conv2d(weight, bias, in_qp, None, relu, backend, _geometry(m))
    raise ConversionError(f"layer '{name}': no int8 kernel for {m.float_type.__name__}")


def _fuses_relu(module: nn.Module | None) -> bool:
    """Ops whose requantize epilogue can apply a following ReLU (raising the clamp floor)."""
    return isinstance(module, q8.Int8LayerAdd) or (isinstance(module, q8.Int8Binary) and module.op in ("add", "mul"))


class _Lowering:
    def __init__(self, gm: fx.GraphModule, backend: str, fuse_layer_add: bool, fuse_attention: bool,
                 int8_activations: bool):
        self.gm, self.backend, self.fuse_layer_add, self.fuse_attention = gm, backend, fuse_layer_add, fuse_attention
        self.int8_activations = int8_activations
        self.modules = dict(gm.named_modules())
        self.grid: dict[fx.Node, ActQParams] = {}  # int8 values and their qparams
        self.open_ops: dict[fx.Node, nn.Module] = {}  # int8 ops whose output qparams are not set yet
        self.dequantized: dict[fx.Node, fx.Node] = {}
        self.value_map: dict[str, str] = {}  # activation quantizer name -> int8 node carrying its value
        self.relu6_ops: set[fx.Node] = set()  # layers with a fused ReLU6: their output clamp narrows
        self.count = 0
        self.device = model_device(gm)  # where lookup tables are computed

    def _add_module(self, prefix: str, module: nn.Module) -> str:
        self.count += 1
        name = f"int8_{prefix}_{self.count}"
        self.gm.add_module(name, module)
        return name

    def _replace(self, node: fx.Node, module: nn.Module, prefix: str, args: tuple) -> fx.Node:
        name = self._add_module(prefix, module)
        with self.gm.graph.inserting_before(node):
            new = self.gm.graph.call_module(name, args)
        node.replace_all_uses_with(new)
        self.gm.graph.erase_node(node)
        return new

    def run(self) -> None:
        for node in list(self.gm.graph.nodes):
            if self._relu_before_quantizer(node):
                continue  # fused into the op before it when its quantizer is reached
            if patterns.reads_metadata(node) and (node.args[0] in self.grid or node.args[0] in self.open_ops):
                continue  # an int8 value has its float value's shape: no Dequantize pass for it
            if self._fold_power_of_two(node):
                continue
            if node.op == "call_module" and isinstance(self.modules.get(node.target), QuantizerBase):
                self._activation_quantizer(node)
            elif node.op == "call_module" and isinstance(self.modules.get(node.target), QuantizedWeightModule):
                self._layer(node)
            elif patterns.binary_kind(node) and self._int8_args(node.args[:2]):
                self._binary(node)
            elif patterns.is_cat(node) and self._int8_args(node.args[0]):
                self._cat(node)
            elif self._int8_args(node.args[:1]) and patterns.keeps_scale(node, self.modules):
                self._keep_grid(node)
            elif self._int8_args(node.args[:1]) and patterns.is_last_dim_layer_norm(node, self.modules):
                self._layer_norm(node)
            elif self._int8_args(node.args[:1]) and patterns.is_last_dim_softmax(node, self.modules):
                self._open_op(node, q8.Int8Softmax(self.grid[node.args[0]], self.backend), "softmax")
            elif self._int8_args(node.args[:1]) and (fn := patterns.elementwise_function(node, self.modules)):
                self._lookup(node, fn)
            else:
                self._float_node(node)

    def _relu_before_quantizer(self, node: fx.Node) -> bool:
        if patterns.activation_kind(node, self.modules) != "relu" or not node.args:
            return False
        op, users = node.args[0], list(node.users)
        fuses = _fuses_relu(self.open_ops.get(op)) and len(op.users) == 1
        feeds_quantizer = len(users) == 1 and isinstance(self.modules.get(users[0].target), QuantizerBase)
        return fuses and feeds_quantizer

    def _int8_args(self, args) -> bool:
        return isinstance(args, (list, tuple)) and len(args) > 0 and all(a in self.grid for a in args)

    def _activation_quantizer(self, node: fx.Node) -> None:
        fq = self.modules[node.target]
        value = node.args[0]
        producer = self._absorb_relu(value)
        qp = act_qparams(fq, relu6=producer in self.relu6_ops)
        if qp is None:
            return self._float_node(node)  # dynamic quantizer: stays fake-quant in float
        qp = qp.as_int8() if self.int8_activations else qp
        quantizer_name = activation_quantizer_name(node)
        if producer in self.open_ops:  # the op's requantize epilogue takes the quantizer's place
            self.open_ops.pop(producer).out_qp = qp
            new = self._drop(node, producer)
        elif value in self.grid and self.grid[value] == qp:
            new = self._drop(node, value)
        elif value in self.grid:
            new = self._replace(node, q8.Requantize(self.grid[value], qp, self.backend), "requantize", (value,))
        else:
            new = self._replace(node, q8.Quantize(qp, self.backend), "quantize", (value,))
        self.grid[new] = qp
        self.value_map[quantizer_name] = new.name

    def _drop(self, node: fx.Node, replacement: fx.Node) -> fx.Node:
        """Remove `node`, its users reading `replacement` instead."""
        node.replace_all_uses_with(replacement)
        self.gm.graph.erase_node(node)
        return replacement

    def _absorb_relu(self, value: fx.Node) -> fx.Node:
        """A ReLU between an open add/mul and its output quantizer fuses into the op."""
        if patterns.activation_kind(value, self.modules) != "relu" or not value.args:
            return value
        op = value.args[0]
        module = self.open_ops.get(op)
        if _fuses_relu(module) and len(op.users) == 1:
            module.relu = True
            value.replace_all_uses_with(op)
            self.gm.graph.erase_node(value)
            return op
        return value

    def _layer(self, node: fx.Node) -> None:
        module = self.modules[node.target]
        x = node.args[0]
        if x not in self.grid or module.input_fq is not None:
            return self._float_node(node)
        int8 = int8_layer(module, node.target, self.grid[x], self.backend)
        _set_submodule(self.gm, node.target, int8)
        self.modules[node.target] = int8
        self.open_ops[node] = int8
        if module.activation == "relu6":
            self.relu6_ops.add(node)

    def _binary(self, node: fx.Node) -> None:
        fusable = self._fusable_layer(node)
        if fusable is not None:
            return self._layer_add(node, *fusable)
        chain = self._attention_chain(node)
        if chain is not None:
            return self._attention(node, *chain)
        a, b = node.args[:2]
        op = q8.Int8Binary(patterns.binary_kind(node), self.grid[a], self.grid[b], self.backend)
        new = self._replace(node, op, op.op, (a, b))
        self.modules[new.target] = op
        self.open_ops[new] = op

    def _fold_power_of_two(self, node: fx.Node) -> bool:
        """``x * c`` on an int8 x with c a power of two (attention's 1/sqrt(d)): x's codes on a grid scaled by c,
        bit for bit (scaling by 2^k is exact in float32), so the softmax after it reads int8 codes too."""
        scaled = patterns.power_of_two_factor(node)
        if scaled is None or scaled[0] not in self.grid:
            return False
        value, factor = scaled
        qp = self.grid[value]
        relabel = q8.Relabel(qp, dataclasses.replace(qp, scale=qp.scale * factor), self.backend)
        new = self._replace(node, relabel, "relabel", (value,))
        self.modules[new.target] = relabel
        self.grid[new] = relabel.out_qp
        return True

    def _fusable_layer(self, node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
        """(layer, other) when ``node`` adds the requantized output of an Int8Conv2d or Int8Linear that nothing
        else reads."""
        if not self.fuse_layer_add or patterns.binary_kind(node) != "add" or node.kwargs:
            return None
        a, b = node.args[:2]
        for layer, other in ((a, b), (b, a)):
            if layer is not other and any(self._sole_reader_module(layer, cls) is not None for cls in q8.FUSED_ADD):
                return layer, other
        return None

    def _layer_add(self, node: fx.Node, layer: fx.Node, other: fx.Node) -> None:
        """Replace ``add(layer(x), other)`` by one Int8Conv2dAdd / Int8LinearAdd call ``(x, other)`` at the add's
        place."""
        module = self.modules[layer.target]
        fused = q8.FUSED_ADD[type(module)].from_layer(module, self.grid[other])
        _set_submodule(self.gm, layer.target, fused)
        self.modules[layer.target] = fused
        with self.gm.graph.inserting_before(node):
            new = self.gm.graph.call_module(layer.target, (layer.args[0], other))
        node.replace_all_uses_with(new)
        self.gm.graph.erase_node(node)
        self.gm.graph.erase_node(layer)
        del self.grid[layer]  # the layer's own output exists only inside the fused kernel now
        self.value_map = {q: name for q, name in self.value_map.items() if name != layer.name}
        self.open_ops[new] = fused

    def _sole_reader_module(self, node: fx.Node, cls: type) -> nn.Module | None:
        """The ``cls`` module that ``node`` calls, when one node reads its output and its out_qp is set."""
        module = self.modules.get(node.target) if node.op == "call_module" else None
        if type(module) is cls and len(node.users) == 1 and module.out_qp is not None:
            return module
        return None

    def _attention_chain(self, node: fx.Node) -> tuple[fx.Node, fx.Node | None, fx.Node] | None:
        """(scores, relabel or None, softmax) when ``node`` is ``softmax(relabel(scores)) @ v`` with ``scores``
        an int8 ``q @ k_t``, each step requantized and read only by the next."""
        if not self.fuse_attention or patterns.binary_kind(node) != "matmul" or node.kwargs:
            return None
        softmax = node.args[0]
        if self._sole_reader_module(softmax, q8.Int8Softmax) is None:
            return None
        relabel = softmax.args[0] if self._sole_reader_module(softmax.args[0], q8.Relabel) is not None else None
        scores = softmax.args[0] if relabel is None else relabel.args[0]
        matmul = self._sole_reader_module(scores, q8.Int8Binary)
        return (scores, relabel, softmax) if matmul is not None and matmul.op == "matmul" else None

    def _attention(self, node: fx.Node, scores: fx.Node, relabel: fx.Node | None, softmax: fx.Node) -> None:
        """Replace ``softmax(relabel(q @ k_t)) @ v`` by one Int8Attention call ``(q, k_t, v)`` at ``node``."""
        matmul, probs = self.modules[scores.target], self.modules[softmax.target]
        (q, k_t), v = scores.args[:2], node.args[1]
        grids = AttentionGrids(q=matmul.a_qp, k=matmul.b_qp, scores=matmul.out_qp, logits=probs.in_qp,
                               probs=probs.out_qp, v=self.grid[v])
        fused = q8.Int8Attention(grids, self.backend)
        new = self._replace(node, fused, "attention", (q, k_t, v))
        inner = [n for n in (softmax, relabel, scores) if n is not None]
        for dead in inner:  # their values exist only inside the fused kernel now
            self.gm.graph.erase_node(dead)
            del self.grid[dead]
        names = {n.name for n in inner}
        self.value_map = {fq: name for fq, name in self.value_map.items() if name not in names}
        self.modules[new.target] = fused
        self.open_ops[new] = fused

    def _cat(self, node: fx.Node) -> None:
        inputs = list(node.args[0])
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        op = q8.Int8Cat(tuple(self.grid[t] for t in inputs), dim, self.backend)
        new = self._replace(node, op, "cat", tuple(inputs))
        self.modules[new.target] = op
        self.open_ops[new] = op

    def _keep_grid(self, node: fx.Node) -> None:
        qp = self.grid[node.args[0]]
        is_shape_op = (node.op == "call_method" and node.target in SHAPE_METHODS) or (
            node.op == "call_function" and node.target in SHAPE_FUNCTIONS | {operator.getitem})
        if is_shape_op or isinstance(self.modules.get(node.target), (nn.Identity, nn.Dropout, nn.Flatten)):
            self.grid[node] = qp
            return
        fn = self.modules[node.target] if node.op == "call_module" else node.target
        if node.op == "call_method":
            return self._float_node(node)
        keep = q8.KeepGrid(fn, tuple(node.args[1:]), dict(node.kwargs), qp, self.backend)
        new = self._replace(node, keep, "keep", (node.args[0],))
        self.grid[new] = qp

    def _layer_norm(self, node: fx.Node) -> None:
        self._open_op(node, q8.Int8LayerNorm.from_float(self.modules[node.target], self.grid[node.args[0]],
                                                        self.backend), "layer_norm")

    def _lookup(self, node: fx.Node, fn) -> None:
        op = q8.Int8Lookup.from_function(fn, tuple(node.args[1:]), dict(node.kwargs), self.grid[node.args[0]],
                                         self.backend, self.device)
        self._open_op(node, op, "lookup")

    def _open_op(self, node: fx.Node, op: nn.Module, prefix: str) -> None:
        """Replace a one-input node by ``op`` on its int8 input; its quantizer, if one follows, sets out_qp."""
        new = self._replace(node, op, prefix, (node.args[0],))
        self.modules[new.target] = op
        self.open_ops[new] = op

    def _float_node(self, node: fx.Node) -> None:
        for value in list(node.all_input_nodes):
            if value in self.open_ops:
                self.open_ops.pop(value)  # output stays float (out_qp None)
            elif value in self.grid:
                node.replace_input_with(value, self._dequantized(value))

    def _dequantized(self, value: fx.Node) -> fx.Node:
        if value not in self.dequantized:
            name = self._add_module("dequantize", q8.Dequantize(self.grid[value], self.backend))
            with self.gm.graph.inserting_after(value):
                self.dequantized[value] = self.gm.graph.call_module(name, (value,))
        return self.dequantized[value]


def _drop_eval_identities(gm: fx.GraphModule) -> None:
    """Remove Dropout / Identity calls (the identity in an eval-mode graph): their readers read their input."""
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if patterns.is_eval_identity(node, modules):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent_path) if parent_path else root, name, module)


def _lower_leaf_layers(gm: fx.GraphModule, backend: str, int8_activations: bool) -> None:
    """Self-quantizing QAT layers inside leaf modules: quantize input, int8 compute, float output."""
    for name, module in list(gm.named_modules()):
        if isinstance(module, QuantizedWeightModule) and module.input_fq is not None:
            in_qp = act_qparams(module.input_fq)
            if in_qp is not None:
                in_qp = in_qp.as_int8() if int8_activations else in_qp
                layer = int8_layer(module, name, in_qp, backend)
                _set_submodule(gm, name, nn.Sequential(q8.Quantize(in_qp, backend), layer))


def lower(prepared: fx.GraphModule, backend: str, fuse_layer_add: bool | None = None,
          int8_activations: bool | None = None, fuse_attention: bool | None = None) -> fx.GraphModule:
    """The int8 graph of ``prepared`` on ``backend``. fuse_layer_add: fuse conv -> add and Linear -> add into
    Int8Conv2dAdd / Int8LinearAdd (None: when the backend runs them as one kernel; every backend computes them,
    fused or not, bit for bit alike).
    fuse_attention: likewise for attention cores (Int8Attention; fused kernels agree with the unfused ones
    within 1 LSB: the cuda kernel's softmax takes exp2 and one reciprocal per row).
    int8_activations: carry uint8 activation grids as their int8 equivalents (None: where the backend's
    kernels prefer them; the same values either way, the codes 128 lower)."""
    gm = copy.deepcopy(prepared).eval()
    undo_training_fusions(gm)  # ReLUs back where the int8 epilogues apply them, quantizer chains two calls
    fuse_layer_add = BACKENDS[backend].fuses_layer_add if fuse_layer_add is None else fuse_layer_add
    fuse_attention = BACKENDS[backend].fuses_attention if fuse_attention is None else fuse_attention
    int8_activations = BACKENDS[backend].int8_activations if int8_activations is None else int8_activations
    for m in gm.modules():
        if isinstance(m, QuantizerBase):
            m.disable_observer()
    _drop_eval_identities(gm)
    lowering = _Lowering(gm, backend, fuse_layer_add, fuse_attention, int8_activations)
    lowering.run()
    _lower_leaf_layers(gm, backend, int8_activations)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    set_preserved_attr(gm, "qat_value_map", lowering.value_map)
    set_preserved_attr(gm, "qat_grids", {node.name: qp for node, qp in lowering.grid.items() if node.graph is gm.graph})
    set_preserved_attr(gm, "qat_backend", backend)
    return gm
