"""Int8 conversion: every backend against the reference kernels, int8 against fake-quant, errors."""
import pytest
import torch
from torch import fx

import qat
from qat.data import cifar10_test_batches
from qat.fx import QuantConfig, calibrate, prepare
from qat.fx.api import model_device
from qat.int8 import ConversionError, compare, convert, layer_agreement
from qat.int8.lower import lower
from qat.int8.modules import (
    Int8Attention,
    Int8Binary,
    Int8Conv2dAdd,
    Int8LayerAdd,
    Int8LinearAdd,
    Int8Softmax,
)
from qat.kernels import BACKENDS as KERNEL_BACKENDS
from qat.kernels import get_backend
from qat.models.cifar_resnet import load_cifar_resnet
from qat.models.registry import MODELS, build_model
from qat.quant.config import QuantizerConfig
from qat.quant.spec import QuantSpec

BACKENDS = ["fbgemm", pytest.param("cuda", marks=pytest.mark.gpu)]
SYNTHETIC_MODELS = ["tiny_transformer", "mobilenet_v2", pytest.param("resnet18", marks=pytest.mark.slow)]


@pytest.fixture(scope="module")
def resnet20(shared_data):
    model = load_cifar_resnet(20, next((shared_data / "pretrained").glob("resnet20-*.th"))).eval()
    batches = list(cifar10_test_batches(shared_data, batch_size=128, source="lossless_subset"))
    prepared = prepare(model, QuantConfig.preset("w8a8"), (batches[0][0],))
    calibrate(prepared, batches[:2])
    return prepared.eval(), batches


def _synthetic(name):
    entry = MODELS[name]
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, **dict(entry.small_kwargs)).eval()
    x = entry.example_input(8, small=True)
    prepared = prepare(model, QuantConfig.preset("w8a8"), (x,))
    calibrate(prepared, [x, entry.example_input(8, small=True)])
    return prepared.eval(), [(entry.example_input(8, small=True),)]


class _FedReference(fx.Interpreter):
    """Runs every node of a backend's int8 graph on the reference graph's values of its inputs, so each
    layer's kernels are compared on identical inputs (differences do not compound through the network)."""

    def __init__(self, gm, reference_values):
        super().__init__(gm)
        self.reference_values, self.backend = reference_values, get_backend(gm.qat_backend)
        self.outputs = {}

    def run_node(self, n):
        for arg in n.all_input_nodes:
            ref = self.reference_values[arg.name]
            qp = self.module.qat_grids.get(arg.name)
            if isinstance(ref, torch.Tensor):
                ref = ref.to(model_device(self.module))
            self.env[arg] = self.backend.to_backend(ref, qp) if qp else ref
        out = super().run_node(n)
        if n.name in self.module.qat_grids:
            self.outputs[n.name] = self.backend.from_backend(out, self.module.qat_grids[n.name]).cpu().int()
        return out


def _reference_values(int8, x):
    values = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            values[n.name] = super().run_node(n)
            return values[n.name]

    with torch.no_grad():
        Recorder(int8).run(x)
    return values


