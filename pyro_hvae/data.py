"""Image data: data sets held in memory, binarization, splits, batches.

:func:`load_splits` turns a :class:`~pyro_hvae.config.DataConfig` into training,
validation and test sets of image tensors (no labels): ``[1, 28, 28]`` for MNIST
and Fashion-MNIST, ``[3, 32, 32]`` for CIFAR-10 (all three read with torchvision),
``[C, H, W]`` for a user's own image folder or npz file
(:mod:`pyro_hvae.image_files`); float values in [0, 1].

Binarization conventions (``data.binarize``):

* ``dynamic``: every time a training image is used it is a fresh draw
  x ~ Bernoulli(intensity). The validation and test images are drawn once, each
  split from its own :class:`torch.Generator` seeded from ``binarize_seed``, so
  held-out likelihoods are reproducible and comparable between runs.
* ``threshold``: x = 1 where intensity > ``threshold``, in every split.
* ``none``: the 8-bit grey levels k/255.

The validation set is a random subset (``split_seed``) of the training images; the
test images are never used for model selection.

Images are read once into uint8 tensors. :class:`InMemoryLoader` makes batches
by indexing those tensors, which is far faster than collating items one by one
with a :class:`torch.utils.data.DataLoader`.
"""

from __future__ import annotations

import hashlib
import math
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torchvision
from torch.utils.data import Dataset

from pyro_hvae.config import ConfigError, DataConfig
from pyro_hvae.image_files import DataError, DataMissingError, read_image_folder, read_npz

__all__ = [
    "DataError",
    "DataMissingError",
    "ImageDataset",
    "InMemoryLoader",
    "Splits",
    "load_splits",
    "resolve_root",
]

#: Seconds a network read may stall before a download is given up.
DOWNLOAD_TIMEOUT_S = 30.0


def _user_cache_dir() -> Path:
    """This platform's per-user cache folder for pyro-hvae."""
    home = Path.home()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or home / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = home / "Library" / "Caches"
    else:
        xdg = os.environ.get("XDG_CACHE_HOME", "")
        base = Path(xdg) if os.path.isabs(xdg) else home / ".cache"
    return base / "pyro-hvae"


def resolve_root(root: Optional[Path]) -> Path:
    """The data folder: ``root`` if given, else ``$PYRO_HVAE_DATA``, else the user cache.

    The user cache is ``~/.cache/pyro-hvae/data`` on Linux (under
    ``$XDG_CACHE_HOME`` when set), ``~/Library/Caches/pyro-hvae/data`` on macOS
    and ``%LOCALAPPDATA%\\pyro-hvae\\data`` on Windows.
    """
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("PYRO_HVAE_DATA")
    if env:
        return Path(env).expanduser()
    return _user_cache_dir() / "data"


@dataclass(frozen=True)
class _Source:
    """How torchvision stores one data set under the data root."""

    title: str
    reader: Any  # torchvision dataset class
    folder: str  # relative to the root
    files: tuple[str, ...]


_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

