"""Rewrite: apply a QuantPlan to a traced GraphModule mechanically (no decisions are made here)."""
from __future__ import annotations

import operator
from collections import Counter

import torch
from torch import fx, nn
from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY

from qat.fx import patterns
from qat.fx.leaf_swaps import LEAF_SWAPS
from qat.fx.modules import FLOAT_TO_QAT, QuantizedWeightModule, fold_relu_into_quantizer
from qat.fx.plan import QuantPlan
from qat.quant.fake_quantize import QuantizerBase, is_per_tensor_lsq, quantize_chain

ACT_CONTAINER = "act_quantizers"


class ActivationQuantizers(nn.ModuleDict):
    """The graph's activation quantizers, by name; a call runs two of them in a row (:func:`quantize_chain`)."""

    def forward(self, x: torch.Tensor, first: str, second: str) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_chain(x, self[first], self[second])


def is_activation_quantizer_call(node: fx.Node) -> bool:
    """`node` calls one of the graph's activation quantizers (not the container's two-quantizer call)."""
    return node.op == "call_module" and node.target.startswith(f"{ACT_CONTAINER}.")


def activation_quantizer_name(node: fx.Node) -> str:
    """The name in the container of the quantizer an :func:`is_activation_quantizer_call` node calls."""
    return node.target[len(ACT_CONTAINER) + 1:]


def set_preserved_attr(gm: fx.GraphModule, name: str, value) -> None:
    """Set an attribute that survives deepcopy of the GraphModule (fx keeps those listed in gm.meta)."""
    setattr(gm, name, value)
    gm.meta.setdefault(_USER_PRESERVED_ATTRIBUTES_KEY, {})[name] = value


def _set_submodule(root: nn.Module, path: str, module: nn.Module | None) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    if module is None:
        delattr(parent, name)
    else:
        setattr(parent, name, module)


def _swap_layers(gm: fx.GraphModule, plan: QuantPlan) -> None:
    nodes = {n.name: n for n in gm.graph.nodes}
    for d in plan.layers:
        float_module = gm.get_submodule(d.module)
        if type(float_module) in FLOAT_TO_QAT:  # a module called twice is swapped once
            bn = gm.get_submodule(d.bn) if d.bn else None
            qat_module = FLOAT_TO_QAT[type(float_module)].from_float(float_module, d.weight, bn, d.activation)
            _set_submodule(gm, d.module, qat_module)
        layer_node = nodes[d.node]
        for name in reversed(d.fused_nodes):  # relu first, then bn: each replaced by what it consumed
            fused = nodes[name]
            fused.replace_all_uses_with(layer_node)
            gm.graph.erase_node(fused)


def _insert_activation_quantizers(gm: fx.GraphModule, plan: QuantPlan) -> None:
    nodes = {n.name: n for n in gm.graph.nodes}
    container = ActivationQuantizers()
    for a in plan.activations:
        if a.quantizer not in container:
            container[a.quantizer] = a.config.build()
    gm.add_module(ACT_CONTAINER, container)
    current: dict[str, fx.Node] = {}  # node name -> the quantizer now standing for its value
    for a in plan.activations:
        value = current.get(a.node, nodes[a.node])
        with gm.graph.inserting_after(value):
            fq = gm.graph.call_module(f"{ACT_CONTAINER}.{a.quantizer}", (value,))
        readers = frozenset(a.users)
        value.replace_all_uses_with(fq, delete_user_cb=lambda user, fq=fq: user is not fq and (
            not readers or user.name in readers))
        if not readers:
            current[a.node] = fq


def _sole_quantizer_reader(node: fx.Node, calls: Counter) -> fx.Node | None:
    """The activation quantizer reading `node` when it is node's only reader and is called once in the graph."""
    if len(node.users) != 1:
        return None
    (user,) = node.users
    return user if is_activation_quantizer_call(user) and calls[user.target] == 1 and user.args[0] is node else None


def _fold_relus(gm: fx.GraphModule) -> None:
    """Hand ReLUs to the activation quantizer after them when it is their only reader: a layer's fused ReLU
    (see fold_relu_into_quantizer; the layer must be called once, as the flags concern this call alone) and a
    standalone ReLU node (a residual block's after its add), which leaves the graph. The quantizer then
    computes fake_quant(relu(x)), with relu's gradient, in its own passes: no ReLU pass forward or backward.
    :func:`undo_training_fusions` undoes both."""
    calls = Counter(node.target for node in gm.graph.nodes if node.op == "call_module")
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        quantizer_node = _sole_quantizer_reader(node, calls)
        if quantizer_node is None:
            continue
        quantizer = modules[quantizer_node.target]
        layer = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(layer, QuantizedWeightModule):
            if layer.activation == "relu" and calls[node.target] == 1:
                fold_relu_into_quantizer(layer, quantizer)
        elif patterns.activation_kind(node, modules) == "relu" and _only_reader_of_input(node):
            quantizer_node.replace_input_with(node, node.args[0])
            gm.graph.erase_node(node)
            quantizer.applies_relu = True


def _only_reader_of_input(node: fx.Node) -> bool:
    """`node` reads one graph value and is its only reader (so an in-place ReLU changes nothing else)."""
    source = node.args[0] if node.args else None
    return isinstance(source, fx.Node) and list(source.users) == [node]


