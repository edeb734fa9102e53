"""PTQ of the pretrained ResNet-20 with each activation observer: fake-quant and int8 top-1, and how often the
int8 model's top-1 agrees with the fake-quant model's.

    python scripts/ptq_observers.py --data ../shared/data [--source lossless_subset|archive]

Calibration: 1,024 training images of the same source (8 batches of 128); weights: per-channel symmetric
int8 (min-max); activations: per-tensor affine uint8 with the observer of each row.
"""
import argparse

import torch

from qat.int8 import convert
from qat.data import CIFAR10_MEAN, CIFAR10_STD, cifar10_test_batches, load_cifar10, normalize
from qat.fx import QuantConfig, calibrate, prepare
from qat.fx.config import A8_AFFINE
from qat.models.cifar_resnet import load_cifar_resnet
from qat.quant.config import QuantizerConfig
from pathlib import Path

OBSERVERS = (("minmax", {}), ("ema", {}), ("percentile", {"percentile": 99.99}), ("percentile", {"percentile": 99.999}),
             ("mse", {}), ("entropy", {}))


def top1_and_agreement(model, reference, batches) -> tuple[float, float]:
    correct = agree = total = 0
    with torch.no_grad():
        for images, labels in batches:
            pred = model(images).argmax(1)
            correct += (pred == labels).sum().item()
            agree += (pred == reference(images).argmax(1)).sum().item() if reference is not None else 0
            total += len(labels)
    return 100.0 * correct / total, 100.0 * agree / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--source", default="lossless_subset")
    parser.add_argument("--backend", default="fbgemm")
    args = parser.parse_args()
    data = Path(args.data)
    model = load_cifar_resnet(20, next((data / "pretrained").glob("resnet20-*.th"))).eval()
    test = list(cifar10_test_batches(data, batch_size=500, source=args.source))
    train = load_cifar10("train", data, source=args.source)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:1024].numpy()
    calibration = [normalize(torch.from_numpy(train.images[order[i:i + 128]]), CIFAR10_MEAN, CIFAR10_STD)
                   for i in range(0, 1024, 128)]
    print(f"ResNet-20, {sum(len(b[1]) for b in test)} test images ({args.source}), int8 backend {args.backend}")
    print("| observer | fake-quant top-1 | int8 top-1 | int8 = fake-quant top-1 |\n| --- | ---: | ---: | ---: |")
    print(f"| float32 | {top1_and_agreement(model, None, test)[0]:.2f} | | |")
    for method, kwargs in OBSERVERS:
        prepared = prepare(model, QuantConfig(activation=QuantizerConfig(A8_AFFINE, method, **kwargs)), (calibration[0],))
        calibrate(prepared, calibration)
        fq, _ = top1_and_agreement(prepared, None, test)
        int8, agree = top1_and_agreement(convert(prepared, args.backend), prepared, test)
        label = method + "".join(f" {v}" for v in kwargs.values())
        print(f"| {label} | {fq:.2f} | {int8:.2f} | {agree:.2f} |", flush=True)


if __name__ == "__main__":
    main()
