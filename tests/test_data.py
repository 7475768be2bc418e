"""Tests of data loading, splits, binarization conventions and the batch loader.

They read the real MNIST files under ``../shared/data`` (relative to the
repository; ``$PYRO_HVAE_DATA`` overrides it) and are skipped only when that
folder is absent.
"""

import os
import sys
import time
from pathlib import Path

import pytest
import torch
import torchvision

from pyro_hvae.config import ConfigError, DataConfig
from pyro_hvae.data import (
    DataMissingError,
    ImageDataset,
    InMemoryLoader,
    load_splits,
    resolve_root,
)

DATA_ROOT = Path(
    os.environ.get("PYRO_HVAE_DATA")
    or Path(__file__).resolve().parents[2] / "shared" / "data"
)


@pytest.fixture(scope="module")
def root() -> Path:
    if not (DATA_ROOT / "MNIST" / "raw").is_dir():
        pytest.skip(f"no MNIST data under {DATA_ROOT}")
    return DATA_ROOT


@pytest.fixture(scope="module")
def raw(root):
    """The MNIST files as torchvision reads them: (train, test) uint8 [N, 28, 28]."""
    return tuple(
        torchvision.datasets.MNIST(str(root), train=t, download=False).data
        for t in (True, False)
    )


@pytest.fixture(scope="module")
def splits(root):
    return load_splits(DataConfig(root=root, download=False))


def config(root, **options) -> DataConfig:
    return DataConfig(root=root, download=False, **options)


# --- splits -----------------------------------------------------------------


def test_mnist_sizes_shapes_and_description(splits, root):
    assert (len(splits.train), len(splits.val), len(splits.test)) == (4500, 500, 10000)
    assert splits.data_shape == (1, 28, 28)
    for dataset in (splits.train, splits.val, splits.test):
        x = dataset[0]
        assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    info = splits.describe()
    assert info["dataset"] == "mnist" and info["root"] == str(root)
    assert info["sizes"] == {"train": 4500, "val": 500, "test": 10000}
    assert info["binarize"] == "dynamic" and "Bernoulli" in info["binarization"]
    assert (info["binarize_seed"], info["split_seed"]) == (0, 0)


def test_val_is_carved_from_train_not_test(splits, raw, root):
    train_idx, val_idx = set(splits.train.indices.tolist()), set(splits.val.indices.tolist())
    assert not train_idx & val_idx
    assert train_idx | val_idx == set(range(5000))
    assert torch.equal(splits.test.indices, torch.arange(10000))
    grey = load_splits(config(root, binarize="none"))
    assert torch.equal(grey.val.images[:, 0], raw[0][grey.val.indices])
    assert torch.equal(grey.train.images[:, 0], raw[0][grey.train.indices])
    assert torch.equal(grey.test.images[:, 0], raw[1])


def test_split_seed_and_val_size(root, splits):
    same = load_splits(config(root))
    assert torch.equal(same.val.indices, splits.val.indices)
    other = load_splits(config(root, split_seed=1))
    assert not torch.equal(other.val.indices, splits.val.indices)
    smaller = load_splits(config(root, val_size=100))
    assert (len(smaller.train), len(smaller.val)) == (4900, 100)
    none = load_splits(config(root, val_size=0))
    assert (len(none.train), len(none.val)) == (5000, 0)


def test_val_size_must_leave_training_images(root):
    with pytest.raises(ConfigError, match=r"data.val_size: 5000 leaves no training images"):
        load_splits(config(root, val_size=5000))


# --- binarization -----------------------------------------------------------


def test_held_out_binarization_is_fixed_by_binarize_seed(root, splits):
    again = load_splits(config(root))
    assert torch.equal(again.test.images, splits.test.images)
    assert torch.equal(again.val.images, splits.val.images)
    # The test draw does not depend on how the training file is split.
    resplit = load_splits(config(root, split_seed=3, val_size=50))
    assert torch.equal(resplit.test.images, splits.test.images)
    reseeded = load_splits(config(root, binarize_seed=1))
    assert not torch.equal(reseeded.test.images, splits.test.images)
    assert not torch.equal(reseeded.val.images, splits.val.images)
    # Held-out images are the same tensor at every access.
    assert torch.equal(splits.test[5], splits.test[5])


