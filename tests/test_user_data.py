"""A user's own images: ``data.dataset: image_folder`` and ``data.dataset: npz``.

Small synthetic PNG folders and npz files are written to ``tmp_path``; every bad input
must end in one clear line naming the option.
"""

import hashlib
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from pyro_hvae.cli import main
from pyro_hvae.config import ConfigError, DataConfig, load_config
from pyro_hvae.data import DataError, DataMissingError, load_splits
from pyro_hvae.run import read_metrics


def grey(seed: int, n: int, height: int = 6, width: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, height, width), dtype=np.uint8)


def save_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def write_pngs(folder, images: np.ndarray, mode: str | None = None) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, image in enumerate(images):
        files.append(folder / f"{i:03d}.png")
        Image.fromarray(image, mode).save(files[-1])
    return files


def npz_config(path, **options) -> DataConfig:
    return DataConfig(dataset="npz", path=path, **{"val_size": 3, **options})


def folder_config(path, **options) -> DataConfig:
    return DataConfig(dataset="image_folder", path=path, **{"val_size": 3, **options})


def single_line(error: Exception) -> str:
    text = str(error)
    assert "\n" not in text and text
    return text


# --- npz ------------------------------------------------------------------------


def test_npz_grey_levels_splits_and_provenance(tmp_path):
    train, test = grey(0, 20), grey(1, 7)
    path = save_npz(tmp_path / "digits.npz", train=train, test=test, labels=np.arange(20))
    splits = load_splits(npz_config(path, binarize="none"))
    assert splits.data_shape == (1, 6, 5)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (17, 3, 7)
    # the validation images are carved out of 'train', and every value is k/255
    rebuilt = torch.zeros(20, 1, 6, 5)
    rebuilt[splits.train.indices] = splits.train.batch(torch.arange(17))
    rebuilt[splits.val.indices] = splits.val.batch(torch.arange(3))
    torch.testing.assert_close(rebuilt, torch.from_numpy(train).float().unsqueeze(1) / 255)
    torch.testing.assert_close(splits.test.batch(torch.arange(7)), torch.from_numpy(test).float().unsqueeze(1) / 255)
    info = splits.describe()
    assert info["dataset"] == "npz" and info["path"] == str(path)
    assert info["arrays"] == {"train": {"shape": [20, 6, 5], "dtype": "uint8"}, "test": {"shape": [7, 6, 5], "dtype": "uint8"}}
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info["sizes"] == {"train": 17, "val": 3, "test": 7} and info["data_shape"] == [1, 6, 5]


def test_npz_channel_layouts_and_floats_give_the_same_images(tmp_path):
    rgb = np.random.default_rng(2).integers(0, 256, size=(10, 3, 4, 5), dtype=np.uint8)
    first = save_npz(tmp_path / "nchw.npz", train=rgb, test=rgb[:2])
    last = save_npz(tmp_path / "nhwc.npz", train=rgb.transpose(0, 2, 3, 1), test=rgb[:2].transpose(0, 2, 3, 1))
    floats = save_npz(tmp_path / "floats.npz", train=rgb / 255.0, test=(rgb[:2] / 255.0).astype(np.float32))
    loaded = [load_splits(npz_config(p, binarize="none")) for p in (first, last, floats)]
    assert all(s.data_shape == (3, 4, 5) for s in loaded)
    for other in loaded[1:]:
        assert torch.equal(other.train.images, loaded[0].train.images)
        assert torch.equal(other.test.images, loaded[0].test.images)
    # floats between levels are stored as the nearest k/255
    odd = save_npz(tmp_path / "odd.npz", train=np.full((5, 2, 2), 0.5016), test=np.zeros((1, 2, 2)))
    assert load_splits(npz_config(odd, val_size=0, binarize="none")).train[0].unique().item() == pytest.approx(128 / 255)


