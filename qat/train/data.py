"""Lightning DataModules: CIFAR-10 (any on-disk layout qat.data knows), ImageNet-style ImageFolder trees,
and deterministic synthetic images for tests.

CIFAR-10 and synthetic data live in memory as uint8; loaders yield normalized float32 batches
[B, 3, H, W] and int64 labels [B], with pad-4 random crop + horizontal flip on training batches.

    >>> dm = SyntheticDataModule(num_train=8, num_val=4, batch_size=4)
    >>> dm.setup("fit")
    >>> x, y = next(iter(dm.train_dataloader()))
    >>> tuple(x.shape), tuple(y.shape)
    ((4, 3, 32, 32), (4,))
"""
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets
from torchvision.transforms import v2

from qat.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    BatchTransform,
    DatasetNotFoundError,
    load_cifar10,
    resolve_data_root,
    synthetic_arrays,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _loader(dataset: Dataset, batch_size: int, num_workers: int, train: bool, collate_fn=None) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train,
        drop_last=train,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )


class UInt8DataModule(L.LightningDataModule):
    """Shared loaders for in-memory uint8 splits; a subclass's `setup` fills `self.splits` (train, val, test)."""

    def __init__(self, batch_size: int, num_workers: int, augment: bool, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.batch_size, self.num_workers = batch_size, num_workers
        self.train_transform = BatchTransform(tuple(map(float, mean)), tuple(map(float, std)), augment=augment)
        self.eval_transform = BatchTransform(tuple(map(float, mean)), tuple(map(float, std)), augment=False)
        self.splits: tuple[Dataset, Dataset, Dataset] | None = None

    def _split(self, index: int) -> Dataset:
        if self.splits is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before asking for a dataloader")
        return self.splits[index]

    def train_dataloader(self) -> DataLoader:
        return _loader(self._split(0), self.batch_size, self.num_workers, True, self.train_transform)

    def val_dataloader(self) -> DataLoader:
        return _loader(self._split(1), self.batch_size, self.num_workers, False, self.eval_transform)

    def test_dataloader(self) -> DataLoader:
        return _loader(self._split(2), self.batch_size, self.num_workers, False, self.eval_transform)


class CIFAR10DataModule(UInt8DataModule):
    """CIFAR-10 from `root` (or $QAT_DATA_ROOT); see qat.data for the sources ("auto" picks the first found).

    val_split: 0 validates on the test split; a fraction (0, 1) or a count holds out that much of train
    (the same images for the same seed).
    """

    num_classes = 10
    input_size = (3, 32, 32)

    def __init__(
        self,
        root: str | Path | None = None,
        batch_size: int = 128,
        num_workers: int = 4,
        augment: bool = True,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
        val_split: float = 0,
        source: str = "auto",
        cache_dir: str | Path | None = None,
        download: bool = False,
        seed: int = 0,
    ):
        super().__init__(batch_size, num_workers, augment, mean, std)
        self.save_hyperparameters()
        self.root = resolve_data_root(root)
        self.source, self.cache_dir, self.download = source, cache_dir, download
        self.val_split, self.seed = val_split, seed

    def prepare_data(self) -> None:
        """Decode and cache (or download) once per node, before `setup` runs in every process."""
        load_cifar10("test", self.root, self.source, self.cache_dir, self.download)

    def setup(self, stage: str | None = None) -> None:
        if self.splits is None:
            self.splits = self._load_splits()

    def _load_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        train = load_cifar10("train", self.root, self.source, self.cache_dir, self.download).to_dataset()
        test = load_cifar10("test", self.root, self.source, self.cache_dir, self.download).to_dataset()
        if not self.val_split:
            return train, test, test
        num_val = round(self.val_split * len(train)) if self.val_split < 1 else int(self.val_split)
        if not 0 < num_val < len(train):
            raise ValueError(f"val_split={self.val_split} leaves no train or no val images out of {len(train)}")
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.seed)).tolist()
        return Subset(train, order[num_val:]), Subset(train, order[:num_val]), test


class SyntheticDataModule(UInt8DataModule):
    """Random uint8 images and labels, identical for the same seed: for tests and dry runs."""

    def __init__(
        self,
        num_classes: int = 10,
        image_size: int = 32,
        num_train: int = 256,
        num_val: int = 64,
        batch_size: int = 32,
        num_workers: int = 0,
        augment: bool = False,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
        seed: int = 0,
    ):
        super().__init__(batch_size, num_workers, augment, mean, std)
        self.save_hyperparameters()
        self.num_classes, self.input_size = num_classes, (3, image_size, image_size)
        self.num_train, self.num_val, self.seed = num_train, num_val, seed

    def setup(self, stage: str | None = None) -> None:
        if self.splits is None:
            train = synthetic_arrays(self.num_train, self.num_classes, self.input_size[-1], self.seed)
            val = synthetic_arrays(self.num_val, self.num_classes, self.input_size[-1], self.seed + 1).to_dataset()
            self.splits = (train.to_dataset(), val, val)


class ImageFolderDataModule(L.LightningDataModule):
    """ImageNet-style tree root/<split>/<class>/*: RandomResizedCrop + flip for train, resize + center crop
    for eval (resize_size defaults to image_size / 0.875, i.e. 256 for 224)."""

    def __init__(
        self,
        root: str | Path | None = None,
        image_size: int = 224,
        resize_size: int | None = None,
        batch_size: int = 64,
        num_workers: int = 8,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        train_dir: str = "train",
        val_dir: str = "val",
        test_dir: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.root = resolve_data_root(root)
        self.dirs = {"train": train_dir, "val": val_dir, "test": test_dir or val_dir}
        missing = [str(self.root / d) for d in dict.fromkeys(self.dirs.values()) if not (self.root / d).is_dir()]
        if missing:
            raise DatasetNotFoundError(f"ImageFolder split directories not found: {', '.join(missing)}")
        self.classes = tuple(sorted(p.name for p in (self.root / train_dir).iterdir() if p.is_dir()))
        self.num_classes, self.input_size = len(self.classes), (3, image_size, image_size)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.train_transform, self.eval_transform = _imagenet_transforms(image_size, resize_size, mean, std)

    def _dataset(self, split: str) -> datasets.ImageFolder:
        transform = self.train_transform if split == "train" else self.eval_transform
        return datasets.ImageFolder(str(self.root / self.dirs[split]), transform=transform)

    def train_dataloader(self) -> DataLoader:
        return _loader(self._dataset("train"), self.batch_size, self.num_workers, True)

    def val_dataloader(self) -> DataLoader:
        return _loader(self._dataset("val"), self.batch_size, self.num_workers, False)

    def test_dataloader(self) -> DataLoader:
        return _loader(self._dataset("test"), self.batch_size, self.num_workers, False)


def _imagenet_transforms(
    image_size: int, resize_size: int | None, mean: Sequence[float], std: Sequence[float]
) -> tuple[v2.Compose, v2.Compose]:
    to_tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    train = v2.Compose([v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip(), *to_tensor])
    resize = resize_size or round(image_size / 0.875)
    evaluate = v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(image_size), *to_tensor])
    return train, evaluate
