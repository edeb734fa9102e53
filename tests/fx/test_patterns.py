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