def test_npz_binarization_conventions(tmp_path):
    train, test = grey(3, 30, 8, 8), grey(4, 10, 8, 8)
    path = save_npz(tmp_path / "d.npz", train=train, test=test)
    threshold = load_splits(npz_config(path, binarize="threshold", threshold=0.25))
    expected = (torch.from_numpy(test).float() / 255 > 0.25).float().unsqueeze(1)
    assert torch.equal(threshold.test.batch(torch.arange(10)), expected)
    dynamic = load_splits(npz_config(path))
    a, b = dynamic.train.batch(torch.arange(27)), dynamic.train.batch(torch.arange(27))
    assert set(a.unique().tolist()) == {0.0, 1.0} and not torch.equal(a, b)  # fresh draws at every use
    held_out = dynamic.test.batch(torch.arange(10))
    assert set(held_out.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(held_out, load_splits(npz_config(path)).test.batch(torch.arange(10)))  # drawn once, seeded


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"images": np.zeros((4, 3, 3), np.uint8)}, "holds the arrays images but not train and test; save it with numpy.savez"),
        ({"train": np.zeros((4, 3, 3), np.uint8)}, "but not test;"),
        ({"train": np.zeros((4, 3, 3), np.int64), "test": np.zeros((1, 3, 3), np.uint8)}, "has dtype int64; store uint8 grey levels 0..255 or floats in [0, 1]"),
        ({"train": np.full((4, 3, 3), 255.0), "test": np.zeros((1, 3, 3))}, "holds floats outside [0, 1] (min 255, max 255)"),
        ({"train": np.full((4, 3, 3), np.nan), "test": np.zeros((1, 3, 3))}, "with NaN or inf"),
        ({"train": np.zeros((4, 3, 5, 3), np.uint8), "test": np.zeros((1, 3, 5, 3), np.uint8)}, "reads as [N, C, H, W] and as [N, H, W, C]"),
        ({"train": np.zeros((4, 2, 5, 5), np.uint8), "test": np.zeros((1, 2, 5, 5), np.uint8)}, "has shape [4, 2, 5, 5]; store images as"),
        ({"train": np.zeros((4, 9), np.uint8), "test": np.zeros((1, 9), np.uint8)}, "has shape [4, 9]"),
        ({"train": np.zeros((4, 5, 5), np.uint8), "test": np.zeros((1, 6, 5), np.uint8)}, "store both splits at one size"),
    ],
)
def test_bad_npz_is_one_line_naming_data_path(tmp_path, arrays, message):
    path = save_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError) as caught:
        load_splits(npz_config(path, val_size=0))
    line = single_line(caught.value)
    assert line.startswith("data.path: ") and message in line, line


def test_missing_or_foreign_npz(tmp_path):
    with pytest.raises(DataMissingError) as caught:
        load_splits(npz_config(tmp_path / "absent.npz"))
    assert single_line(caught.value).startswith(f"data.path: {tmp_path / 'absent.npz'} does not exist; point data.path at")
    np.save(tmp_path / "one.npy", np.zeros((3, 2, 2), np.uint8))
    with pytest.raises(DataError, match="holds a single array, not an .npz archive"):
        load_splits(npz_config(tmp_path / "one.npy"))
    (tmp_path / "text.npz").write_text("not an archive")
    with pytest.raises(DataError) as caught:
        load_splits(npz_config(tmp_path / "text.npz"))
    assert single_line(caught.value).startswith(f"data.path: cannot read {tmp_path / 'text.npz'} as an .npz file")


def test_val_size_larger_than_the_training_array(tmp_path):
    path = save_npz(tmp_path / "small.npz", train=grey(0, 4), test=grey(1, 2))
    with pytest.raises(ConfigError, match=r"data.val_size: 4 leaves no training images; 'train' of .*small.npz has 4 \(use at most 3\)"):
        load_splits(npz_config(path, val_size=4))


# --- image folders --------------------------------------------------------------


def test_image_folder_with_class_subfolders_reads_exact_pixels(tmp_path):
    train = grey(5, 8)
    write_pngs(tmp_path / "data" / "train" / "cats", train[:5])
    write_pngs(tmp_path / "data" / "train" / "dogs", train[5:])
    write_pngs(tmp_path / "data" / "test", grey(6, 3))  # no class folder: also fine
    splits = load_splits(folder_config(tmp_path / "data", binarize="none"))
    assert splits.data_shape == (1, 6, 5)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (5, 3, 3)
    stored = torch.cat([splits.train.images, splits.val.images])[torch.cat([splits.train.indices, splits.val.indices]).argsort()]
    assert torch.equal(stored[:, 0], torch.from_numpy(train))  # sorted order: cats/000..004, dogs/000..002
    info = splits.describe()
    assert info["dataset"] == "image_folder" and info["path"] == str(tmp_path / "data")
    assert info["files"] == {"train": 8, "test": 3} and info["channels"] == 1 and info["test_path"] is None
    assert len(info["sha256"]) == 64


