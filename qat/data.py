"""Image data without Lightning: find CIFAR-10 on disk, decode it once into a uint8 cache, and turn uint8
images into normalized (optionally augmented) float batches.

CIFAR-10 sources, looked for in this order by source="auto" under the data root (argument or
$QAT_DATA_ROOT); the decoded arrays of the JPEG sources are cached under $QAT_CACHE_DIR (~/.cache/qat):

    torchvision      <root>/cifar-10-batches-py/            (python pickles; download=True fetches them)
    imagefolder      <root>/[cifar10/]{train,test}/<class>/*.jpg|png
    archive          <root>/cifar10-jpeg.tar.xz             (or root is the archive itself)
    lossless_subset  <root>/cifar10_lossless_subset.npz     (only when asked for by name)

    >>> from torch.utils.data import DataLoader
    >>> loader = DataLoader(synthetic_arrays(8).to_dataset(), batch_size=4, collate_fn=BatchTransform(augment=True))
    >>> x, y = next(iter(loader))
    >>> tuple(x.shape), x.dtype, tuple(y.shape), y.dtype
    ((4, 3, 32, 32), torch.float32, (4,), torch.int64)
"""
import hashlib
import io
import os
import pickle
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# The normalisation the shared pretrained CIFAR ResNets were trained with (ImageNet statistics).
CIFAR10_MEAN = (0.485, 0.456, 0.406)
CIFAR10_STD = (0.229, 0.224, 0.225)
SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class DatasetNotFoundError(FileNotFoundError):
    """No dataset in any of the layouts looked for; the message lists each layout and path."""


@dataclass(frozen=True)
class ImageArrays:
    """A split held as uint8 images [N, C, H, W] and int64 labels [N]."""

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def to_dataset(self) -> "UInt8ImageDataset":
        return UInt8ImageDataset(torch.from_numpy(self.images), torch.from_numpy(self.labels))


@dataclass(frozen=True)
class CifarSource:
    """One on-disk layout: where it is looked for, and how a split is read from the found path."""

    layout: str
    locate: Callable[[Path], Path | None]
    read: Callable[[Path, str, Path], ImageArrays]  # (found path, split, cache dir) -> arrays


def resolve_data_root(root: str | Path | None = None) -> Path:
    """`root`, else $QAT_DATA_ROOT, else an error saying how to set one."""
    root = root if root is not None else os.environ.get("QAT_DATA_ROOT")
    if root is None:
        raise DatasetNotFoundError("no data root: pass root=... or set QAT_DATA_ROOT")
    return Path(root).expanduser()


def default_cache_dir() -> Path:
    return Path(os.environ.get("QAT_CACHE_DIR", Path.home() / ".cache" / "qat")).expanduser()