def test_dynamic_values_are_binary_draws_of_the_intensities(splits, raw):
    for dataset in (splits.val, splits.test):
        assert set(dataset.images.unique().tolist()) <= {0, 1}
    x = torch.stack([splits.train[i] for i in range(200)])
    assert set(x.unique().tolist()) == {0.0, 1.0}
    intensity = raw[0][splits.train.indices[:200]].float().unsqueeze(1) / 255
    assert torch.all(x[intensity == 0] == 0) and torch.all(x[intensity == 1] == 1)
    # Test pixels are Bernoulli(intensity): their mean matches the mean intensity.
    assert float(splits.test.images.float().mean()) == pytest.approx(
        float(raw[1].float().mean()) / 255, abs=2e-3
    )


def test_dynamic_training_images_are_redrawn(splits):
    first = splits.train[0]
    assert not torch.equal(first, splits.train[0])
    torch.manual_seed(11)
    a = splits.train[3]
    torch.manual_seed(11)
    assert torch.equal(a, splits.train[3])
    loader = InMemoryLoader(splits.train, 500, shuffle=False)
    epoch1, epoch2 = list(loader), list(loader)
    assert len(epoch1) == len(epoch2) == 9
    assert not torch.equal(epoch1[0], epoch2[0])
    assert set(epoch1[0].unique().tolist()) == {0.0, 1.0}


def test_threshold_convention(root, raw):
    s = load_splits(config(root, binarize="threshold", threshold=0.3))
    assert s.describe()["binarization"] == "pixel = 1 where intensity > 0.3, else 0"
    pairs = (
        (s.train, raw[0][s.train.indices]),
        (s.val, raw[0][s.val.indices]),
        (s.test, raw[1]),
    )
    for dataset, images in pairs:
        expected = (images.float() / 255 > 0.3).float().unsqueeze(1)
        got = dataset.batch(torch.arange(len(dataset)))
        assert torch.equal(got, expected)
    assert torch.equal(s.train[0], s.train[0])


def test_no_binarization_gives_grey_levels(root, raw):
    s = load_splits(config(root, binarize="none"))
    x = s.test.batch(torch.arange(100))
    assert torch.equal(x, raw[1][:100].float().unsqueeze(1) / 255)
    assert torch.allclose(x * 255, (x * 255).round(), atol=1e-4)  # on the k/255 grid
    assert len(x.unique()) > 2 and x.min() >= 0 and x.max() <= 1
    assert s.train[0].dtype == torch.float32


# --- missing data -----------------------------------------------------------


def assert_names_folder_and_files(message: str, tmp_path: Path):
    folder = tmp_path / "MNIST" / "raw"
    assert f"in {folder} (" in message
    for name in ("train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        assert str(folder / name) in message
    assert "data.root" in message and "PYRO_HVAE_DATA" in message
    assert "\n" not in message


def test_missing_folder_without_download(tmp_path):
    with pytest.raises(DataMissingError) as info:
        load_splits(DataConfig(root=tmp_path, download=False))
    message = str(info.value)
    assert_names_folder_and_files(message, tmp_path)
    assert "data.download: true" in message
    assert not (tmp_path / "MNIST").exists()  # nothing was fetched or created


def test_failed_download_fails_fast_with_the_same_message(tmp_path, monkeypatch):
    # An unreachable mirror makes the outcome the same whether or not this
    # machine is online: the download fails at once.
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])
    start = time.monotonic()
    with pytest.raises(DataMissingError) as info:
        load_splits(DataConfig(root=tmp_path, download=True))
    assert time.monotonic() - start < 30
    message = str(info.value)
    assert_names_folder_and_files(message, tmp_path)
    assert "download failed" in message