def test_image_folder_hash_follows_the_content(tmp_path):
    files = write_pngs(tmp_path / "d" / "train", grey(0, 6))
    write_pngs(tmp_path / "d" / "test", grey(1, 2))
    before = load_splits(folder_config(tmp_path / "d")).describe()["sha256"]
    assert load_splits(folder_config(tmp_path / "d")).describe()["sha256"] == before
    Image.fromarray(grey(9, 1)[0]).save(files[0])
    assert load_splits(folder_config(tmp_path / "d")).describe()["sha256"] != before


def test_image_folder_channels(tmp_path):
    rgb = np.random.default_rng(7).integers(0, 256, size=(6, 4, 4, 3), dtype=np.uint8)
    write_pngs(tmp_path / "c" / "train", rgb)
    write_pngs(tmp_path / "c" / "test", rgb[:2])
    colour = load_splits(folder_config(tmp_path / "c", binarize="none"))
    assert colour.data_shape == (3, 4, 4) and colour.describe()["channels"] == 3
    as_grey = load_splits(folder_config(tmp_path / "c", binarize="none", channels=1))
    expected = np.array(Image.fromarray(rgb[0]).convert("L"))
    assert as_grey.data_shape == (1, 4, 4)
    assert torch.equal(as_grey.test.images[0, 0], torch.from_numpy(expected))
    write_pngs(tmp_path / "g" / "train", grey(0, 6, 4, 4))
    write_pngs(tmp_path / "g" / "test", grey(1, 2, 4, 4))
    grey_as_rgb = load_splits(folder_config(tmp_path / "g", binarize="none", channels=3))
    images = grey_as_rgb.test.images
    assert images.shape == (2, 3, 4, 4) and torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])


def test_image_folder_resize_and_center_crop(tmp_path):
    # 10 high, 20 wide: left half black, right half white
    image = np.zeros((1, 10, 20), np.uint8)
    image[:, :, 10:] = 255
    write_pngs(tmp_path / "w" / "train", np.repeat(image, 4, axis=0))
    write_pngs(tmp_path / "w" / "test", image)
    crop = load_splits(folder_config(tmp_path / "w", val_size=0, binarize="none", image_size=10, resize="center_crop"))
    row = crop.test.images[0, 0, 5]
    assert crop.data_shape == (1, 10, 10) and row.tolist() == [0] * 5 + [255] * 5  # the centre, not squeezed
    squeezed = load_splits(folder_config(tmp_path / "w", val_size=0, binarize="none", image_size=[5, 8], resize="resize"))
    row = squeezed.test.images[0, 0, 2]
    assert squeezed.data_shape == (1, 5, 8) and row[:3].tolist() == [0] * 3 and row[-3:].tolist() == [255] * 3
    assert squeezed.describe()["image_size"] == [5, 8] and squeezed.describe()["resize"] == "resize"


def test_image_folder_with_a_separate_test_folder(tmp_path):
    write_pngs(tmp_path / "mine", grey(0, 7))
    write_pngs(tmp_path / "held_out", grey(1, 2))
    splits = load_splits(folder_config(tmp_path / "mine", test_path=tmp_path / "held_out"))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (4, 3, 2)
    assert splits.describe()["test_path"] == str(tmp_path / "held_out")


def test_bad_image_folders_are_one_line_each(tmp_path):
    def error(cfg, kind=DataError):
        with pytest.raises(kind) as caught:
            load_splits(cfg)
        return single_line(caught.value)

    assert error(folder_config(tmp_path / "nowhere"), DataMissingError).startswith(
        f"data.path: {tmp_path / 'nowhere'} does not exist; point data.path at a folder of images"
    )
    write_pngs(tmp_path / "flat", grey(0, 5))
    assert "has no train/ and test/ subfolders; put the training and test images in them, or name a separate folder " \
        "of test images with data.test_path" in error(folder_config(tmp_path / "flat"), DataMissingError)
    write_pngs(tmp_path / "both" / "train", grey(0, 5))
    write_pngs(tmp_path / "both" / "test", grey(0, 2))
    assert error(folder_config(tmp_path / "both", test_path=tmp_path / "flat")).startswith(
        "data.test_path: " + str(tmp_path / "both") + " has train/ and test/ subfolders"
    )
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "test").mkdir()
    (tmp_path / "empty" / "train" / "notes.txt").write_text("no images here")
    assert "data.path: no image files (.jpg" in error(folder_config(tmp_path / "empty"), DataMissingError)
    assert error(folder_config(tmp_path / "flat", test_path=tmp_path / "gone"), DataMissingError).startswith("data.test_path: ")
    write_pngs(tmp_path / "broken" / "train", grey(0, 5))
    write_pngs(tmp_path / "broken" / "test", grey(0, 2))
    (tmp_path / "broken" / "train" / "zzz.png").write_bytes(b"not a png")
    assert f"cannot read {tmp_path / 'broken' / 'train' / 'zzz.png'} as an image" in error(folder_config(tmp_path / "broken"))
    write_pngs(tmp_path / "mixed" / "train", grey(0, 5, 6, 5))
    write_pngs(tmp_path / "mixed" / "test", grey(0, 2, 7, 5))
    line = error(folder_config(tmp_path / "mixed"))
    assert line.startswith("data.image_size: images differ in size") and "is 5x7, width x height" in line
    assert "set data.image_size (e.g. 28 or [H, W]) with data.resize: resize or center_crop" in line
    fixed = load_splits(folder_config(tmp_path / "mixed", image_size=6, resize="resize"))
    assert fixed.data_shape == (1, 6, 6)


