"""Evaluate an exported int8 artifact (qat.export) on a dataset folder: top-1 accuracy and latency.

    python scripts/eval_int8.py model_int8.qat --data ../shared/data [--source auto] [--limit 2000]

The folder is read like the CIFAR-10 DataModule reads it: torchvision's cifar-10-batches-py, an
ImageFolder tree (<root>/test/<class>/*.jpg), the cifar10-jpeg.tar.xz archive, or the lossless subset
(--source lossless_subset). Needs only the artifact: the model's Python code is not imported.
"""
import argparse
import statistics
import time

import torch

from qat.data import CIFAR10_MEAN, CIFAR10_STD, cifar10_test_batches
from qat.artifact import load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--data", default="../shared/data", help="dataset folder (see above)")
    parser.add_argument("--source", default="auto", help="auto | torchvision | imagefolder | archive | lossless_subset")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N test images")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--mean", type=float, nargs=3, default=CIFAR10_MEAN)
    parser.add_argument("--std", type=float, nargs=3, default=CIFAR10_STD)
    parser.add_argument("--backend", default=None, help="kernel backend (default: the artifact's, if it suits the CPU)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load(args.artifact, backend=args.backend)
    correct = total = 0
    times = []
    with torch.inference_mode():
        for images, labels in cifar10_test_batches(args.data, args.limit, args.batch_size, args.source,
                                                  tuple(args.mean), tuple(args.std)):
            start = time.perf_counter()
            logits = model(images)
            times.append((time.perf_counter() - start) * 1e3 / len(images))
            correct += (logits.argmax(1) == labels).sum().item()
            total += len(labels)
    print(f"artifact  {args.artifact}  (backend {model.qat_backend}, torch {torch.__version__})")
    print(f"top-1     {100.0 * correct / total:.2f}%  on {total} images")
    print(f"latency   {statistics.median(times):.3f} ms/image (median over {len(times)} batches of {args.batch_size})")


if __name__ == "__main__":
    main()
