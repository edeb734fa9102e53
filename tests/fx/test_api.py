"""Graph-pass API behaviour on small hand-written models: errors, fallback, sharing, state, validation."""
import copy
import pickle

import pytest
import torch
import torchvision
from torch import nn

from qat.fx import (LayerOverride, QuantConfig, UntraceableModelError, calibrate, check_finite, coverage,
                    enable_fake_quant, enable_observer, explain, prepare)
from qat.fx import patterns
from qat.fx.config import PRESETS
from qat.fx.modules import QConv, QLinear
from qat.fx.rewrite import undo_training_fusions
from qat.quant.fake_quantize import LearnableFakeQuantize, chain_fuses


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        if x.mean() > 0:  # control flow on a tensor value: not traceable
            return self.conv(x)
        return -self.conv(x)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = DataDependent()
        self.head = nn.Linear(4, 10)

    def forward(self, x):
        x = self.block(torch.relu(self.stem(x)))
        return self.head(x.mean((2, 3)))


def test_untraceable_model_error_names_module_and_line():
    with pytest.raises(UntraceableModelError) as err:
        prepare(Toy().eval(), QuantConfig.preset("w8a8"), (torch.randn(2, 3, 8, 8),))
    message = str(err.value)
    assert err.value.module_path == "block"
    assert "module 'block'" in message and "if x.mean() > 0" in message and "on_untraceable='leaf'" in message


def test_fallback_makes_the_block_a_leaf_quantized_by_module_swap():
    model, x = Toy().eval(), torch.randn(2, 3, 8, 8)
    prepared = prepare(model, QuantConfig.preset("w8a8").with_(on_untraceable="leaf"), (x,))
    assert prepared.qat_plan.leaves == ("block",)
    assert isinstance(prepared.block.conv, QConv) and prepared.block.conv.input_fq is not None
    assert coverage(prepared) == (3, 3)
    enable_fake_quant(prepared, False)
    torch.testing.assert_close(prepared(x), model(x))
    enable_fake_quant(prepared, True)
    calibrate(prepared, [x])
    assert torch.isfinite(prepared(x)).all()
    assert "leaf (module swap)" in explain(prepared)


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return torch.sigmoid(self.fc(torch.relu(self.fc(x))))


def test_shared_module_gets_one_weight_quantizer_and_one_activation_quantizer_per_call():
    prepared = prepare(Shared().eval(), QuantConfig.preset("w8a8"), (torch.randn(2, 8),))
    assert sum(isinstance(m, QLinear) for m in prepared.modules()) == 1
    outputs = [a for a in prepared.qat_plan.activations if a.role == "output"]
    assert len(outputs) == 2 and len({a.quantizer for a in outputs}) == 2


class CatModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return torch.cat([self.a(x), torch.sigmoid(self.b(x)), x], dim=1)


def test_cat_shares_one_quantizer_over_unquantized_inputs_and_output():
    prepared = prepare(CatModel().eval(), QuantConfig.preset("w8a8"), (torch.randn(2, 3, 4, 4),))
    cat_acts = [a for a in prepared.qat_plan.activations if a.op.startswith("cat")]
    assert {a.role for a in cat_acts} == {"input", "output"}
    assert len({a.quantizer for a in cat_acts}) == 1  # sigmoid output, x and the cat output share a grid
    shared = [a.node for a in cat_acts if a.role == "input"]
    assert "sigmoid" in shared and "x" not in shared  # x is already quantized for the convs


def test_attention_products_and_projections_are_quantized():
    from qat.models.registry import build_model

    prepared = prepare(build_model("tiny_transformer").eval(), QuantConfig.preset("w8a8"), (torch.randn(2, 3, 32, 32),))
    ops = [a.op.split()[0] for a in prepared.qat_plan.activations if a.role == "output"]
    assert ops.count("matmul") == 2 * 2  # QK^T and AV in each of the 2 blocks
    quantized_paths = {d.module for d in prepared.qat_plan.layers}
    assert {"blocks.0.attn.q_proj", "blocks.0.attn.k_proj", "blocks.0.attn.v_proj", "blocks.0.attn.out_proj"} <= quantized_paths


def test_mode_dependent_modules_stay_mode_aware():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), torchvision.ops.StochasticDepth(0.5, "row"), nn.Dropout(0.5))
    x = torch.randn(4, 3, 8, 8)
    prepared = prepare(model.train(), QuantConfig.preset("w8a8"), (x,))
    enable_fake_quant(prepared, False)
    torch.testing.assert_close(prepared.eval()(x), model.eval()(x))