# --- config -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.dataset=npz"], "data.path: data.dataset 'npz' needs data.path: set it to a .npz file"),
        (["data.dataset=image_folder"], "data.path: data.dataset 'image_folder' needs data.path: set it to a folder of images"),
        (["data.path=x.npz"], "data.path: data.path applies to data.dataset image_folder and npz only, and data.dataset is 'mnist'"),
        (["data.dataset=npz", "data.path=x.npz", "data.image_size=28"], "data.image_size: data.image_size applies to data.dataset image_folder only"),
        (["data.dataset=npz", "data.path=x.npz", "data.channels=1"], "data.channels: data.channels applies to data.dataset image_folder only"),
        (["data.dataset=npz", "data.path=x.npz", "data.test_path=y"], "data.test_path: data.test_path applies to data.dataset image_folder only"),
        (["data.dataset=npz", "data.path=x.npz", "data.root=/data"], "data.root: data.root applies to the built-in data sets only"),
        (["data.dataset=image_folder", "data.path=d", "data.resize=resize"], "data.image_size: data.resize needs data.image_size"),
        (["data.dataset=image_folder", "data.path=d", "data.image_size=[4,5]"], "data.resize: data.image_size needs data.resize"),
        (["data.dataset=image_folder", "data.path=d", "data.channels=2"], "data.channels: Input should be 1 or 3"),
    ],
)
def test_options_that_do_not_fit_the_dataset_are_config_errors(overrides, message):
    with pytest.raises(ConfigError) as caught:
        load_config(None, overrides)
    assert len(caught.value.errors) == 1 and caught.value.errors[0].startswith(message), caught.value.errors


# --- command line -----------------------------------------------------------------


def test_cli_trains_a_few_steps_on_an_npz_file(tmp_path):
    rng = np.random.default_rng(0)
    strokes = (rng.random((64, 8, 8)) < 0.3).astype(np.float32)  # binary floats in [0, 1]
    path = save_npz(tmp_path / "mine.npz", train=strokes, test=strokes[:10])
    config = tmp_path / "mine.yaml"
    config.write_text(
        f"name: mine\ndevice: cpu\ndata:\n  dataset: npz\n  path: {path}\n  val_size: 16\n  batch_size: 16\n"
        "  eval_batch_size: 16\nmodel:\n  latent_dims: [4, 2]\n  hidden_dims: [16]\n"
        "train:\n  steps: 6\n  log_every: 3\n  eval_every: 6\n  checkpoint_every: 6\noptim:\n  warmup_steps: 2\n"
    )
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", str(config), "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["step"] == 6
    data = json.loads((out / "run.json").read_text())["data"]
    assert data["dataset"] == "npz" and data["data_shape"] == [1, 8, 8]
    assert data["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert data["sizes"] == {"train": 48, "val": 16, "test": 10}
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"] == [3, 6]
    assert torch.load(out / "last.pt", weights_only=True)["data"]["sha256"] == data["sha256"]

    # the same command on a file with a wrong key: one error line, exit 2, nothing written
    save_npz(path, images=strokes)
    result = CliRunner().invoke(main, ["train", str(config), "--out", str(tmp_path / "other")], catch_exceptions=False)
    assert result.exit_code == 2
    assert result.output.count("error: ") == 1 and "error: data.path: " in result.output
    assert not (tmp_path / "other").exists()
