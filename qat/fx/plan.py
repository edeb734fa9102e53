"""Planning: decide, as plain data, what gets which quantizer and what fuses. No graph is changed here.

A value in the graph is "on a grid" when it is the output of an activation quantizer or of a scale-keeping op
(max-pool, reshape, ...) applied to one. Quantized compute (Conv/Linear layers, add, mul, cat, matmul/bmm)
needs its inputs on a grid (an input quantizer is planned on the value otherwise) and puts its output on one
(an output quantizer after the op, or after a ReLU that follows it).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import fx, nn

from qat.fx import patterns
from qat.fx.config import LayerQuant, QuantConfig
from qat.fx.leaf_swaps import LEAF_SWAPS
from qat.quant.config import QuantizerConfig


@dataclass(frozen=True)
class LayerDecision:
    """A Conv/Linear call swapped for a QAT module, with what fuses into it."""

    node: str  # graph node of the layer call
    module: str  # module path
    float_type: str
    bn: str | None  # fused BatchNorm module path
    activation: str | None  # fused activation kind
    fused_nodes: tuple[str, ...]  # BN/activation nodes folded into the layer node
    weight: QuantizerConfig
    activation_cfg: QuantizerConfig


@dataclass(frozen=True)
class ActDecision:
    """An activation quantizer applied to the value of `node`: for every user, or, when `users` names some
    (a requantizer to another precision), for those alone."""

    node: str
    quantizer: str  # name of the quantizer module; shared by several decisions for cat inputs
    role: str  # 'input' (of quantized compute), 'output' (of a quantized op) or 'requant' (for `users`)
    op: str  # what it serves, e.g. 'conv2d layer1.0.conv1', 'add', 'input of fc'
    config: QuantizerConfig
    users: tuple[str, ...] = ()


@dataclass(frozen=True)
class QuantPlan:
    layers: tuple[LayerDecision, ...]
    activations: tuple[ActDecision, ...]
    skipped: tuple[str, ...]  # Conv/Linear module paths kept in float
    leaves: tuple[str, ...]  # leaf module paths (quantized by module swap)
    swapped_leaves: tuple[str, ...] = ()  # leaves with a QAT replacement in LEAF_SWAPS

    def table(self) -> str:
        """One row per layer / op with its weight and activation specs."""
        rows = [("node", "kind", "weight", "activation", "fused")]
        for d in self.layers:
            fused = "+".join(x for x in ("bn" if d.bn else "", d.activation or "") if x) or "-"
            rows.append((d.module, d.float_type, d.weight.short(), d.activation_cfg.short(), fused))
        for a in self.activations:
            rows.append((a.node, f"act {a.role}", "-", a.config.short(), a.op))
        rows += [(name, "float (skipped)", "-", "-", "-") for name in self.skipped]
        rows += [(name, "leaf (module swap)", "-", "-", "-") for name in self.leaves + self.swapped_leaves]
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def _is_activation(arg, modules: dict[str, nn.Module]) -> bool:
    """A floating-point tensor computed from the inputs (not a parameter/constant, not a size)."""
    if not isinstance(arg, fx.Node) or arg.op == "get_attr":
        return False
    meta = arg.meta.get("tensor_meta")
    return meta is not None and hasattr(meta, "dtype") and meta.dtype.is_floating_point


class _Planner:
    def __init__(self, gm: fx.GraphModule, config: QuantConfig, leaves: tuple[str, ...]):
        self.gm, self.config, self.leaves = gm, config, leaves
        self.modules = dict(gm.named_modules())
        self.input_values = _input_values(gm, self.modules)
        self.grid_config: dict[fx.Node, QuantizerConfig] = {}  # values on a grid -> the quantizer that put them there
        self.requants: dict[tuple[fx.Node, QuantizerConfig], int] = {}  # -> index of the decision in self.acts
        self.resolved: dict[fx.Node, LayerQuant] = {}
        self.layers: list[LayerDecision] = []
        self.acts: list[ActDecision] = []
        self.quantized_values: set[fx.Node] = set()
        self.absorbed: dict[fx.Node, fx.Node] = {}  # fused BN/activation node -> layer node

    def run(self) -> QuantPlan:
        layer_nodes = self._layer_nodes()
        resolved = self.resolved = self._resolve_layers(layer_nodes)
        for node in self.gm.graph.nodes:
            self._visit(node, resolved)
        skipped = sorted({n.target for n in self.gm.graph.nodes if patterns.is_layer(n, self.modules)} -
                         {d.module for d in self.layers})
        swapped = tuple(
            n.target for n in self.gm.graph.nodes
            if n.op == "call_module" and type(self.modules[n.target]) in LEAF_SWAPS
            and self.config.resolve(n.target, type(self.modules[n.target]).__name__) is not None
        )
        return QuantPlan(tuple(self.layers), tuple(self.acts), tuple(skipped), self.leaves, swapped)

    def _layer_nodes(self) -> list[fx.Node]:
        return [n for n in self.gm.graph.nodes if patterns.is_layer(n, self.modules)]

    def _resolve_layers(self, layer_nodes: list[fx.Node]) -> dict[fx.Node, LayerQuant]:
        resolved = {}
        for node in layer_nodes:
            layer = self.config.resolve(node.target, type(self.modules[node.target]).__name__)
            if layer is not None:
                resolved[node] = layer
        if self.config.first_last_8bit and resolved:
            ordered = list(resolved)
            for node in {ordered[0], ordered[-1]}:
                resolved[node] = _at_8_bits(resolved[node])
        return resolved

    def _visit(self, node: fx.Node, resolved: dict[fx.Node, LayerQuant]) -> None:
        if node in self.absorbed or node in self.grid_config:
            return  # fused into a layer, or already given an output quantizer by the op before it
        if node in resolved:
            self._plan_layer(node, resolved[node])
        elif patterns.keeps_scale(node, self.modules) and node.args:
            first = node.args[0]
            if isinstance(first, fx.Node) and first in self.grid_config:
                self.grid_config[node] = self.grid_config[first]
        elif patterns.binary_kind(node) and self._all_activations(node.args[:2]):
            self._plan_op(node, patterns.binary_kind(node), list(node.args[:2]))
        elif patterns.is_cat(node) and self._all_activations(node.args[0]):
            self._plan_cat(node)

    def _all_activations(self, args) -> bool:
        return isinstance(args, (list, tuple)) and len(args) > 0 and all(_is_activation(a, self.modules) for a in args)

    def _sole_user(self, node: fx.Node) -> fx.Node | None:
        users = list(node.users)
        return users[0] if len(users) == 1 else None

    def _fusion_chain(self, node: fx.Node) -> tuple[fx.Node | None, fx.Node | None, str | None]:
        module = self.modules[node.target]
        calls = sum(1 for n in self.gm.graph.nodes if n.op == "call_module" and n.target == node.target)
        if calls > 1:
            return None, None, None  # shared weights: what follows one call must not change the others
        bn, act, kind, end = None, None, None, node
        nxt = self._sole_user(node)
        if self.config.fuse_bn and nxt is not None and patterns.is_bn(nxt, self.modules):
            bn_module = self.modules[nxt.target]
            bn_calls = sum(1 for n in self.gm.graph.nodes if n.op == "call_module" and n.target == nxt.target)
            fits = isinstance(bn_module, patterns.BN_FOR_LAYER[type(module)]) and bn_module.track_running_stats
            if fits and bn_calls == 1 and bn_module.num_features == _out_channels(module):
                bn, end = nxt, nxt
        nxt = self._sole_user(end)
        if nxt is not None and patterns.activation_kind(nxt, self.modules) and nxt.args[0] is end:
            act, kind = nxt, patterns.activation_kind(nxt, self.modules)
        return bn, act, kind

    def _plan_layer(self, node: fx.Node, layer: LayerQuant) -> None:
        module = self.modules[node.target]
        bn, act, kind = self._fusion_chain(node)
        fused = tuple(n.name for n in (bn, act) if n is not None)
        for n in (bn, act):
            if n is not None:
                self.absorbed[n] = node
        self.layers.append(LayerDecision(
            node.name, node.target, type(module).__name__, bn.target if bn else None, kind, fused,
            layer.weight, layer.activation,
        ))
        self._ensure_on_grid(node.args[0], layer.activation, f"input of {node.target}", reader=node)
        end = act or bn or node
        self._quantize_output(node, self._output_config(end, layer), f"{type(module).__name__} {node.target}", end)
        if node in self.grid_config:
            self.grid_config[end] = self.grid_config[node]

    def _output_config(self, end: fx.Node, layer: LayerQuant) -> QuantizerConfig:
        """The input config of the layers reading `end` when they all want the same one; otherwise the op
        config when an add/cat/... reads it (the residual stream), else the layer's own."""
        readers = list(end.users)
        wanted = {self.resolved[u].activation for u in readers if u in self.resolved}
        if readers and len(wanted) == 1 and all(u in self.resolved for u in readers):
            return wanted.pop()
        reads_op = any(patterns.binary_kind(u) or patterns.is_cat(u) for u in readers)
        return self.config.op_quantizer if reads_op else layer.activation

    def _plan_op(self, node: fx.Node, kind: str, inputs: list[fx.Node]) -> None:
        cfg = self.config.op_quantizer
        for arg in inputs:
            self._ensure_on_grid(arg, cfg, f"input of {kind} {node.name}")
        relu = self._sole_user(node)
        if relu is not None and patterns.activation_kind(relu, self.modules) == "relu" and relu.args[0] is node:
            self._quantize_output(relu, cfg, f"{kind}+relu {node.name}")
        else:
            self._quantize_output(node, cfg, f"{kind} {node.name}")

    def _plan_cat(self, node: fx.Node) -> None:
        name = f"{node.name}_out"
        for arg in node.args[0]:
            if arg not in self.grid_config:
                self._add_act(arg, name, "input", f"cat {node.name} (shared)", self.config.op_quantizer)
        self._add_act(node, name, "output", f"cat {node.name}", self.config.op_quantizer)

    def _ensure_on_grid(self, value, cfg: QuantizerConfig, why: str, reader: fx.Node | None = None) -> None:
        """Plan an input quantizer for a float value; a layer (`reader`) reading a value already on a grid
        of another precision gets a requantizer of its own (shared by the readers wanting the same)."""
        if not isinstance(value, fx.Node):
            return
        if value not in self.grid_config:
            self._add_act(value, f"{value.name}_in", "input", why, self._input_config(value, cfg))
        if reader is not None and self.grid_config[value].spec != cfg.spec:
            self._add_requant(value, cfg, reader)

    def _input_config(self, value: fx.Node, cfg: QuantizerConfig) -> QuantizerConfig:
        """The config of a new input quantizer on `value`: the config's input_activation for a model input (or a
        value computed from model inputs alone)."""
        model_input = value in self.input_values and self.config.input_activation is not None
        return self.config.input_activation if model_input else cfg

    def _add_requant(self, value: fx.Node, cfg: QuantizerConfig, reader: fx.Node) -> None:
        key = (value, cfg)
        if key in self.requants:
            index = self.requants[key]
            d = self.acts[index]
            self.acts[index] = replace(d, users=d.users + (reader.name,), op=f"{d.op}, {reader.target}")
            return
        survivor = self.absorbed.get(value, value)  # a fused BN/ReLU node is gone after the rewrite
        name = f"{value.name}_to{cfg.spec.bits}b_{len(self.requants)}"
        self.requants[key] = len(self.acts)
        self.acts.append(ActDecision(survivor.name, name, "requant", f"requantize for {reader.target}", cfg,
                                     (reader.name,)))

    def _quantize_output(self, node: fx.Node, cfg: QuantizerConfig, why: str, value: fx.Node | None = None) -> None:
        """Quantize the output of `node`, whose value leaves the fused chain at `value` (default: node)."""
        users = (value or node).users
        if users and all(u.op == "output" for u in users):
            return  # model outputs (logits) stay float: int8 kernels return them dequantized, exactly
        self._add_act(node, f"{node.name}_out", "output", why, cfg)

    def _add_act(self, node: fx.Node, quantizer: str, role: str, why: str, cfg: QuantizerConfig) -> None:
        self.acts.append(ActDecision(node.name, quantizer, role, why, cfg))
        self.grid_config[node] = cfg