_SOURCES = {
    "mnist": _Source("MNIST", torchvision.datasets.MNIST, "MNIST/raw", _IDX_FILES),
    "fashion_mnist": _Source(
        "Fashion-MNIST", torchvision.datasets.FashionMNIST, "FashionMNIST/raw", _IDX_FILES
    ),
    "cifar10": _Source(
        "CIFAR-10",
        torchvision.datasets.CIFAR10,
        "cifar-10-batches-py",
        (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"),
    ),
}


@contextmanager
def _network_timeout(seconds: float) -> Iterator[None]:
    """Bound every socket operation (torchvision's downloads set no timeout)."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _missing(source: _Source, root: Path, reason: str, download: bool) -> DataMissingError:
    """The one error message for data that is not available."""
    folder = root / source.folder
    expected = ", ".join(str(folder / name) for name in source.files)
    fix = (
        "go online and retry, or point data.root (or $PYRO_HVAE_DATA) at a folder "
        f"that already holds {source.folder}/"
        if download
        else f"point data.root (or $PYRO_HVAE_DATA) at a folder that holds "
        f"{source.folder}/, or set data.download: true on a machine that is online"
    )
    return DataMissingError(
        f"{source.title} data not available in {folder} ({reason}); expected files: "
        f"{expected}. Fix: {fix}."
    )


def _as_nchw(data: Any) -> torch.Tensor:
    """torchvision's ``.data`` ([N, H, W] tensor or [N, H, W, C] array) as uint8 NCHW."""
    images = torch.as_tensor(data)
    if images.dim() == 3:
        return images.unsqueeze(1).contiguous()
    return images.permute(0, 3, 1, 2).contiguous()


def _read(source: _Source, root: Path, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The training and test images as uint8 [N, C, H, W] tensors.

    Without ``download`` the files are checked before torchvision is asked, and
    with it a failed download (no network) ends in the same error, quickly.
    """
    if not download:
        absent = [n for n in source.files if not (root / source.folder / n).is_file()]
        if absent:
            raise _missing(source, root, "missing: " + ", ".join(absent), download)
    try:
        with _network_timeout(DOWNLOAD_TIMEOUT_S):
            train = source.reader(str(root), train=True, download=download)
        test = source.reader(str(root), train=False, download=False)
    except (RuntimeError, OSError) as err:
        lines = str(err).strip().splitlines() or [type(err).__name__]
        what = "download failed" if download else "unreadable"
        raise _missing(source, root, f"{what}: {lines[-1].strip()}", download) from err
    return _as_nchw(train.data), _as_nchw(test.data)


class ImageDataset(Dataset):
    """Images held in memory as uint8 ``[N, C, H, W]``, returned as float tensors.

    Stored values are divided by ``levels`` (255 for grey levels, 1 for images
    already binarized to 0/1). With ``dynamic`` each access instead returns a
    Bernoulli draw with those values as probabilities: item access
    (``dataset[i]``) draws from torch's global RNG, so it is reproducible under
    ``pyro.set_rng_seed``; :meth:`batch` draws from the generator it is given.
    ``indices`` are the rows of the torchvision file the images came from.
    """

    def __init__(
        self, images: torch.Tensor, indices: torch.Tensor, levels: int, dynamic: bool
    ):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError("images must be a uint8 tensor of shape [N, C, H, W]")
        self.images = images
        self.indices = indices
        self.levels = levels
        self.dynamic = dynamic

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self._values(self.images[i], None)

    @property
    def data_shape(self) -> tuple[int, ...]:
        """Shape of one image, e.g. ``(1, 28, 28)``."""
        return tuple(self.images.shape[1:])

    def head(self, n: int) -> "ImageDataset":
        """The first ``n`` images, in the order they are stored (file order for the test split)."""
        return ImageDataset(self.images[:n], self.indices[:n], self.levels, self.dynamic)

    def mean(self) -> torch.Tensor:
        """The mean image ``[C, H, W]``: each pixel's mean value (for dynamic binarization,
        the probability of a 1)."""
        return self.images.float().mean(0) / self.levels

    def batch(
        self, index: torch.Tensor, generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        """Images at ``index`` as one float tensor ``[B, C, H, W]``.

        Dynamic binarization draws the whole batch at once from ``generator``
        (torch's global RNG when None).
        """
        # index_select on a flat view is much faster than advanced indexing of
        # the 4-d uint8 tensor.
        rows = self.images.flatten(1).index_select(0, index)
        return self._values(rows.view(-1, *self.data_shape), generator)

    def _values(
        self, stored: torch.Tensor, generator: Optional[torch.Generator]
    ) -> torch.Tensor:
        values = stored.float() / self.levels
        return torch.bernoulli(values, generator=generator) if self.dynamic else values


def derived_seed(seed: int, purpose: str) -> int:
    """A 63-bit seed for one use (``purpose``) of a configured seed: independent streams."""
    digest = hashlib.sha256(f"pyro-hvae:{purpose}:{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def batch_seed(seed: int, batch: int) -> int:
    """The seed of the random draws of evaluation batch number ``batch`` (the validation of
    training and ``pyro-hvae evaluate`` alike): ``seed`` itself for the first, a 32-bit
    seed derived from both for the others. A batch thus draws the same whichever process
    evaluates it."""
    return seed if batch == 0 else derived_seed(seed, f"evaluate batch {batch}") % 2**32


def _generator(seed: int, purpose: str) -> torch.Generator:
    """A CPU generator seeded for ``purpose`` ("split", "val", "test") from ``seed``."""
    return torch.Generator().manual_seed(derived_seed(seed, purpose))


def _fixed(
    images: torch.Tensor, indices: torch.Tensor, cfg: DataConfig, split: str
) -> ImageDataset:
    """A held-out split (or a non-dynamic training set) with pixel values fixed."""
    if cfg.binarize == "none":
        return ImageDataset(images, indices, levels=255, dynamic=False)
    intensity = images.float() / 255
    if cfg.binarize == "threshold":
        binary = intensity > cfg.threshold
    else:
        binary = torch.bernoulli(intensity, generator=_generator(cfg.binarize_seed, split))
    return ImageDataset(binary.to(torch.uint8), indices, levels=1, dynamic=False)


_CONVENTIONS = {
    "dynamic": "training pixels are fresh Bernoulli(intensity) draws at every use; "
    "validation and test pixels drawn once from seeds derived from binarize_seed",
    "threshold": "pixel = 1 where intensity > {threshold}, else 0",
    "none": "8-bit grey levels k/255",
}


@dataclass(frozen=True)
class Splits:
    """Training, validation and test images of one data configuration.

    ``source`` says where the images came from: the data root of a built-in data
    set, or the path, file count or array shapes and content hash of a user's own.
    """

    train: ImageDataset
    val: ImageDataset
    test: ImageDataset
    config: DataConfig
    source: dict[str, Any]

    @property
    def data_shape(self) -> tuple[int, ...]:
        """Shape of one image, e.g. ``(1, 28, 28)``."""
        return self.train.data_shape

    def describe(self) -> dict[str, Any]:
        """Plain description for run folders and result files."""
        cfg = self.config
        return {
            "dataset": cfg.dataset,
            **self.source,
            "data_shape": list(self.data_shape),
            "sizes": {"train": len(self.train), "val": len(self.val), "test": len(self.test)},
            "binarize": cfg.binarize,
            "binarization": _CONVENTIONS[cfg.binarize].format(threshold=cfg.threshold),
            "binarize_seed": cfg.binarize_seed,
            "split_seed": cfg.split_seed,
        }


def _read_images(cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any], str]:
    """Training and test images (uint8 NCHW), their provenance, and a name for messages."""
    if cfg.dataset == "image_folder":
        return (*read_image_folder(cfg), f"the image folder {cfg.path}")
    if cfg.dataset == "npz":
        return (*read_npz(cfg), f"'train' of {cfg.path}")
    root = resolve_root(cfg.root)
    source = _SOURCES[cfg.dataset]
    return (*_read(source, root, cfg.download), {"root": str(root)}, f"{source.title} in {root}")


def load_splits(cfg: DataConfig) -> Splits:
    """Read the data set (downloading a built-in one if allowed) and build the three splits.

    Raises :class:`DataMissingError` when the files are absent and cannot be
    downloaded, :class:`DataError` when a user's own images cannot be used as they
    are, and :class:`~pyro_hvae.config.ConfigError` when ``val_size`` leaves no
    training images.
    """
    train_images, test_images, provenance, title = _read_images(cfg)

    n = train_images.shape[0]
    if cfg.val_size >= n:
        raise ConfigError(
            [
                f"data.val_size: {cfg.val_size} leaves no training images; "
                f"{title} has {n} (use at most {n - 1})"
            ]
        )
    order = torch.randperm(n, generator=_generator(cfg.split_seed, "split"))
    val_idx = order[: cfg.val_size].sort().values
    train_idx = order[cfg.val_size :].sort().values
    test_idx = torch.arange(test_images.shape[0])

    if cfg.binarize == "dynamic":
        train = ImageDataset(train_images[train_idx], train_idx, levels=255, dynamic=True)
    else:
        train = _fixed(train_images[train_idx], train_idx, cfg, "train")
    return Splits(
        train=train,
        val=_fixed(train_images[val_idx], val_idx, cfg, "val"),
        test=_fixed(test_images, test_idx, cfg, "test"),
        config=cfg,
        source=provenance,
    )


class InMemoryLoader:
    """Batches of an :class:`ImageDataset`, by indexing its whole tensor.

    All randomness (the shuffling order and, for dynamically binarized data, the
    Bernoulli draws) comes from one explicit :class:`torch.Generator` seeded with
    ``seed``. :meth:`state_dict` captures that generator together with the
    position in the current epoch, so a loader restored with
    :meth:`load_state_dict` continues with exactly the batches (and pixel draws)
    the original would have produced.

    Iterating yields the rest of the current epoch, or a whole new epoch when
    none is in progress; :meth:`forever` chains epochs for step-based training.

    ``rows`` keeps only those rows of each batch: a process's share of a global batch
    under torchrun. The order and the pixel draws are still those of the whole batch,
    so the processes together see exactly the batches one process would.
    """

    def __init__(
        self,
        dataset: ImageDataset,
        batch_size: int,
        *,
        shuffle: bool,
        drop_last: bool = False,
        seed: int = 0,
        rows: slice = slice(None),
    ):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.rows = rows
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = 0  # epochs started
        self._order: Optional[torch.Tensor] = None
        self._position = 0  # batches of the current epoch already yielded

    def __len__(self) -> int:
        """Batches per epoch."""
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self._order is None or self._position >= len(self):
            self._start_epoch()
        while self._position < len(self):
            start = self._position * self.batch_size
            index = self._order[start : start + self.batch_size]
            self._position += 1
            if self.dataset.dynamic:  # draws the whole batch: the generator's stream stays the same
                yield self.dataset.batch(index, generator=self.generator)[self.rows]
            else:
                yield self.dataset.batch(index[self.rows])

    def forever(self) -> Iterator[torch.Tensor]:
        """Batches of epoch after epoch, without end."""
        if len(self) == 0:
            raise ValueError(
                f"{len(self.dataset)} images make no batch of {self.batch_size}"
                + (" with drop_last" if self.drop_last else "")
            )
        while True:
            yield from self

    def _start_epoch(self) -> None:
        n = len(self.dataset)
        self._order = (
            torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        )
        self._position = 0
        self.epoch += 1

    def state_dict(self) -> dict[str, Any]:
        """Generator state, epoch count and position in the current epoch."""
        return {
            "generator": self.generator.get_state(),
            "epoch": self.epoch,
            "position": self._position,
            "order": None if self._order is None else self._order.clone(),
            "size": len(self.dataset),
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict` of a loader over the same data."""
        if (state["size"], state["batch_size"]) != (len(self.dataset), self.batch_size):
            raise ValueError(
                f"loader state is for {state['size']} images in batches of "
                f"{state['batch_size']}, this loader has {len(self.dataset)} in "
                f"batches of {self.batch_size}"
            )
        self.generator.set_state(state["generator"])
        self.epoch = state["epoch"]
        self._position = state["position"]
        order = state["order"]
        self._order = None if order is None else order.clone()