def test_prepared_model_is_an_ordinary_module():
    x = torch.randn(2, 4, 8, 8)
    net = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(256, 3))
    prepared = prepare(net.train(), QuantConfig.preset("w4a4_lsq"), (x,))
    calibrate(prepared, [x])
    learned = {id(p) for m in prepared.modules() if isinstance(m, LearnableFakeQuantize) for p in m.parameters()}
    assert learned and learned <= {id(p) for p in prepared.parameters()}
    prepared.eval()
    expected = prepared(x)
    for clone in (copy.deepcopy(prepared), pickle.loads(pickle.dumps(prepared))):
        torch.testing.assert_close(clone(x), expected)
        assert explain(clone) == explain(prepared)
    fresh = prepare(net.train(), QuantConfig.preset("w4a4_lsq"), (x,))
    fresh.load_state_dict(prepared.state_dict())
    torch.testing.assert_close(fresh.eval()(x), expected)
    assert prepared.train().training and all(m.training for m in prepared.modules())


def test_config_errors_name_the_problem():
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="unknown QuantConfig preset 'w3a3'.*w8a8"):
        QuantConfig.preset("w3a3")
    with pytest.raises(ValueError, match="'stemm'"):
        prepare(Toy().eval(), QuantConfig.preset("w8a8").with_(skip=("stemm",)), (x,))
    with pytest.raises(ValueError, match="'Conv3x3'"):
        prepare(Toy().eval(), QuantConfig.preset("w8a8").with_(type_overrides=(LayerOverride("Conv3x3"),)), (x,))
    with pytest.raises(ValueError, match="on_untraceable='skip'.*error, leaf"):
        QuantConfig(on_untraceable="skip")
    with pytest.raises(ValueError, match="QuantConfig.input_activation must be a QuantizerConfig or None, got str"):
        QuantConfig(input_activation="minmax")
    with pytest.raises(ValueError, match="QuantSpec.bits=12"):
        LayerOverride("stem", weight_bits=12)
    with pytest.raises(TypeError, match="example_inputs must be a tuple"):
        prepare(Toy().eval(), QuantConfig.preset("w8a8"), x)


def test_nan_in_an_observed_range_is_reported_with_the_quantizer_name():
    """What a GPU run defers (NaN kept in a range) is named when calibration ends or observers stop."""
    model = prepare(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), QuantConfig.preset("w8a8"),
                    example_inputs=(torch.randn(2, 3, 8, 8),))
    calibrate(model, [torch.randn(2, 3, 8, 8)], freeze=False)
    check_finite(model)
    name, quantizer = next((n, m) for n, m in model.named_modules() if hasattr(m, "observer") and "act" in n)
    quantizer.observer.max_val.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=f"quantizer '{name}'.*non-finite"):
        enable_observer(model, False)


def test_low_bit_presets_quantize_layer_inputs_low_and_keep_the_residual_stream_at_8_bits():
    """w2a2_lsq: every conv between the first and last layers reads a 2-bit input (a requantizer where the
    value comes from the 8-bit residual stream); adds read and write 8 bits; int8 agrees with fake-quant."""
    from qat.int8 import convert, layer_agreement
    from qat.models import build_model

    x = torch.randn(4, 3, 32, 32)
    model = prepare(build_model("resnet20", 10).train(), QuantConfig.preset("w2a2_lsq"), example_inputs=(x,))
    calibrate(model, [torch.randn(8, 3, 32, 32)])
    chains = [n for n in model.graph.nodes if n.op == "call_module" and n.target == "act_quantizers"]
    assert len(chains) == 9  # each requantizer runs with the quantizer of the value it reads
    plain = copy.deepcopy(model)
    undo_training_fusions(plain)
    modules = dict(plain.named_modules())
    layers = [n for n in plain.graph.nodes if n.op == "call_module" and isinstance(modules[n.target], (QConv, QLinear))]
    assert [modules[n.args[0].target].spec.bits for n in layers] == [8] + [2] * 18 + [8]
    acts = model.qat_plan.activations
    add_outputs = [a for a in acts if a.op.startswith("add")]
    add_inputs = [a for a in acts if a.node in {"layer1_0_conv2", "layer2_1_conv2", "layer3_2_conv2"}]
    assert len(add_outputs) == 9 and all(a.config.spec.bits == 8 for a in add_outputs + add_inputs)
    requants = [a for a in acts if a.role == "requant"]
    assert len(requants) == 9 and all(a.config.spec.bits == 2 and len(a.users) == 1 for a in requants)
    model.eval()
    int8 = convert(model, backend="reference")
    assert torch.allclose(int8(x), model(x), atol=1e-4)
    rows = layer_agreement(model, int8, [x])  # the chained quantizers' values too
    assert {r.name for r in rows} == {a.quantizer for a in acts}