def test_missing_cifar10_lists_its_batches(tmp_path):
    cfg = DataConfig(dataset="cifar10", binarize="none", root=tmp_path, download=False)
    with pytest.raises(DataMissingError) as info:
        load_splits(cfg)
    folder = tmp_path / "cifar-10-batches-py"
    for name in ("data_batch_1", "data_batch_5", "test_batch", "batches.meta"):
        assert str(folder / name) in str(info.value)


def test_resolve_root(tmp_path, monkeypatch):
    monkeypatch.setenv("PYRO_HVAE_DATA", str(tmp_path / "env"))
    assert resolve_root(tmp_path / "given") == tmp_path / "given"
    assert resolve_root(None) == tmp_path / "env"
    monkeypatch.delenv("PYRO_HVAE_DATA")
    if sys.platform.startswith("linux"):
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
        assert resolve_root(None) == tmp_path / "cache" / "pyro-hvae" / "data"
        monkeypatch.delenv("XDG_CACHE_HOME")
        assert resolve_root(None) == Path.home() / ".cache" / "pyro-hvae" / "data"


# --- the in-memory loader ---------------------------------------------------


def numbered(n: int) -> ImageDataset:
    """n grey images whose every pixel holds the image's number."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2)
    return ImageDataset(images.contiguous(), torch.arange(n), levels=255, dynamic=False)


def ids(batch: torch.Tensor) -> list[int]:
    return (batch[:, 0, 0, 0] * 255).round().long().tolist()


def test_loader_epochs_cover_every_image_once():
    loader = InMemoryLoader(numbered(10), 4, shuffle=True, seed=1)
    assert len(loader) == 3
    batches = list(loader)
    assert [len(b) for b in batches] == [4, 4, 2]
    assert batches[0].shape == (4, 1, 2, 2)
    first = [i for b in batches for i in ids(b)]
    assert sorted(first) == list(range(10)) and first != list(range(10))
    second = [i for b in loader for i in ids(b)]
    assert sorted(second) == list(range(10)) and second != first
    assert loader.epoch == 2
    in_order = InMemoryLoader(numbered(10), 4, shuffle=False, drop_last=True)
    assert len(in_order) == 2
    assert [ids(b) for b in in_order] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_loader_order_depends_on_its_seed_only():
    orders = []
    for seed, global_seed in ((0, 1), (0, 2), (1, 1)):
        torch.manual_seed(global_seed)
        loader = InMemoryLoader(numbered(10), 5, shuffle=True, seed=seed)
        orders.append([ids(b) for b in loader])
    assert orders[0] == orders[1] and orders[0] != orders[2]


def test_loader_forever_crosses_epochs():
    stream = InMemoryLoader(numbered(5), 2, shuffle=False).forever()
    assert [ids(next(stream)) for _ in range(4)] == [[0, 1], [2, 3], [4], [0, 1]]
    with pytest.raises(ValueError, match="no batch"):
        next(InMemoryLoader(numbered(3), 4, shuffle=True, drop_last=True).forever())


def take(stream, n):
    return [next(stream) for _ in range(n)]


@pytest.mark.parametrize("consumed", [0, 3, 5])
def test_loader_state_restores_the_batch_sequence(splits, consumed):
    """A restored loader continues with the same batches and the same pixel draws."""
    train = splits.train
    dynamic = ImageDataset(train.images[:300], train.indices[:300], levels=255, dynamic=True)
    original = InMemoryLoader(dynamic, 64, shuffle=True, seed=5)
    stream = original.forever()
    take(stream, consumed)
    state = original.state_dict()
    expected = take(stream, 8)  # crosses an epoch boundary (5 batches an epoch)

    resumed = InMemoryLoader(dynamic, 64, shuffle=True, seed=123)
    resumed.load_state_dict(state)
    torch.manual_seed(99)  # the global RNG plays no part
    got = take(resumed.forever(), 8)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    assert resumed.epoch == original.epoch
    assert set(got[0].unique().tolist()) == {0.0, 1.0}


def test_loader_state_must_match_the_data(splits):
    state = InMemoryLoader(splits.val, 100, shuffle=True).state_dict()
    with pytest.raises(ValueError, match="loader state is for 500 images"):
        InMemoryLoader(splits.test, 100, shuffle=True).load_state_dict(state)
