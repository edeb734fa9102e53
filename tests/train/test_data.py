"""CIFAR-10 sources (torchvision pickles, ImageFolder tree, archive, lossless subset), the uint8 cache,
augmentation, normalization, and the DataModules built on them."""
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import qat.data
from qat.data import (
    CIFAR10_CLASSES,
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR10_SOURCES,
    DatasetNotFoundError,
    cifar10_test_batches,
    load_cifar10,
    normalize,
    random_crop_flip,
)
from qat.models import load_cifar_resnet
from qat.train.data import CIFAR10DataModule, ImageFolderDataModule, SyntheticDataModule

# Official labels of the first ten CIFAR-10 test images: cat ship ship airplane frog frog automobile frog cat automobile.
FIRST_TEST_LABELS = [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]


def tiny_images(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, 3, 32, 32), dtype=np.uint8)


def write_png_tree(tree: Path, classes=("cat", "airplane"), per_class: int = 3) -> dict[str, np.ndarray]:
    """tree/<split>/<class>/<i>.png (lossless); returns the expected NCHW arrays in sorted-class order."""
    expected = {}
    for split_index, split in enumerate(("train", "test")):
        images = tiny_images(len(classes) * per_class, seed=split_index)
        for i, image in enumerate(images):
            folder = tree / split / classes[i // per_class]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.transpose(1, 2, 0)).save(folder / f"{i % per_class:04d}.png")
        order = np.argsort([classes[i // per_class] for i in range(len(images))], kind="stable")
        expected[split] = images[order]
    return expected


def test_lossless_subset_shapes_dtypes_and_official_labels(shared_data):
    test = load_cifar10("test", shared_data, source="lossless_subset")
    train = load_cifar10("train", shared_data, source="lossless_subset")
    assert test.images.shape == (1017, 3, 32, 32) and test.images.dtype == np.uint8
    assert train.images.shape == (5085, 3, 32, 32) and train.labels.dtype == np.int64
    assert test.labels[:10].tolist() == FIRST_TEST_LABELS
    assert test.classes == CIFAR10_CLASSES and len(test.classes) == 10
    assert set(np.unique(train.labels)) == set(range(10))


def test_data_root_comes_from_environment(shared_data, monkeypatch):
    monkeypatch.setenv("QAT_DATA_ROOT", str(shared_data))
    assert load_cifar10("test", source="lossless_subset").labels[:10].tolist() == FIRST_TEST_LABELS
    monkeypatch.delenv("QAT_DATA_ROOT")
    with pytest.raises(DatasetNotFoundError, match="QAT_DATA_ROOT"):
        load_cifar10("test")


def test_missing_dataset_names_every_layout_and_root(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_cifar10("test", tmp_path, cache_dir=tmp_path / "cache")
    message = str(info.value)
    for name in ("torchvision", "imagefolder", "archive"):
        assert f"{name}: {CIFAR10_SOURCES[name].layout} under {tmp_path}" in message
    with pytest.raises(DatasetNotFoundError, match="cifar10_lossless_subset.npz under"):
        load_cifar10("test", tmp_path, source="lossless_subset")


def test_unknown_split_or_source_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown split 'val'"):
        load_cifar10("val", tmp_path)
    with pytest.raises(ValueError, match="unknown CIFAR-10 source 'jpeg'"):
        load_cifar10("test", tmp_path, source="jpeg")


def test_torchvision_pickles_are_read_as_nchw(tmp_path):
    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    expected = {"train": [], "test": []}
    for index, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        images = tiny_images(2, seed=index)
        with open(batches / name, "wb") as f:
            pickle.dump({"data": images.reshape(2, -1), "labels": [index, 9 - index]}, f)
        expected["test" if name == "test_batch" else "train"].append(images)
    train = load_cifar10("train", tmp_path)
    np.testing.assert_array_equal(train.images, np.concatenate(expected["train"]))
    assert train.labels.tolist() == [0, 9, 1, 8, 2, 7, 3, 6, 4, 5]
    np.testing.assert_array_equal(load_cifar10("test", tmp_path).images, expected["test"][0])


@pytest.mark.parametrize("nested", [False, True])
def test_image_folder_tree_is_decoded_then_read_from_cache(tmp_path, monkeypatch, nested):
    data_root, cache = tmp_path / "data", tmp_path / "cache"
    expected = write_png_tree(data_root / "cifar10" if nested else data_root)
    train = load_cifar10("train", data_root, cache_dir=cache)
    assert train.classes == ("airplane", "cat")
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    np.testing.assert_array_equal(train.images, expected["train"])
    assert len(list(cache.glob("cifar10-imagefolder-*.npz"))) == 1
    monkeypatch.setattr(qat.data, "_decode_tree", lambda members: pytest.fail("decoded again despite the cache"))
    np.testing.assert_array_equal(load_cifar10("test", data_root, cache_dir=cache).images, expected["test"])


def test_image_folder_of_mixed_sizes_is_rejected(tmp_path):
    write_png_tree(tmp_path)
    Image.new("RGB", (16, 16)).save(tmp_path / "test" / "cat" / "small.png")
    with pytest.raises(ValueError, match=r"single size .*\(16, 16\), \(32, 32\)"):
        load_cifar10("test", tmp_path, cache_dir=tmp_path / "cache")


def test_archive_is_streamed_decoded_and_cached(tmp_path, monkeypatch):
    expected = write_png_tree(tmp_path / "tree" / "cifar10")
    archive = tmp_path / "data" / "cifar10-jpeg.tar.xz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(tmp_path / "tree" / "cifar10", arcname="cifar10")
    cache = tmp_path / "cache"
    np.testing.assert_array_equal(load_cifar10("test", archive.parent, cache_dir=cache).images, expected["test"])
    assert [p.suffix for p in cache.iterdir()] == [".npz"]  # no temporary file left behind
    monkeypatch.setattr(qat.data, "_decode_tree", lambda members: pytest.fail("decoded again despite the cache"))
    np.testing.assert_array_equal(load_cifar10("train", archive, cache_dir=cache).images, expected["train"])


@pytest.mark.slow  # extract + decode of 60,000 JPEGs: 7 s on an idle 2-core machine, 15 s on a busy one
def test_real_archive_extracts_caches_and_decodes_faithfully(shared_data, tmp_path, monkeypatch):
    test = load_cifar10("test", shared_data, source="archive", cache_dir=tmp_path)
    assert test.images.shape == (10000, 3, 32, 32) and test.images.dtype == np.uint8
    assert np.bincount(test.labels).tolist() == [1000] * 10
    assert test.classes == CIFAR10_CLASSES
    model = load_cifar_resnet(20, next((shared_data / "pretrained").glob("resnet20-*.th"))).eval()
    with torch.no_grad():
        predictions = torch.cat([model(x).argmax(1) for x, _ in cifar10_test_batches(shared_data, cache_dir=tmp_path)])
    assert (predictions.numpy() == test.labels).mean() == pytest.approx(0.8103, abs=0.0005)  # data README: 81.03
    monkeypatch.setattr(qat.data, "_decode_tree", lambda members: pytest.fail("decoded again despite the cache"))
    train = load_cifar10("train", shared_data, source="archive", cache_dir=tmp_path)
    assert train.images.shape == (50000, 3, 32, 32)
    assert np.bincount(train.labels).tolist() == [5000] * 10


def test_random_crop_flip_is_a_shifted_window_of_the_padded_image():
    images = torch.arange(64 * 2 * 6 * 6).reshape(64, 2, 6, 6)  # unique values locate every pixel
    out = random_crop_flip(images, padding=2)
    assert out.shape == images.shape and out.dtype == images.dtype
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    flips = []
    for image, crop in zip(padded, out):
        windows = [(top, left, flip) for top in range(5) for left in range(5) for flip in (False, True)
                   if torch.equal(crop, _window(image, top, left, flip))]
        assert windows, "output is not a crop (or flipped crop) of the padded input"
        flips.append(windows[0][2])
    assert 0 < sum(flips) < len(flips)


def _window(image: torch.Tensor, top: int, left: int, flip: bool) -> torch.Tensor:
    window = image[:, top:top + 6, left:left + 6]
    return window.flip(-1) if flip else window


def test_normalize_matches_the_formula():
    images = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 3, 1, 1)
    expected = [(v / 255 - m) / s for v, m, s in zip((0, 128, 255), CIFAR10_MEAN, CIFAR10_STD)]
    torch.testing.assert_close(normalize(images, CIFAR10_MEAN, CIFAR10_STD).flatten(), torch.tensor(expected))


def test_cifar10_test_batches_yields_the_first_n_normalized(shared_data):
    batches = list(cifar10_test_batches(shared_data, n=300, batch_size=128, source="lossless_subset"))
    assert [len(labels) for _, labels in batches] == [128, 128, 44]
    raw = load_cifar10("test", shared_data, source="lossless_subset")
    torch.testing.assert_close(batches[0][0], normalize(torch.from_numpy(raw.images[:128]), CIFAR10_MEAN, CIFAR10_STD))
    assert batches[0][1][:10].tolist() == FIRST_TEST_LABELS


def test_cifar10_datamodule_batches_and_val_split(shared_data):
    dm = CIFAR10DataModule(shared_data, batch_size=64, num_workers=0, source="lossless_subset", val_split=0.2)
    dm.prepare_data()
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (64, 3, 32, 32) and images.dtype == torch.float32 and labels.dtype == torch.int64
    train, val, test = dm.splits
    assert (len(train), len(val), len(test)) == (4068, 1017, 1017)
    assert not set(train.indices) & set(val.indices)
    assert len(dm.train_dataloader()) == 4068 // 64  # drop_last
    eval_images, eval_labels = next(iter(dm.test_dataloader()))
    assert eval_labels[:10].tolist() == FIRST_TEST_LABELS
    raw = load_cifar10("test", shared_data, source="lossless_subset").images[:64]
    torch.testing.assert_close(eval_images, normalize(torch.from_numpy(raw), CIFAR10_MEAN, CIFAR10_STD))


def test_cifar10_datamodule_validates_on_test_without_val_split(shared_data):
    dm = CIFAR10DataModule(shared_data, num_workers=0, source="lossless_subset")
    with pytest.raises(RuntimeError, match="setup"):
        dm.train_dataloader()
    dm.setup("fit")
    assert dm.splits[1] is dm.splits[2]
    assert dm.num_classes == 10 and dm.input_size == (3, 32, 32)


def test_synthetic_datamodule_is_deterministic_by_seed():
    def first_val_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        dm = SyntheticDataModule(num_classes=5, image_size=16, num_train=16, num_val=8, batch_size=8, seed=seed)
        dm.setup("fit")
        return next(iter(dm.val_dataloader()))

    images, labels = first_val_batch(0)
    assert images.shape == (8, 3, 16, 16) and labels.max() < 5
    torch.testing.assert_close(first_val_batch(0), (images, labels), rtol=0, atol=0)
    assert not torch.equal(first_val_batch(1)[0], images)


def test_image_folder_datamodule_crops_to_image_size(tmp_path):
    write_png_tree(tmp_path)  # train/ and test/
    dm = ImageFolderDataModule(tmp_path, image_size=24, batch_size=2, num_workers=0, val_dir="test")
    assert dm.classes == ("airplane", "cat") and dm.num_classes == 2
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        images, labels = next(iter(loader))
        assert images.shape == (2, 3, 24, 24) and images.dtype == torch.float32
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "val")):
        ImageFolderDataModule(tmp_path)