@pytest.mark.parametrize("name", PRESETS)
def test_no_preset_learns_the_model_input_range(name):
    """Every preset quantizes the model input at 8 bits with an observed range (the learned presets through
    input_activation), so none makes the first layer compute a gradient with respect to the image."""
    config = QuantConfig.preset(name)
    quantizer = config.input_activation or config.activation
    assert not quantizer.learnable and quantizer.spec.bits == 8


def test_low_bit_presets_observe_the_model_input_so_the_image_needs_no_gradient():
    """w4a4_lsq quantizes the model input with an observed 8-bit range: nothing learned needs the image's
    gradient, so the first conv reads a tensor without one and autograd computes no data gradient for it, as in
    float training. With the input on the layers' learned config it does; a first layer at 4 bits gets a
    requantizer after the observed 8-bit input quantizer."""
    from qat.models import build_model

    x = torch.randn(4, 3, 32, 32)
    preset = QuantConfig.preset("w4a4_lsq")
    reads_gradient, input_quantizers = {}, {}
    configs = {"observed": preset, "learned": preset.with_(input_activation=None),
               "observed, 4-bit first layer": preset.with_(first_last_8bit=False)}
    for name, config in configs.items():
        model = prepare(build_model("resnet20", 10).train(), config, example_inputs=(x,))
        calibrate(model, [torch.randn(8, 3, 32, 32)])
        model.conv1.register_forward_pre_hook(
            lambda _, args, name=name: reads_gradient.update({name: args[0].requires_grad}))
        model(x).sum().backward()
        input_quantizers[name] = [(a.role, a.config.range_method, a.config.spec.bits)
                                  for a in model.qat_plan.activations if a.node == "x"]
    assert reads_gradient == {"observed": False, "learned": True, "observed, 4-bit first layer": True}
    assert not preset.input_activation.learnable and preset.input_activation.spec.bits == 8
    assert input_quantizers == {"observed": [("input", "minmax", 8)], "learned": [("input", "lsq_plus", 8)],
                                "observed, 4-bit first layer": [("input", "minmax", 8), ("requant", "lsq_plus", 4)]}


class Normalized(nn.Module):
    """Normalises its input inside the model (fixed mean and std buffers; `scaled`: then a learned gain)."""

    def __init__(self, scaled: bool):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.5, 0.4, 0.3]).reshape(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.2, 0.25, 0.3]).reshape(1, 3, 1, 1))
        self.gain = nn.Parameter(torch.ones(1)) if scaled else None
        self.pool, self.conv = nn.AvgPool2d(2), nn.Conv2d(3, 4, 3)

    def forward(self, x):
        x = self.pool((x - self.mean) / self.std)
        if self.gain is not None:
            x = x * self.gain
        return self.conv(x)


@pytest.mark.parametrize("scaled", [False, True], ids=["normalised", "then_learned_gain"])
def test_values_computed_from_the_input_alone_get_the_input_quantizer(scaled):
    """A normalisation inside the model (buffers, a parameter-free module) keeps the value an input value: the
    conv reads it through the observed input quantizer; a parameter on the way makes it the layer's own."""
    x = torch.rand(2, 3, 8, 8)
    model = prepare(Normalized(scaled), QuantConfig.preset("w4a4_lsq"), example_inputs=(x,))
    (conv_input,) = [a for a in model.qat_plan.activations if a.op == "input of conv"]
    assert conv_input.config.learnable == scaled