def load_cifar10(
    split: str,
    root: str | Path | None = None,
    source: str = "auto",
    cache_dir: str | Path | None = None,
    download: bool = False,
) -> ImageArrays:
    """Read CIFAR-10 `split` ("train" or "test") from the first layout found (see the module docstring)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if source != "auto" and source not in CIFAR10_SOURCES:
        raise ValueError(f"unknown CIFAR-10 source {source!r}; expected 'auto' or one of {tuple(CIFAR10_SOURCES)}")
    root = resolve_data_root(root)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    names = AUTO_ORDER if source == "auto" else (source,)
    for name in names:
        found = CIFAR10_SOURCES[name].locate(root)
        if found is not None:
            return CIFAR10_SOURCES[name].read(found, split, cache)
    if download and "torchvision" in names:
        return _read_torchvision(_download_torchvision(root), split, cache)
    looked = "\n".join(f"  {name}: {CIFAR10_SOURCES[name].layout} under {root}" for name in names)
    raise DatasetNotFoundError(f"CIFAR-10 not found; looked for:\n{looked}\n(set root=... or QAT_DATA_ROOT)")


def _locate_torchvision(root: Path) -> Path | None:
    batches = root / "cifar-10-batches-py"
    return batches if (batches / "test_batch").is_file() else None


def _download_torchvision(root: Path) -> Path:
    from torchvision.datasets import CIFAR10

    CIFAR10(str(root), train=True, download=True)
    return root / "cifar-10-batches-py"


def _read_torchvision(batches: Path, split: str, cache: Path) -> ImageArrays:
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = [], []
    for name in names:
        with open(batches / name, "rb") as f:
            entry = pickle.load(f, encoding="latin1")  # torchvision's own format; trusted local file
        images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))  # [N, 3072] -> NCHW
        labels.append(np.asarray(entry["labels"], dtype=np.int64))
    return ImageArrays(np.concatenate(images), np.concatenate(labels), CIFAR10_CLASSES)


def _locate_imagefolder(root: Path) -> Path | None:
    for tree in (root, root / "cifar10"):
        if all((tree / split).is_dir() for split in SPLITS):
            return tree
    return None


def _read_imagefolder(tree: Path, split: str, cache: Path) -> ImageArrays:
    files = sorted(p for p in tree.glob("*/*/*") if p.suffix.lower() in IMAGE_SUFFIXES and p.parts[-3] in SPLITS)
    listing = "\n".join(f"{p.relative_to(tree)} {p.stat().st_size} {p.stat().st_mtime_ns}" for p in files)
    key = hashlib.sha256(f"{tree.resolve()}\n{listing}".encode()).hexdigest()[:16]
    members = ((PurePosixPath(p.relative_to(tree).as_posix()), p.read_bytes) for p in files)
    return _cached_split(cache / f"cifar10-imagefolder-{key}.npz", split, lambda: _decode_tree(members))


def _locate_archive(root: Path) -> Path | None:
    archive = root if root.is_file() and ".tar" in root.name else root / "cifar10-jpeg.tar.xz"
    return archive if archive.is_file() else None


def _read_archive(archive: Path, split: str, cache: Path) -> ImageArrays:
    digest = hashlib.sha256()
    with open(archive, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    cache_file = cache / f"cifar10-archive-{digest.hexdigest()[:16]}.npz"
    return _cached_split(cache_file, split, lambda: _decode_tree(_tar_members(archive)))


def _tar_members(archive: Path) -> Iterator[tuple[PurePosixPath, Callable[[], bytes]]]:
    """Stream (path, read) pairs of the archive's image files without extracting to disk."""
    with tarfile.open(archive, "r|*") as tar:
        for member in tar:
            path = PurePosixPath(member.name)
            if member.isfile() and path.suffix.lower() in IMAGE_SUFFIXES:
                data = tar.extractfile(member).read()
                yield path, lambda data=data: data


def _decode_tree(members: Iterable[tuple[PurePosixPath, Callable[[], bytes]]]) -> dict[str, np.ndarray]:
    """Decode .../<split>/<class>/<file> images into {split}_x [N, 3, H, W] uint8, {split}_y, classes."""
    decoded = {split: [] for split in SPLITS}  # split -> [(class, file name, (H, W), RGB bytes)]
    for path, read in members:
        split, class_name = path.parts[-3], path.parts[-2]
        if split in decoded:
            with Image.open(io.BytesIO(read())) as image:
                rgb = image if image.mode == "RGB" else image.convert("RGB")
                decoded[split].append((class_name, path.name, (rgb.height, rgb.width), rgb.tobytes()))
    classes = sorted({item[0] for items in decoded.values() for item in items})
    sizes = {item[2] for items in decoded.values() for item in items}
    if len(sizes) != 1:
        raise ValueError(f"expected images of a single size to cache as one array, found {sorted(sizes) or 'none'}")
    (height, width), arrays = sizes.pop(), {"classes": np.array(classes)}
    for split, items in decoded.items():
        items.sort(key=lambda item: item[:2])
        pixels = np.frombuffer(b"".join(item[3] for item in items), dtype=np.uint8)
        arrays[f"{split}_x"] = pixels.reshape(-1, height, width, 3).transpose(0, 3, 1, 2).copy()  # NHWC -> NCHW
        arrays[f"{split}_y"] = np.array([classes.index(item[0]) for item in items], dtype=np.int64)
    return arrays


def _cached_split(cache_file: Path, split: str, decode: Callable[[], dict[str, np.ndarray]]) -> ImageArrays:
    """Read `split` from the npz cache, decoding everything and writing the cache (atomically) first if absent."""
    if not cache_file.is_file():
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        _write_npz_atomically(cache_file, decode())
    with np.load(cache_file) as cached:
        return ImageArrays(cached[f"{split}_x"], cached[f"{split}_y"], tuple(str(c) for c in cached["classes"]))


