"""scripts/eval_int8.py evaluates an exported artifact on real CIFAR-10 images."""
import re
import subprocess
import sys
from pathlib import Path

from qat.int8 import convert
from qat.data import cifar10_test_batches
from qat.artifact import export
from qat.fx import QuantConfig, calibrate, prepare
from qat.models.cifar_resnet import load_cifar_resnet

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "eval_int8.py"


def test_eval_int8_prints_accuracy_and_latency(tmp_path, shared_data):
    model = load_cifar_resnet(20, next((shared_data / "pretrained").glob("resnet20-*.th"))).eval()
    batches = list(cifar10_test_batches(shared_data, n=256, batch_size=128, source="lossless_subset"))
    prepared = prepare(model, QuantConfig.preset("w8a8_ptq"), (batches[0][0],))
    calibrate(prepared, batches)
    export(convert(prepared, "fbgemm"), tmp_path / "r20.qat")
    out = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "r20.qat"), "--data", str(shared_data),
         "--source", "lossless_subset", "--limit", "512", "--batch-size", "128"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    top1 = float(re.search(r"top-1\s+([\d.]+)% +on 512 images", out.stdout).group(1))
    assert top1 > 85.0  # float ResNet-20 scores 91.2% on these 512 images
    assert re.search(r"latency\s+[\d.]+ ms/image", out.stdout)
