"""Int8 artifacts: exact round trip, atomic writes, safe loading, size."""
import os
import pickle
import subprocess
import sys

import pytest
import torch
import torchvision

from qat.int8 import convert
from qat.artifact import ArtifactError, ExportError, export, load
from qat.artifact import artifact
from qat.fx import QuantConfig, calibrate, prepare
from qat.models.registry import MODELS, build_model


def _int8(name, backend="fbgemm", device="cpu"):
    entry = MODELS[name]
    model = build_model(name, num_classes=10, **dict(entry.small_kwargs)).eval().to(device)
    x = entry.example_input(4, small=True).to(device)
    prepared = prepare(model, QuantConfig.preset("w8a8"), (x,))
    calibrate(prepared, [x])
    return convert(prepared, backend), x


@pytest.mark.parametrize("backend", ["reference", "fbgemm"])
@pytest.mark.parametrize("name", ["resnet20", "mobilenet_v2", "tiny_transformer"])
def test_round_trip_is_exact(tmp_path, name, backend):
    int8, x = _int8(name, backend)
    path = tmp_path / f"{name}.qat"
    export(int8, path, example_inputs=(x,))
    loaded = load(path)
    assert loaded.qat_backend == backend
    with torch.no_grad():
        assert torch.equal(loaded(x), int8(x))
    assert loaded.qat_artifact_versions["torch"] == torch.__version__
    assert loaded.qat_quant_config["weight"]["spec"]["bits"] == 8


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["resnet20", "tiny_transformer"])
def test_gpu_model_is_checked_and_loaded_on_the_gpu(tmp_path, name):
    """export() checks the written file where the model lives (it used to load it on the CPU, so exporting a
    GPU model with example inputs failed on a device mismatch)."""
    int8, x = _int8(name, "cuda", device="cuda")
    path = tmp_path / f"{name}.qat"
    export(int8, path, example_inputs=(x,))
    loaded = load(path, device="cuda")
    assert loaded.qat_backend == "cuda" and next(loaded.buffers()).device.type == "cuda"
    with torch.no_grad():
        assert torch.equal(loaded(x), int8(x))


def test_loads_in_a_fresh_process_without_model_source(tmp_path):
    int8, x = _int8("resnet20")
    path = tmp_path / "m.qat"
    export(int8, path)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(int8(x), tmp_path / "y.pt")
    code = (
        "import sys, torch, qat.artifact\n"
        "sys.modules.pop('qat.models', None)\n"
        "m = qat.artifact.load('m.qat')\n"
        "assert 'qat.models.cifar_resnet' not in sys.modules\n"
        "x = torch.load('x.pt', weights_only=True)\n"
        "assert torch.equal(m(x), torch.load('y.pt', weights_only=True))\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


class _Hostile:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = "/tmp/qat_hostile_pickle_ran"


def test_hostile_truncated_and_foreign_files_are_refused(tmp_path):
    if os.path.exists(MARKER):
        os.unlink(MARKER)
    hostile = tmp_path / "hostile.qat"
    torch.save({"format": "qat-int8-artifact", "payload": _Hostile()}, hostile)
    with pytest.raises(ArtifactError, match="unsafe unpickling"):
        load(hostile)
    assert not os.path.exists(MARKER)
    raw = tmp_path / "raw.qat"
    raw.write_bytes(pickle.dumps(_Hostile()))
    with pytest.raises(ArtifactError):
        load(raw)
    assert not os.path.exists(MARKER)
    int8, _ = _int8("resnet20")
    good = tmp_path / "good.qat"
    export(int8, good)
    truncated = tmp_path / "truncated.qat"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ArtifactError, match="truncated, corrupt"):
        load(truncated)
    other = tmp_path / "other.qat"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(ArtifactError, match="format tag"):
        load(other)
    with pytest.raises(ArtifactError, match="no artifact"):
        load(tmp_path / "missing.qat")


def test_version_mismatch_is_named(tmp_path, monkeypatch):
    int8, _ = _int8("resnet20")
    path = tmp_path / "m.qat"
    monkeypatch.setattr(artifact, "FORMAT_VERSION", 99)
    export(int8, path)
    monkeypatch.setattr(artifact, "FORMAT_VERSION", 1)
    with pytest.raises(ArtifactError, match="format version 99.*reads version 1"):
        load(path)


def test_failed_export_leaves_previous_file_untouched(tmp_path):
    int8, _ = _int8("resnet20")
    path = tmp_path / "m.qat"
    export(int8, path)
    before = path.read_bytes()
    int8.add_module("odd", torch.nn.Upsample(scale_factor=2))
    node = next(n for n in int8.graph.nodes if n.op == "output")
    with int8.graph.inserting_before(node):
        odd = int8.graph.call_module("odd", (node.args[0],))
    node.args = (odd,)
    int8.recompile()
    with pytest.raises(ExportError, match="Upsample"):
        export(int8, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.qat"]


def test_resnet18_artifact_is_at_most_27_percent_of_float(tmp_path):
    model = torchvision.models.resnet18(num_classes=1000).eval()
    x = torch.randn(2, 3, 64, 64)
    prepared = prepare(model, QuantConfig.preset("w8a8"), (x,))
    calibrate(prepared, [x])
    export(convert(prepared, "fbgemm"), tmp_path / "r18.qat")
    torch.save(model.state_dict(), tmp_path / "r18_fp32.pt")
    ratio = (tmp_path / "r18.qat").stat().st_size / (tmp_path / "r18_fp32.pt").stat().st_size
    print(f"resnet18 int8 artifact / float32 state_dict = {ratio:.3f}")
    assert ratio <= 0.27