def _write_npz_atomically(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see a partial cache."""
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name, suffix=".tmp", delete=False) as tmp:
        try:
            np.savez(tmp, **arrays)
        except BaseException:
            os.unlink(tmp.name)
            raise
    os.replace(tmp.name, path)


def _locate_lossless(root: Path) -> Path | None:
    npz = root if root.is_file() and root.suffix == ".npz" else root / "cifar10_lossless_subset.npz"
    return npz if npz.is_file() else None


def _read_lossless(npz: Path, split: str, cache: Path) -> ImageArrays:
    with np.load(npz) as subset:
        images = np.ascontiguousarray(subset[f"{split}_x"].transpose(0, 3, 1, 2))  # NHWC -> NCHW
        labels = subset[f"{split}_y_all"][subset[f"{split}_idx"]].astype(np.int64)
    return ImageArrays(images, labels, CIFAR10_CLASSES)


CIFAR10_SOURCES = {
    "torchvision": CifarSource("cifar-10-batches-py/{data_batch_1..5,test_batch}", _locate_torchvision, _read_torchvision),
    "imagefolder": CifarSource("[cifar10/]{train,test}/<class>/*.jpg", _locate_imagefolder, _read_imagefolder),
    "archive": CifarSource("cifar10-jpeg.tar.xz", _locate_archive, _read_archive),
    "lossless_subset": CifarSource("cifar10_lossless_subset.npz", _locate_lossless, _read_lossless),
}
AUTO_ORDER = ("torchvision", "imagefolder", "archive")


class UInt8ImageDataset(Dataset):
    """(image uint8 [C, H, W], label) pairs over in-memory tensors; batch them with `BatchTransform`."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if images.dtype != torch.uint8 or images.ndim != 4 or len(images) != len(labels):
            raise ValueError(f"expected uint8 images [N, C, H, W] and N labels, got {images.shape} {images.dtype}")
        self.images, self.labels = images, labels.long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]


def random_crop_flip(images: torch.Tensor, padding: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero-pad by `padding`, crop back to H x W at a random offset and flip half the images (per image).

    >>> random_crop_flip(torch.zeros(5, 3, 32, 32, dtype=torch.uint8)).shape
    torch.Size([5, 3, 32, 32])
    """
    n, c, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))  # [N, C, H + 2p, W + 2p]
    top = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator)
    left = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator)
    flip = torch.rand(n, 1, generator=generator) < 0.5
    rows = top + torch.arange(h)  # [N, H]
    cols = left + torch.arange(w)  # [N, W]
    cols = torch.where(flip, cols.flip(1), cols)  # reversed columns = horizontal flip
    batch_index = torch.arange(n)[:, None, None, None]
    channel_index = torch.arange(c)[None, :, None, None]
    return padded[batch_index, channel_index, rows[:, None, :, None], cols[:, None, None, :]]  # [N, C, H, W]


def normalize(images: torch.Tensor, mean: Iterable[float], std: Iterable[float]) -> torch.Tensor:
    """uint8 [N, C, H, W] -> float32 ((x / 255) - mean) / std per channel."""
    mean_t = torch.tensor(tuple(mean), dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(tuple(std), dtype=torch.float32).view(1, -1, 1, 1)
    return (images.float() / 255.0 - mean_t) / std_t


@dataclass(frozen=True)
class BatchTransform:
    """A DataLoader collate_fn: stacks uint8 samples, augments (crop + flip) if asked, normalizes."""

    mean: tuple[float, ...] = CIFAR10_MEAN
    std: tuple[float, ...] = CIFAR10_STD
    augment: bool = False
    padding: int = 4

    def __call__(self, samples: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.stack([image for image, _ in samples])  # [B, C, H, W] uint8
        labels = torch.stack([label for _, label in samples])
        if self.augment:
            images = random_crop_flip(images, self.padding)
        return normalize(images, self.mean, self.std), labels


def cifar10_test_batches(
    root: str | Path | None = None,
    n: int | None = None,
    batch_size: int = 256,
    source: str = "auto",
    mean: tuple[float, ...] = CIFAR10_MEAN,
    std: tuple[float, ...] = CIFAR10_STD,
    cache_dir: str | Path | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield normalized (images float32 [B, 3, 32, 32], labels int64 [B]) of the first `n` test images."""
    test = load_cifar10("test", root, source, cache_dir)
    count = len(test) if n is None else min(n, len(test))
    for start in range(0, count, batch_size):
        stop = min(start + batch_size, count)
        images = torch.from_numpy(test.images[start:stop])
        yield normalize(images, mean, std), torch.from_numpy(test.labels[start:stop])


def synthetic_arrays(num_images: int, num_classes: int = 10, image_size: int = 32, seed: int = 0) -> ImageArrays:
    """Random uint8 images and labels, the same for the same arguments."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(num_images, 3, image_size, image_size), dtype=np.uint8)
    labels = rng.integers(0, num_classes, size=num_images, dtype=np.int64)
    return ImageArrays(images, labels, tuple(f"class_{i}" for i in range(num_classes)))