def _chained_quantizer(node: fx.Node, calls: Counter, modules: dict[str, nn.Module]) -> bool:
    """`node` calls, once in the graph, an activation quantizer that quantize_chain may fuse (per-tensor LSQ)."""
    return is_activation_quantizer_call(node) and is_per_tensor_lsq(modules[node.target]) and calls[node.target] == 1


def _chain_quantizers(gm: fx.GraphModule) -> None:
    """A quantizer reading another's output (a value on one grid requantized to another: the low-bit presets'
    8-bit residual stream read at 4 bits) joins it in one call of the container (quantize_chain): one pass
    each way instead of two plus a gradient sum. :func:`unchain_quantizers` undoes it."""
    calls = Counter(node.target for node in gm.graph.nodes if node.op == "call_module")
    modules = dict(gm.named_modules())
    for second in list(gm.graph.nodes):
        first = second.args[0] if second.args else None
        if not (isinstance(first, fx.Node) and _chained_quantizer(second, calls, modules)
                and _chained_quantizer(first, calls, modules)) or modules[second.target].applies_relu:
            continue
        with gm.graph.inserting_before(first):
            names = (activation_quantizer_name(first), activation_quantizer_name(second))
            pair = gm.graph.call_module(ACT_CONTAINER, (first.args[0], *names))
            values = [gm.graph.call_function(operator.getitem, (pair, i)) for i in (0, 1)]
        second.replace_all_uses_with(values[1])
        gm.graph.erase_node(second)
        first.replace_all_uses_with(values[0])
        gm.graph.erase_node(first)


def unchain_quantizers(gm: fx.GraphModule) -> None:
    """Undo :func:`_chain_quantizers` in place: each chain is two quantizer calls again."""
    for pair in [n for n in gm.graph.nodes if n.op == "call_module" and n.target == ACT_CONTAINER]:
        x, *names = pair.args
        with gm.graph.inserting_before(pair):
            first = gm.graph.call_module(f"{ACT_CONTAINER}.{names[0]}", (x,))
            values = (first, gm.graph.call_module(f"{ACT_CONTAINER}.{names[1]}", (first,)))
        for item in list(pair.users):
            item.replace_all_uses_with(values[item.args[1]])
            gm.graph.erase_node(item)
        gm.graph.erase_node(pair)
    gm.recompile()


def undo_training_fusions(model: nn.Module) -> None:
    """In place, the graph form convert, export and comparisons start from (undoing :func:`_fold_relus` and
    :func:`_chain_quantizers`): one call per quantizer, each layer applies its own ReLU again, and a ReLU node
    taken over by a quantizer is back before it (``torch.relu``), where the int8 epilogues apply ReLUs. Raises
    ValueError for a quantizer applying a ReLU outside any graph (it cannot be restored)."""
    for gm in [m for m in model.modules() if isinstance(m, fx.GraphModule)]:
        unchain_quantizers(gm)
        _restore_relu_nodes(gm)
    for m in model.modules():
        if isinstance(m, QuantizedWeightModule):
            m.activation_in_output_quantizer = False
        elif isinstance(m, QuantizerBase) and m.applies_relu:
            raise ValueError("a quantizer outside the model's graph applies a ReLU (applies_relu=True): "
                             "undo_training_fusions can restore only the ReLUs that prepare moved")


def _restore_relu_nodes(gm: fx.GraphModule) -> None:
    """Each quantizer of `gm` that applies a ReLU stops: a layer's goes back to the layer (the flag is reset by
    the caller), a ReLU node the quantizer took over goes back before it."""
    restored = False
    for node in [n for n in gm.graph.nodes if is_activation_quantizer_call(n)]:
        quantizer = gm.get_submodule(node.target)
        if not quantizer.applies_relu:
            continue
        source = node.args[0]
        layer = gm.get_submodule(source.target) if source.op == "call_module" else None
        if not (isinstance(layer, QuantizedWeightModule) and layer.activation_in_output_quantizer):
            with gm.graph.inserting_before(node):
                node.replace_input_with(source, gm.graph.call_function(torch.relu, (source,)))
            restored = True
        quantizer.applies_relu = False
    if restored:
        gm.recompile()


def _swap_leaf_layers(gm: fx.GraphModule, plan: QuantPlan, config) -> None:
    """Inside leaf modules the graph pass cannot see calls: swap Conv/Linear for self-quantizing modules."""
    for leaf in plan.leaves:
        for name, module in list(gm.get_submodule(leaf).named_modules()):
            path = f"{leaf}.{name}" if name else leaf
            layer = config.resolve(path, type(module).__name__)
            if type(module) not in FLOAT_TO_QAT or layer is None:
                continue
            qat_module = FLOAT_TO_QAT[type(module)].from_float(module, layer.weight)
            qat_module.input_fq = layer.activation.build()
            _set_submodule(gm, path, qat_module)


def _swap_known_leaves(gm: fx.GraphModule, plan: QuantPlan, config) -> None:
    for path in plan.swapped_leaves:
        module = gm.get_submodule(path)
        _set_submodule(gm, path, LEAF_SWAPS[type(module)](module, config.resolve(path, type(module).__name__)))


def rewrite(gm: fx.GraphModule, plan: QuantPlan, config) -> fx.GraphModule:
    """Apply `plan` to `gm` in place and return it recompiled."""
    _swap_layers(gm, plan)
    _insert_activation_quantizers(gm, plan)
    _fold_relus(gm)
    _chain_quantizers(gm)
    _swap_leaf_layers(gm, plan, config)
    _swap_known_leaves(gm, plan, config)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm
