"""Every recipe runs end to end (synthetic data, fast_dev_run, CPU); a short real CIFAR-10 run beats chance."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from app_helpers import FAST, RECIPES, REPO, compose_config, pretrained_overrides
from PIL import Image

from qat.artifact import load
from qat.train import run

VARIANTS_BY_TASK = {"fp32": ["float"], "ptq": ["float", "fake_quant", "int8"], "qat": ["float", "fake_quant", "int8"]}

pytestmark = pytest.mark.usefixtures("one_thread")


def _run_and_check(tmp_path, recipe: str, *overrides: str) -> None:
    cfg = compose_config(tmp_path, f"+recipe={recipe}", *FAST, *pretrained_overrides(), *overrides)
    top1 = run(cfg)
    summary = json.loads((tmp_path / "summary.json").read_text())
    expected = VARIANTS_BY_TASK[summary["task"]]
    if cfg.model.pretrained is None and summary["task"] != "fp32":
        expected = expected[1:]  # the float model is only reported when it is known (trained or pretrained)
    assert [v["name"] for v in summary["variants"]] == expected
    assert summary["name"] == recipe and top1 == summary["variants"][-1]["top1"]
    for variant in summary["variants"]:
        assert 0.0 <= variant["top1"] <= variant["top5"] <= 100.0 and variant["num_images"] == 8
        assert variant["size_bytes"] > 0 and variant["latency_ms"] > 0
    assert (tmp_path / "summary.png").stat().st_size > 0
    if summary["task"] != "fp32":
        artifact = tmp_path / "model_int8.qat"
        assert summary["artifacts"]["int8"] == str(artifact)
        assert summary["variants"][-1]["size_bytes"] == artifact.stat().st_size
        x = torch.randn(2, 3, 32, 32)
        assert load(artifact)(x).shape == (2, 10)


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_runs_end_to_end_on_synthetic_data(recipe, tmp_path):
    _run_and_check(tmp_path, recipe)


def test_fp32_run_saves_float_weights_that_a_ptq_run_starts_from(tmp_path):
    """fp32_resnet writes model_float.pt; ptq_resnet model.pretrained=<it> quantizes exactly those weights."""
    _run_and_check(tmp_path / "fp32", "fp32_resnet")
    weights = tmp_path / "fp32" / "model_float.pt"
    fp32 = json.loads((tmp_path / "fp32" / "summary.json").read_text())
    assert fp32["artifacts"]["float"] == str(weights)
    _run_and_check(tmp_path / "ptq", "ptq_resnet", f"model.pretrained={weights}")
    ptq = json.loads((tmp_path / "ptq" / "summary.json").read_text())
    assert ptq["variants"][0]["top1"] == fp32["variants"][0]["top1"]  # the same float model, the same images


def test_qat_run_with_distillation_from_the_float_model(tmp_path):
    _run_and_check(tmp_path, "qat_resnet_w4a4", "distill.alpha=0.5")


@pytest.mark.slow
def test_qat_run_with_compiled_training_steps(tmp_path, monkeypatch):
    """compile=true: the QAT run trains through torch.compile in compile_mode's mode (on the CPU reduce-overhead
    has no CUDA graphs) and converts, exports and reports as usual."""
    modes, compile_ = [], torch.compile

    def recording_compile(fn, **kwargs):
        modes.append(kwargs.get("mode"))
        return compile_(fn, **kwargs)

    monkeypatch.setattr(torch, "compile", recording_compile)
    _run_and_check(tmp_path, "qat_resnet", "compile=true", "compile_mode=reduce-overhead")
    assert modes == ["reduce-overhead"]


def test_qat_run_in_channels_last(tmp_path):
    """memory_format=channels_last: trains NHWC, then converts, exports and reports from the contiguous net."""
    _run_and_check(tmp_path, "qat_resnet", "memory_format=channels_last")


def test_ptq_run_exports_onnx_that_onnxruntime_runs(tmp_path):
    import onnxruntime

    _run_and_check(tmp_path, "ptq_resnet", "export.onnx=true")
    session = onnxruntime.InferenceSession(str(tmp_path / "model_int8.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(4, 3, 32, 32)
    (logits,) = session.run(None, {"input": x.numpy()})
    int8_logits = load(tmp_path / "model_int8.qat")(x)
    assert logits.shape == (4, 10) and torch.allclose(torch.from_numpy(logits), int8_logits, atol=0.5)


def test_short_real_cifar_qat_run_beats_chance(shared_data, tmp_path):
    """QAT W8A8 from the pretrained ResNet-20 for a few steps on the JPEG CIFAR-10: int8 well above 10%."""
    cfg = compose_config(
        tmp_path, "+recipe=qat_resnet", f"paths.data_root={shared_data}", "data.batch_size=64", "data.num_workers=0",
        "trainer.accelerator=cpu", "trainer.max_epochs=1", "trainer.limit_train_batches=4",
        "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false",
        "logger=csv", "quant.calibration_batches=2", "evaluate.limit_batches=4", "evaluate.latency_iters=2",
        "export.onnx=false",
    )
    run(cfg)
    summary = json.loads((tmp_path / "summary.json").read_text())
    top1 = {v["name"]: v["top1"] for v in summary["variants"]}
    assert summary["variants"][-1]["num_images"] == 256 and summary["epochs_trained"] == 1
    assert min(top1.values()) > 50.0, top1  # chance is 10%; the pretrained model is ~81% on this split
    assert abs(top1["int8"] - top1["fake_quant"]) <= 2.0, top1
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert any((tmp_path / "csv").rglob("metrics.csv"))


def test_sweep_runs_every_job_and_gathers_them(tmp_path):
    """python train.py -m ... quant.observer=minmax,mse: one run directory and summary per job, one table."""
    command = [
        sys.executable, "train.py", "-m", "+recipe=ptq_resnet", "data=synthetic", "data.num_train=16",
        "data.batch_size=8", "quant.observer=minmax,mse", "quant.calibration_batches=1", "evaluate.limit_batches=1",
        "evaluate.latency_iters=1", "evaluate.latency_batch_size=2", "export.onnx=false",
        f"hydra.sweep.dir={tmp_path}", *pretrained_overrides(),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    observers = [json.loads((tmp_path / str(job) / "summary.json").read_text())["observer"] for job in (0, 1)]
    assert observers == ["minmax", "mse"]
    gathered = subprocess.run([sys.executable, "scripts/gather_sweep.py", str(tmp_path)], cwd=REPO,
                              capture_output=True, text=True, timeout=60, check=False)
    assert gathered.returncode == 0, gathered.stderr
    table = (tmp_path / "sweep.md").read_text()
    assert "| 0 | quant.observer=minmax |" in table and "| 1 | quant.observer=mse |" in table


def test_resnet18_recipe_runs_on_an_imagefolder_tree(tmp_path):
    """qat_resnet18 with its own data module: <root>/{train,val}/<class>/*.png, classes from the folders."""
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 4), ("val", 2)):
        for name in ("cat", "dog", "emu"):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    overrides = [o for o in FAST if not o.startswith("data")]
    cfg = compose_config(tmp_path / "run", "+recipe=qat_resnet18", f"data.root={root}", "data.image_size=32",
                         "data.batch_size=4", "data.num_workers=0", *overrides)
    run(cfg)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [v["name"] for v in summary["variants"]] == ["fake_quant", "int8"]
    assert summary["model"] == "resnet18" and summary["variants"][-1]["num_images"] == 4
    assert load(tmp_path / "run" / "model_int8.qat")(torch.randn(2, 3, 32, 32)).shape == (2, 3)
