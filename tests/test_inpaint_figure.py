"""bench/inpaint_figure.py draws methods run on the same images and refuses mismatched ones."""

import sys
from pathlib import Path

import numpy as np
import pytest
from benches import load_bench


@pytest.fixture(scope="module")
def inpaint_figure():
    return load_bench("inpaint_figure")


def write_result(folder: Path, index) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    original = (rng.random((len(index), 1, 6, 6)) < 0.5).astype(np.float32)
    mask = np.ones((1, 6, 6), dtype=bool)
    mask[:, 2:4, 2:4] = False
    np.savez(folder / "inpaint.npz", original=original, mask=mask, index=np.array(index),
             predictive_mean=np.where(mask, original, 0.3), filled=original)
    return folder


def test_strip_puts_images_side_by_side_with_a_grey_gap(inpaint_figure):
    images = np.stack([np.zeros((1, 2, 2)), np.ones((1, 2, 2))])
    assert inpaint_figure.strip(images).tolist() == [[0, 0, 0.5, 1, 1], [0, 0, 0.5, 1, 1]]


def test_main_draws_methods_on_the_same_images(tmp_path, inpaint_figure, monkeypatch):
    a, b = write_result(tmp_path / "a", [0, 1, 2]), write_result(tmp_path / "b", [0, 1, 2])
    out = tmp_path / "figure.png"
    monkeypatch.setattr(sys, "argv", ["inpaint_figure.py", f"A={a}", f"B={b}", "--out", str(out)])
    inpaint_figure.main()
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_main_refuses_results_on_other_images(tmp_path, inpaint_figure, monkeypatch):
    a, b = write_result(tmp_path / "a", [0, 1, 2]), write_result(tmp_path / "b", [3, 4, 5])
    monkeypatch.setattr(sys, "argv", ["inpaint_figure.py", f"A={a}", f"B={b}", "--out", str(tmp_path / "f.png")])
    with pytest.raises(SystemExit, match="B: other images"):
        inpaint_figure.main()
    assert not (tmp_path / "f.png").exists()
