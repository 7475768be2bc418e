"""A user's own images: a folder of image files or a NumPy ``.npz`` file.

Both readers return the training and test images as uint8 ``[N, C, H, W]`` tensors
(the layout :mod:`pyro_hvae.data` keeps in memory) together with their provenance:
the path, the file count or array shapes, and a SHA-256 content hash, so that a run
records exactly which images it saw.

* :func:`read_image_folder`: every image file under ``data.path`` (with ``train/``
  and ``test/`` subfolders, or a separate ``data.test_path``), converted to grey or
  RGB and optionally brought to ``data.image_size``. Its hash covers each file's
  relative path and bytes, in sorted order.
* :func:`read_npz`: the arrays ``train`` and ``test`` of ``data.path``, uint8 grey
  levels or floats in [0, 1] (stored as the nearest ``k/255``). Its hash is that of
  the file's bytes.

Every problem is one :class:`DataError` line naming the option and the fix.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from pyro_hvae.config import DataConfig

__all__ = ["DataError", "DataMissingError", "read_image_folder", "read_npz"]

#: PIL modes that hold one grey channel.
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


class DataError(ValueError):
    """Images that cannot be used as they are; the message names the option and the fix."""


class DataMissingError(DataError):
    """The data set's files are not on disk and could not be downloaded."""


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- image folder


def _image_files(folder: Path, key: str) -> list[Path]:
    """The image files under ``folder``, at any depth, in sorted order."""
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise DataMissingError(f"data.{key}: {folder} {what}; point data.{key} at a folder of image files")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
    if not files:
        raise DataMissingError(
            f"data.{key}: no image files ({', '.join(IMG_EXTENSIONS)}) under {folder}; "
            f"point data.{key} at the folder that holds them"
        )
    return files


def _folders(cfg: DataConfig) -> tuple[Path, Path]:
    """The training and test folders ``data.path`` and ``data.test_path`` name."""
    path = Path(cfg.path).expanduser()
    if not path.is_dir():
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise DataMissingError(f"data.path: {path} {what}; point data.path at a folder of images (with train/ and test/ subfolders)")
    split = (path / "train").is_dir() and (path / "test").is_dir()
    if cfg.test_path is not None:
        if split:
            raise DataError(
                f"data.test_path: {path} has train/ and test/ subfolders, so its test images would "
                f"also be trained on; point data.path at {path / 'train'} or drop data.test_path"
            )
        return path, Path(cfg.test_path).expanduser()
    if not split:
        raise DataMissingError(
            f"data.path: {path} has no train/ and test/ subfolders; put the training and test images "
            "in them, or name a separate folder of test images with data.test_path"
        )
    return path / "train", path / "test"


def _open(file: Path) -> Image.Image:
    try:
        with Image.open(file) as image:
            image.load()
            return image
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"data.path: cannot read {file} as an image ({err}); remove it or replace it") from None


