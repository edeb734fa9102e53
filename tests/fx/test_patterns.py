"""Graph-node classification tables (qat.fx.patterns) on small traced functions."""
import pytest
import torch
from torch import fx

from qat.fx import patterns


def _node(fn) -> fx.Node:
    graph = fx.symbolic_trace(fn).graph
    return next(n for n in graph.nodes if n.op in ("call_function", "call_method"))


@pytest.mark.parametrize("fn, factor", [
    (lambda x: x * 0.125, 0.125), (lambda x: 0.5 * x, 0.5), (lambda x: x / 8, 0.125), (lambda x: torch.mul(x, 4), 4.0),
    (lambda x: x * 0.3, None), (lambda x: x * -2.0, None), (lambda x: x * 0.0, None), (lambda x: x / 3, None),
    (lambda x: x + 0.5, None), (lambda x: x * x, None),
], ids=["mul", "rmul", "div", "torch.mul", "not_power", "negative", "zero", "div_not_power", "add", "tensor"])
def test_power_of_two_factor(fn, factor):
    node = _node(fn)
    found = patterns.power_of_two_factor(node)
    assert (None if found is None else found[1]) == factor
    if found:
        assert found[0].op == "placeholder"


@pytest.mark.parametrize("fn, reads", [
    (lambda x: x.shape, True), (lambda x: x.size(), True), (lambda x: x.dim(), True), (lambda x: x.ndim, True),
    (lambda x: x.dtype, False), (lambda x: x.sum(), False),
], ids=["shape", "size", "dim", "ndim", "dtype", "sum"])
def test_reads_metadata(fn, reads):
    assert patterns.reads_metadata(_node(fn)) is reads


def _module_node(module: torch.nn.Module) -> tuple[fx.Node, dict]:
    gm = fx.symbolic_trace(torch.nn.Sequential(module))
    return next(n for n in gm.graph.nodes if n.op == "call_module"), dict(gm.named_modules())


@pytest.mark.parametrize("fn, last_dim", [
    (lambda x: torch.softmax(x, dim=-1), True), (lambda x: torch.nn.functional.softmax(x, -1), True),
    (lambda x: x.softmax(-1), True), (lambda x: torch.softmax(x, 1), False),
    (lambda x: torch.softmax(x, -1, dtype=torch.float64), False), (lambda x: x.log_softmax(-1), False),
], ids=["torch", "F", "method", "dim1", "dtype", "log_softmax"])
def test_is_last_dim_softmax(fn, last_dim):
    assert patterns.is_last_dim_softmax(_node(fn), {}) is last_dim


def test_softmax_modules_over_the_last_dim_only():
    assert patterns.is_last_dim_softmax(*_module_node(torch.nn.Softmax(dim=-1)))
    assert not patterns.is_last_dim_softmax(*_module_node(torch.nn.Softmax(dim=1)))


@pytest.mark.parametrize("fn, expected", [
    (lambda x: torch.nn.functional.gelu(x, approximate="tanh"), torch.nn.functional.gelu),
    (lambda x: x.sigmoid(), torch.sigmoid), (lambda x: torch.nn.functional.leaky_relu(x, 0.2), torch.nn.functional.leaky_relu),
    (lambda x, slope: torch.nn.functional.leaky_relu(x, slope), None), (lambda x: torch.relu(x), None),
    (lambda x: x * x, None),
], ids=["gelu_tanh", "sigmoid_method", "leaky_relu", "graph_argument", "relu", "product"])
def test_elementwise_function(fn, expected):
    assert patterns.elementwise_function(_node(fn), {}) is expected


def test_elementwise_modules_and_in_place_reads():
    node, modules = _module_node(torch.nn.GELU())
    assert isinstance(patterns.elementwise_function(node, modules), torch.nn.GELU)
    node, modules = _module_node(torch.nn.ReLU6())  # a Hardtanh subclass: not a table, it fuses into layers
    assert patterns.elementwise_function(node, modules) is None

    class TwoReaders(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.act = torch.nn.SiLU(inplace=True)

        def forward(self, x):
            return self.act(x) + x  # the in-place SiLU changes what the add reads

    gm = fx.symbolic_trace(TwoReaders())
    node = next(n for n in gm.graph.nodes if n.op == "call_module")
    assert patterns.elementwise_function(node, dict(gm.named_modules())) is None


@pytest.mark.parametrize("module, identity", [
    (torch.nn.Dropout(0.1), True), (torch.nn.Identity(), True), (torch.nn.Dropout2d(), True), (torch.nn.ReLU(), False),
], ids=["dropout", "identity", "dropout2d", "relu"])
def test_is_eval_identity(module, identity):
    assert patterns.is_eval_identity(*_module_node(module)) is identity