def _assert_backend_matches_reference(prepared, x, backend, device):
    # the same graph (fused conv + add where the backend fuses them) computed by the reference kernels
    kernels = KERNEL_BACKENDS[backend]
    reference = lower(prepared, "reference", fuse_layer_add=kernels.fuses_layer_add,
                      fuse_attention=kernels.fuses_attention,
                      int8_activations=kernels.int8_activations)
    ref_values = _reference_values(reference, x)
    fed = _FedReference(convert(prepared.to(device), backend).to(device), ref_values)
    prepared.cpu()
    with torch.no_grad():
        fed.run(x.to(device))
    assert fed.outputs and fed.outputs.keys() == {k for k in reference.qat_grids if k in ref_values}
    for name, got in fed.outputs.items():
        diff = (ref_values[name].int() - got).abs()
        assert diff.max().item() <= 1 and (diff == 0).float().mean().item() >= 0.999, (name, diff.max().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_reference_on_resnet20(resnet20, backend):
    prepared, batches = resnet20
    _assert_backend_matches_reference(prepared, batches[2][0], backend, "cuda" if backend == "cuda" else "cpu")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", SYNTHETIC_MODELS)
def test_backend_matches_reference_on_registry_models(name, backend):
    prepared, batches = _synthetic(name)
    _assert_backend_matches_reference(prepared, batches[0][0], backend, "cuda" if backend == "cuda" else "cpu")


# (model, fused type, how many, ReLU after the add): ResNet-18's basic blocks (conv2 + residual + ReLU); the
# tiny transformer's two residual adds per block (after the attention's out_proj and after the MLP)
LAYER_ADD_CASES = [("resnet18", Int8Conv2dAdd, 8, True), ("tiny_transformer", Int8LinearAdd, 4, False)]


@pytest.mark.parametrize("backend", ["reference", "fbgemm"])
@pytest.mark.parametrize(("name", "fused_type", "count", "relu"), LAYER_ADD_CASES, ids=lambda v: getattr(v, "__name__", v))
def test_fused_layer_add_computes_the_unfused_graph(backend, name, fused_type, count, relu, tmp_path):
    """Every residual add of a conv's or Linear's output (+ReLU) becomes one Int8Conv2dAdd / Int8LinearAdd;
    outputs stay bit-identical, also after an artifact round trip."""
    prepared, batches = _synthetic(name)
    x = batches[0][0]
    fused, unfused = lower(prepared, backend, fuse_layer_add=True), lower(prepared, backend, fuse_layer_add=False)
    fused_layers = [m for m in fused.modules() if isinstance(m, Int8LayerAdd)]
    assert len(fused_layers) == count and all(type(m) is fused_type for m in fused_layers)
    assert all(m.relu == relu and m.out_qp is not None for m in fused_layers)
    assert not [m for m in fused.modules() if isinstance(m, Int8Binary) and m.op == "add"]
    with torch.no_grad():
        assert torch.equal(fused(x), unfused(x))
        qat.export(fused, tmp_path / "fused.qat", example_inputs=(x,))
        assert torch.equal(qat.load(tmp_path / "fused.qat", backend=backend)(x), unfused(x))
    assert not any(isinstance(m, Int8LayerAdd) for m in convert(prepared, backend).modules())  # declined


@pytest.mark.parametrize("backend", ["reference", "fbgemm"])
def test_fused_attention_computes_the_unfused_graph(backend, tmp_path):
    """Each attention core (q @ k^T, the 1/sqrt(d) relabel, softmax, @ v) becomes one Int8Attention reading
    q, k^T and v; on backends that run it unfused the outputs stay bit-identical, also after an artifact
    round trip."""
    prepared, batches = _synthetic("tiny_transformer")
    x = batches[0][0]
    fused, unfused = lower(prepared, backend, fuse_attention=True), lower(prepared, backend, fuse_attention=False)
    cores = [m for m in fused.modules() if isinstance(m, Int8Attention)]
    softmaxes = [m for m in unfused.modules() if isinstance(m, Int8Softmax)]
    assert len(cores) == len(softmaxes) > 0 and all(m.out_qp is not None for m in cores)
    assert not [m for m in fused.modules() if isinstance(m, Int8Softmax)]
    assert all(m.grids.logits.scale == m.grids.scores.scale / 4 for m in cores)  # head dim 16: 1/sqrt(d) = 1/4
    with torch.no_grad():
        assert torch.equal(fused(x), unfused(x))
        qat.export(fused, tmp_path / "fused.qat", example_inputs=(x,))
        assert torch.equal(qat.load(tmp_path / "fused.qat", backend=backend)(x), unfused(x))
    assert not any(isinstance(m, Int8Attention) for m in convert(prepared, backend).modules())  # declined


@pytest.mark.parametrize("backend", ["reference", "fbgemm"])
def test_int8_top1_agrees_with_fake_quant_on_cifar(resnet20, backend):
    prepared, batches = resnet20
    int8 = convert(prepared, backend)
    agree = total = 0
    with torch.no_grad():
        for images, _ in batches:
            agree += (int8(images).argmax(1) == prepared(images).argmax(1)).sum().item()
            total += len(images)
    assert agree / total >= 0.999, agree / total


def test_every_int8_value_stays_within_1_lsb_of_fake_quant(resnet20):
    prepared, batches = resnet20
    rows = layer_agreement(prepared, convert(prepared, "fbgemm"), batches[2:4])
    assert len(rows) == len({a.quantizer for a in prepared.qat_plan.activations})
    by_name = {r.name: r for r in rows}
    # the first layers differ only by float rounding ties; 1-LSB flips then compound with depth
    assert by_name["x_in"].max_error_lsb == 0 and by_name["conv1_out"].max_error_lsb <= 1 + 1e-3
    assert all(r.within_1_lsb >= 0.98 and r.sqnr_db > 30 for r in rows), [r for r in rows if r.within_1_lsb < 0.98]
    table = compare(prepared, convert(prepared, "reference"), batches[2:3])
    assert "SQNR" in table and "layer3_2_conv2_out" in table


@pytest.mark.parametrize("name", SYNTHETIC_MODELS)
def test_int8_matches_fake_quant_on_registry_models(name):
    prepared, batches = _synthetic(name)
    rows = layer_agreement(prepared, convert(prepared, "reference"), batches)
    # end to end, 1-LSB flips compound with depth (resnet18's layer4: 97.8% within 1 LSB); the per-layer kernel
    # check above is the strict one
    assert rows and all(r.within_1_lsb >= 0.95 and r.sqnr_db > 30 for r in rows), [r for r in rows if r.within_1_lsb < 0.95]


def test_asymmetric_weights_are_named_in_the_error():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    x = torch.randn(2, 3, 8, 8)
    cfg = QuantConfig(weight=QuantizerConfig(QuantSpec(bits=8, granularity="per_channel")))
    prepared = prepare(model, cfg, (x,))
    calibrate(prepared, [x])
    with pytest.raises(ConversionError, match="layer '0'.*symmetric"):
        convert(prepared, "reference")
    with pytest.raises(ValueError, match="unknown kernel backend 'tpu'"):
        convert(prepared, "tpu")


@pytest.mark.parametrize("backend", ["reference", "fbgemm"])
def test_shape_reads_of_int8_values_need_no_dequantize(monkeypatch, backend):
    """Attention reshapes read q/k/v's .shape: the int8 graph answers that from the int8 tensor, instead of
    dequantizing it for the read, and computes the same outputs as with a Dequantize in front of each read."""
    from qat.fx import patterns
    from qat.int8.modules import Dequantize

    prepared, batches = _synthetic("tiny_transformer")
    int8 = convert(prepared, backend)
    modules = dict(int8.named_modules())
    reads = [n for n in int8.graph.nodes if patterns.reads_metadata(n)]
    assert reads and not any(isinstance(modules.get(n.args[0].target), Dequantize) for n in reads)
    monkeypatch.setattr(patterns, "reads_metadata", lambda node: False)
    dequantizing = convert(prepared, backend)
    count = lambda gm: sum(isinstance(m, Dequantize) for m in gm.modules())  # noqa: E731
    assert count(dequantizing) > count(int8)
    with torch.no_grad():
        assert torch.equal(int8(*batches[0]), dequantizing(*batches[0]))


@pytest.mark.parametrize("backend", ["reference", "fbgemm"])
def test_attention_scale_relabels_the_scores(monkeypatch, backend):
    """scores * 1/sqrt(d) (a power of two) on the int8 QK^T output costs no pass of its own: the same codes on
    a grid scaled by the factor (a Relabel), and the outputs are those of dequantize-then-multiply, bit for bit."""
    from qat.fx import patterns
    from qat.int8.modules import Relabel

    prepared, batches = _synthetic("tiny_transformer")
    folded = convert(prepared, backend)
    multiplies = lambda gm: [n for n in gm.graph.nodes if patterns.power_of_two_factor(n)]  # noqa: E731
    assert multiplies(prepared) and not multiplies(folded)
    assert sum(isinstance(m, Relabel) for m in folded.modules()) == len(multiplies(prepared))
    monkeypatch.setattr(patterns, "power_of_two_factor", lambda node: None)
    unfolded = convert(prepared, backend)
    with torch.no_grad():
        assert torch.equal(folded(*batches[0]), unfolded(*batches[0]))


@pytest.mark.parametrize("backend", ["reference", "fbgemm"])
def test_softmax_and_gelu_run_on_codes(monkeypatch, backend):
    """Attention's softmax and the MLP's GELU read int8 codes (Int8Softmax, a GELU table) instead of a
    Dequantize, Dropout between them and their quantizers included, and every int8 value of the graph is
    the one the float path (dequantize, softmax / GELU, quantize) computes, within 1 LSB."""
    from qat.fx import patterns
    from qat.int8.modules import Dequantize, Int8Lookup, Int8Softmax

    prepared, batches = _synthetic("tiny_transformer")
    int8 = convert(prepared, backend)
    modules = dict(int8.named_modules())
    kinds = [type(modules.get(n.target)) for n in int8.graph.nodes if n.op == "call_module"]
    prepared_modules = dict(prepared.named_modules())
    softmaxes = [n for n in prepared.graph.nodes if patterns.is_last_dim_softmax(n, prepared_modules)]
    gelus = [m for m in prepared.modules() if isinstance(m, torch.nn.GELU)]
    assert softmaxes and gelus and kinds.count(Int8Softmax) == len(softmaxes) and kinds.count(Int8Lookup) == len(gelus)
    for node in int8.graph.nodes:
        if isinstance(modules.get(node.target), (Int8Softmax, Int8Lookup)):
            assert not isinstance(modules.get(node.args[0].target), Dequantize)
            assert modules[node.target].out_qp is not None  # requantized in the same pass
    monkeypatch.setattr(patterns, "is_last_dim_softmax", lambda node, modules: False)
    monkeypatch.setattr(patterns, "elementwise_function", lambda node, modules: None)
    float_path = convert(prepared, backend)
    assert not any(isinstance(m, (Int8Softmax, Int8Lookup)) for m in float_path.modules())
    ours, theirs = _reference_values(int8, batches[0][0]), _reference_values(float_path, batches[0][0])
    quantizers = int8.qat_value_map.keys() & float_path.qat_value_map.keys()  # the same quantizer, both graphs
    assert len(quantizers) > 10
    for quantizer in quantizers:
        a, b = (get_backend(backend).from_backend(values[gm.qat_value_map[quantizer]], gm.qat_grids[
            gm.qat_value_map[quantizer]]).int() for gm, values in ((int8, ours), (float_path, theirs)))
        diff = (a - b).abs()
        assert diff.max() <= 1 and (diff == 0).float().mean() >= 0.999, quantizer


@pytest.mark.parametrize("backend", ["reference", "fbgemm"])
@pytest.mark.parametrize("name", ["tiny_transformer", "mobilenet_v2"])
def test_int8_activation_grids_compute_the_same_values(name, backend):
    """Carrying uint8 grids as their int8 equivalents (codes 128 lower, what the cuda backend's signed
    tensor-core operands want) changes no value: outputs bit for bit, every grid int8."""
    prepared, batches = _synthetic(name)
    unsigned, signed = (lower(prepared, backend, int8_activations=flag) for flag in (False, True))
    assert any(qp.dtype == torch.uint8 for qp in unsigned.qat_grids.values())
    assert all(qp.dtype == torch.int8 for qp in signed.qat_grids.values())
    assert signed.qat_grids.keys() == unsigned.qat_grids.keys()
    assert all(signed.qat_grids[k] == unsigned.qat_grids[k].as_int8() for k in signed.qat_grids)
    with torch.no_grad():
        assert torch.equal(signed(*batches[0]), unsigned(*batches[0]))