def _to_mode(image: Image.Image, channels: int) -> Image.Image:
    """Grey (``L``) or ``RGB``; 16-bit and float grey images are scaled to 8 bits first."""
    if channels == 1 and image.mode in ("I", "I;16", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 1.0 if image.mode == "F" else 65535.0
        return Image.fromarray(np.clip(np.rint(array / top * 255), 0, 255).astype(np.uint8))
    return image.convert("L" if channels == 1 else "RGB")


def _fit(image: Image.Image, cfg: DataConfig) -> Image.Image:
    """``image`` brought to ``data.image_size`` the way ``data.resize`` says."""
    size = cfg.image_hw
    if size is None:
        return image
    if cfg.resize == "resize":
        return F.resize(image, list(size), interpolation=InterpolationMode.BILINEAR, antialias=True)
    height, width = size
    scale = max(height / image.height, width / image.width)
    cover = [max(height, round(image.height * scale)), max(width, round(image.width * scale))]
    image = F.resize(image, cover, interpolation=InterpolationMode.BILINEAR, antialias=True)
    return F.center_crop(image, list(size))


def read_image_folder(cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Training and test images of an image folder as uint8 ``[N, C, H, W]``, and provenance.

    Raises :class:`DataMissingError` for a missing folder or one without images, and
    :class:`DataError` for an unreadable file or images of different sizes without
    ``data.image_size``.
    """
    train_dir, test_dir = _folders(cfg)
    listed = {"train": (train_dir, _image_files(train_dir, "path")),
              "test": (test_dir, _image_files(test_dir, "test_path" if cfg.test_path is not None else "path"))}
    opened = {split: [_open(f) for f in files] for split, (_, files) in listed.items()}
    channels = cfg.channels or (1 if all(i.mode in _GREY_MODES for images in opened.values() for i in images) else 3)

    digest = hashlib.sha256()
    tensors: dict[str, torch.Tensor] = {}
    first: Optional[tuple[Path, tuple[int, int]]] = None
    for split, (folder, files) in listed.items():
        arrays = []
        for file, image in zip(files, opened[split]):
            digest.update(f"{split}/{file.relative_to(folder).as_posix()}\0".encode())
            digest.update(file.read_bytes())
            image = _fit(_to_mode(image, channels), cfg)
            if first is None:
                first = (file, image.size)
            elif image.size != first[1]:
                raise DataError(
                    f"data.image_size: images differ in size ({first[0]} is {first[1][0]}x{first[1][1]}, "
                    f"{file} is {image.size[0]}x{image.size[1]}, width x height); set data.image_size "
                    "(e.g. 28 or [H, W]) with data.resize: resize or center_crop"
                )
            arrays.append(np.asarray(image, dtype=np.uint8).reshape(image.height, image.width, channels))
        tensors[split] = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    provenance = {
        "path": str(Path(cfg.path).expanduser()),
        "test_path": None if cfg.test_path is None else str(test_dir),
        "files": {split: len(files) for split, (_, files) in listed.items()},
        "channels": channels,
        "image_size": None if cfg.image_hw is None else list(cfg.image_hw),
        "resize": cfg.resize,
        "sha256": digest.hexdigest(),
    }
    return tensors["train"], tensors["test"], provenance


# ------------------------------------------------------------------------ npz


def _nchw(array: np.ndarray, key: str, path: Path) -> np.ndarray:
    """``[N, H, W]``, ``[N, C, H, W]`` or ``[N, H, W, C]`` (C = 1 or 3) as ``[N, C, H, W]``."""
    shape = "[" + ", ".join(map(str, array.shape)) + "]"
    if array.ndim == 3:
        return array[:, None]
    if array.ndim == 4:
        first, last = array.shape[1] in (1, 3), array.shape[3] in (1, 3)
        if first and last:
            raise DataError(
                f"data.path: array '{key}' of {path} has shape {shape}, which reads as [N, C, H, W] and as "
                "[N, H, W, C]; store grey images as [N, H, W], or images wider and taller than 3 pixels"
            )
        if first:
            return array
        if last:
            return array.transpose(0, 3, 1, 2)
    raise DataError(
        f"data.path: array '{key}' of {path} has shape {shape}; store images as [N, H, W] (grey), "
        "[N, C, H, W] or [N, H, W, C] with C = 1 or 3"
    )


def _levels(array: np.ndarray, key: str, path: Path) -> np.ndarray:
    """uint8 grey levels; floats in [0, 1] become the nearest ``k/255``."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        finite = array[np.isfinite(array)]
        if finite.size < array.size or (finite.size and (finite.min() < 0 or finite.max() > 1)):
            seen = f"min {finite.min():g}, max {finite.max():g}" if finite.size else "no finite value"
            raise DataError(
                f"data.path: array '{key}' of {path} holds floats outside [0, 1] ({seen}"
                f"{', with NaN or inf' if finite.size < array.size else ''}); divide 8-bit values by 255 "
                "or store them as uint8"
            )
        return np.rint(array * 255).astype(np.uint8)
    raise DataError(
        f"data.path: array '{key}' of {path} has dtype {array.dtype}; store uint8 grey levels 0..255 or "
        "floats in [0, 1] (e.g. array.astype(numpy.uint8))"
    )


def read_npz(cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """The arrays ``train`` and ``test`` of ``data.path`` as uint8 ``[N, C, H, W]``, and provenance.

    Raises :class:`DataMissingError` for a missing file and :class:`DataError` for a
    file that is not an npz, lacks a key, or holds an array of another dtype, range
    or layout.
    """
    path = Path(cfg.path).expanduser()
    if not path.is_file():
        what = "is a folder, not a file" if path.exists() else "does not exist"
        raise DataMissingError(f"data.path: {path} {what}; point data.path at a .npz file written by numpy.savez(path, train=..., test=...)")
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise DataError(f"data.path: cannot read {path} as an .npz file ({err}); write it with numpy.savez(path, train=..., test=...)") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"data.path: {path} holds a single array, not an .npz archive; save it with numpy.savez(path, train=..., test=...)")
    with archive:
        keys = list(archive.keys())
        absent = [k for k in ("train", "test") if k not in keys]
        if absent:
            raise DataError(
                f"data.path: {path} holds the arrays {', '.join(keys) or '(none)'} but not "
                f"{' and '.join(absent)}; save it with numpy.savez(path, train=..., test=...)"
            )
        try:
            raw = {key: archive[key] for key in ("train", "test")}
        except (ValueError, OSError, zipfile.BadZipFile) as err:
            raise DataError(f"data.path: cannot read the arrays of {path} ({err}); write it with numpy.savez(path, train=..., test=...)") from None
    arrays = {key: _nchw(_levels(value, key, path), key, path) for key, value in raw.items()}
    if arrays["train"].shape[1:] != arrays["test"].shape[1:]:
        raise DataError(
            f"data.path: the images of 'train' are {list(arrays['train'].shape[1:])} and those of 'test' "
            f"{list(arrays['test'].shape[1:])} ([C, H, W]) in {path}; store both splits at one size"
        )
    provenance = {
        "path": str(path),
        "arrays": {key: {"shape": list(value.shape), "dtype": str(value.dtype)} for key, value in raw.items()},
        "sha256": _sha256_file(path),
    }
    train, test = (torch.from_numpy(np.ascontiguousarray(arrays[k])) for k in ("train", "test"))
    return train, test, provenance
