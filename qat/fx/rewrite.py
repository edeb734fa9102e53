"""Rewrite: apply a QuantPlan to a traced GraphModule mechanically (no decisions are made here)."""
from __future__ import annotations

from torch import fx, nn
from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY

from qat.fx.leaf_swaps import LEAF_SWAPS
from qat.fx.modules import FLOAT_TO_QAT, QuantizedWeightModule, fold_relu_into_quantizer
from qat.fx.plan import QuantPlan

ACT_CONTAINER = "act_quantizers"


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
    container = nn.ModuleDict()
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


def _fold_relus(gm: fx.GraphModule) -> None:
    """A layer with a fused ReLU whose only reader is an activation quantizer hands the ReLU to it (see
    fold_relu_into_quantizer); both must be called once in the graph, so the flags concern this call alone."""
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in gm.graph.nodes:
        layer = gm.get_submodule(node.target) if node.op == "call_module" else None
        if not isinstance(layer, QuantizedWeightModule) or layer.activation != "relu" or len(node.users) != 1:
            continue
        (user,) = node.users
        is_quantizer = user.op == "call_module" and user.target.startswith(f"{ACT_CONTAINER}.")
        if is_quantizer and calls[node.target] == 1 and calls[user.target] == 1:
            fold_relu_into_quantizer(layer, gm.get_submodule(user.target))


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
    _swap_leaf_layers(gm, plan, config)
    _swap_known_leaves(gm, plan, config)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm
