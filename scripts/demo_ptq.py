"""Post-training quantization of the pretrained CIFAR ResNet-20, evaluated with fake-quant.

    python scripts/demo_ptq.py --data ../shared/data
"""
import argparse

import torch

from qat.data import cifar10_test_batches
from qat.fx import QuantConfig, calibrate, coverage, prepare
from qat.models.cifar_resnet import load_cifar_resnet
from pathlib import Path


def accuracy(model: torch.nn.Module, batches) -> float:
    correct = total = 0
    with torch.no_grad():
        for images, labels in batches:
            correct += (model(images).argmax(1) == labels).sum().item()
            total += len(labels)
    return 100.0 * correct / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data", help="folder holding pretrained/ and the CIFAR-10 files")
    parser.add_argument("--preset", default="w8a8_ptq")
    parser.add_argument("--calibration-batches", type=int, default=4)
    args = parser.parse_args()
    data = Path(args.data)
    model = load_cifar_resnet(20, next((data / "pretrained").glob("resnet20-*.th"))).eval()
    batches = list(cifar10_test_batches(data, batch_size=128, source="lossless_subset"))
    prepared = prepare(model, QuantConfig.preset(args.preset), example_inputs=(batches[0][0],))
    calibrate(prepared, batches, num_batches=args.calibration_batches)
    quantized, total = coverage(prepared)
    print(f"ResNet-20 on the lossless CIFAR-10 subset ({sum(len(b[1]) for b in batches)} test images)")
    print(f"float32      top-1 {accuracy(model, batches):6.2f}%")
    print(f"{args.preset:<12} top-1 {accuracy(prepared.eval(), batches):6.2f}%   ({quantized}/{total} layers quantized)")


if __name__ == "__main__":
    main()
