"""Every recipe runs end to end (synthetic data, fast_dev_run, CPU); a short real CIFAR-10 run beats chance."""
import json

import pytest
import torch
from app_helpers import FAST, RECIPES, compose_config, pretrained_overrides

from qat.export import load
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