def _input_values(gm: fx.GraphModule, modules: dict[str, nn.Module]) -> set[fx.Node]:
    """The model inputs and the values computed from them alone: no parameter on the way, only constants,
    buffers and parameter-free modules (e.g. a normalisation with fixed mean and std inside the model)."""
    parameters = {name for name, _ in gm.named_parameters(remove_duplicate=False)}
    values: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            values.add(node)
        elif node.op == "get_attr":
            if node.target not in parameters:
                values.add(node)
        elif node.op in ("call_function", "call_method", "call_module"):
            parameter_free = node.op != "call_module" or not any(True for _ in modules[node.target].parameters())
            if parameter_free and node.all_input_nodes and all(n in values for n in node.all_input_nodes):
                values.add(node)
    return values


def _out_channels(module: nn.Module) -> int:
    return getattr(module, "out_channels", None) or getattr(module, "out_features")


def _at_8_bits(layer: LayerQuant) -> LayerQuant:
    def eight(cfg: QuantizerConfig) -> QuantizerConfig:
        return cfg.with_(spec=cfg.spec.with_(bits=8))

    return LayerQuant(eight(layer.weight), eight(layer.activation))


def plan(gm: fx.GraphModule, config: QuantConfig, leaves: tuple[str, ...] = ()) -> QuantPlan:
    """Decide quantizers and fusions for a traced, shape-propagated GraphModule (pure: gm is not changed)."""
    return _Planner(gm, config, leaves).run()


def propagate_shapes(gm: fx.GraphModule, example_inputs: tuple) -> None:
    """Record tensor metadata on every node (eval mode, no grad, modes restored afterwards)."""
    from torch.fx.passes.shape_prop import ShapeProp

    modes = {m: m.training for m in gm.modules()}
    try:
        gm.eval()
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    finally:
        for m, mode in modes.items():
            m.training = mode