def test_two_layers_reading_one_value_at_another_precision_share_one_requantizer():
    class Fork(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            y = self.stem(x)
            return self.a(y) + self.b(y) + y

    config = QuantConfig.preset("w8a8").with_(name_overrides=(LayerOverride("[ab]", activation_bits=4),))
    model = prepare(Fork(), config, example_inputs=(torch.randn(2, 3, 4, 4),))
    requants = [a for a in model.qat_plan.activations if a.role == "requant"]
    assert len(requants) == 1 and requants[0].users == ("a", "b") and requants[0].config.spec.bits == 4
    modules = dict(model.named_modules())
    graph = {n.name: n for n in model.graph.nodes}
    assert graph["a"].args[0] is graph["b"].args[0] and modules[graph["a"].args[0].target].spec.bits == 4



def _relu_nodes(model: nn.Module) -> list[str]:
    return [n.name for n in model.graph.nodes if patterns.activation_kind(n, dict(model.named_modules())) == "relu"]


def test_relus_move_into_their_output_quantizers():
    """Each conv-bn-relu whose only reader is its output quantizer hands the ReLU to it (ResNet-18: the stem
    and every block's first conv), and so does each block's last ReLU, after the residual add: that node leaves
    the graph. undo_training_fusions puts every one back."""
    prepared = prepare(torchvision.models.resnet18(num_classes=10).eval(), QuantConfig.preset("w8a8"),
                       (torch.randn(1, 3, 32, 32),))
    folded = [name for name, m in prepared.named_modules() if isinstance(m, QConv) and m.activation_in_output_quantizer]
    assert sorted(folded) == sorted(["conv1"] + [f"layer{i}.{j}.conv1" for i in range(1, 5) for j in range(2)])
    assert _relu_nodes(prepared) == []
    assert sum(getattr(m, "applies_relu", False) for m in prepared.modules()) == len(folded) + 8  # + 8 blocks
    undo_training_fusions(prepared)
    assert not any(getattr(m, "applies_relu", False) or getattr(m, "activation_in_output_quantizer", False)
                   for m in prepared.modules())
    restored = [n for n in prepared.graph.nodes if n.target is torch.relu]
    assert len(restored) == 8 and all(patterns.binary_kind(n.args[0]) == "add" for n in restored)


def test_undoing_fusions_names_a_relu_it_cannot_restore():
    quantizer = QuantConfig.preset("w8a8").activation.build()
    quantizer.applies_relu = True
    with pytest.raises(ValueError, match="applies a ReLU"):
        undo_training_fusions(nn.Sequential(quantizer))


class ConvBnReluNet(nn.Module):
    """Two residual adds, the first followed by a ReLU; its output is read by the second add and by conv c
    (low-bit presets: at 8 bits by the add, requantized for c)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = (nn.Sequential(nn.Conv2d(c, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
                                  for c in (3, 8, 8))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        y = self.a(x)
        z = torch.relu(self.b(y) + y)
        return self.head((self.c(z) + z).mean((2, 3)))


@pytest.mark.parametrize("preset", ["w8a8", "w4a4_lsq"])
@pytest.mark.parametrize("fused", [False, True], ids=["torch", "triton"])
def test_training_fusions_change_no_value_or_gradient(request, fused, preset):
    """The model computes the same outputs and gradients with its ReLUs in the quantizers and its quantizer chain
    as with every ReLU in its layer or graph node and one call per quantizer (undo_training_fusions, the form
    convert starts from), on the torch path and on the fused kernels (where the chain is one kernel)."""
    if fused:
        request.getfixturevalue("triton_on_cpu")
    device = "cuda" if fused and torch.cuda.is_available() else "cpu"  # the kernels serve CUDA tensors there
    x = torch.randn(4, 3, 8, 8, device=device)
    prepared = prepare(ConvBnReluNet().eval().to(device), QuantConfig.preset(preset), (x,))
    assert all(prepared.get_submodule(f"{n}.0").activation_in_output_quantizer for n in "ab")
    assert _relu_nodes(prepared) == []  # the ReLU after the add is in the add's output quantizer
    chains = [n for n in prepared.graph.nodes if n.op == "call_module" and n.target == "act_quantizers"]
    assert len(chains) == (2 if preset == "w4a4_lsq" else 0)  # y and z at 8 bits for the adds, 4 bits for b and c
    unfolded = copy.deepcopy(prepared)
    undo_training_fusions(unfolded)
    results = []
    for model in (prepared, unfolded):
        calibrate(model, [x], freeze=preset != "w8a8")
        y = model.train()(x)
        y.square().sum().backward()
        layer = model.get_submodule("b.0")
        ranges = [p.grad for name, p in model.named_parameters() if name.startswith("act_quantizers")]
        results.append((y, model.get_submodule("a.0").weight.grad, layer.bn.weight.grad, *ranges))
    for chain in chains:
        quantizers = (prepared.act_quantizers[name] for name in chain.args[1:])
        assert chain_fuses(torch.ones(1, device=device), *quantizers) == fused
    assert len(results[0]) == len(results[1])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
