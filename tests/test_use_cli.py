"""pyro-hvae sample / reconstruct / inpaint on a tiny run trained on real MNIST."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pyro_hvae.cli import main
from pyro_hvae.config import load_config
from pyro_hvae.train import Trainer
from pyro_hvae.use_run import inpaint_run, load_run


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_root):
    """40 steps of a two-layer ladder with batch norm on 28x28 MNIST."""
    folder = tmp_path_factory.mktemp("run")
    cfg = load_config(
        None,
        [
            f"data.root={data_root}", "data.val_size=100", "data.batch_size=64", "device=cpu",
            "model.latent_dims=[8,4]", "model.hidden_dims=[64]", "model.batch_norm=true", "optim.lr=3e-3",
            "train.steps=40", "train.eval_every=40", "train.log_every=40", "train.checkpoint_every=40",
        ],
    )
    Trainer(cfg, folder, device=torch.device("cpu")).fit()
    return folder


def invoke(*args):
    return CliRunner().invoke(main, [*map(str, args), "--device", "cpu"])


def test_sample_writes_grid_and_tensors_and_reuses_batch_norm_stats(run_dir):
    result = invoke("sample", run_dir, "--num", 6, "--temperature", 0.8)
    assert result.exit_code == 0, result.output
    folder = run_dir / "sample-T0.8"
    assert (folder / "samples.png").stat().st_size > 0
    with np.load(folder / "samples.npz") as arrays:
        first = arrays["images"]
    assert first.shape == (6, 1, 28, 28) and not np.isnan(first).any()
    cache = run_dir / "bn_stats_T0.8.pt"
    stamp = cache.stat().st_mtime_ns

    again = invoke("sample", run_dir, "--num", 6, "--temperature", 0.8)
    assert again.exit_code == 2 and again.stderr.startswith("error: ") and "--force" in again.stderr

    assert invoke("sample", run_dir, "--num", 6, "--temperature", 0.8, "--force").exit_code == 0
    assert cache.stat().st_mtime_ns == stamp  # read, not recomputed
    with np.load(folder / "samples.npz") as arrays:
        assert np.array_equal(arrays["images"], first)


def test_reconstruct_writes_pairs(run_dir, tmp_path):
    result = invoke("reconstruct", run_dir, "--num", 4, "--split", "val", "--out", tmp_path / "rec")
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "rec" / "reconstruct.npz") as arrays:
        assert arrays["original"].shape == arrays["reconstruction"].shape == (4, 1, 28, 28)
        assert arrays["index"].shape == (4,)
    assert (tmp_path / "rec" / "reconstruct.png").is_file()


def test_inpaint_keeps_observed_pixels_and_reports_acceptance(run_dir, tmp_path):
    result = invoke("inpaint", run_dir, "--mask", "center", "--num", 3, "--method", "mwg", "--steps", 5, "--out", tmp_path / "inp")
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "inp" / "inpaint.npz") as arrays:
        mask, original, filled = arrays["mask"], arrays["original"], arrays["filled"]
        assert np.array_equal(filled[:, mask], original[:, mask])
        assert arrays["acceptance_rate"].shape == arrays["missing_log_prob"].shape == (3,)
        assert np.array_equal(arrays["predictive_mean"][:, mask], original[:, mask])
    assert (tmp_path / "inp" / "inpaint.png").is_file()


def test_user_mask_from_a_file(run_dir, tmp_path):
    mask = np.ones((1, 28, 28), dtype=bool)
    mask[..., ::2, :] = False
    np.save(tmp_path / "stripes.npy", mask)
    folder = inpaint_run(run_dir, mask=tmp_path / "stripes.npy", method="pseudo_gibbs", num=2, num_steps=2, out=tmp_path / "out")
    with np.load(folder / "inpaint.npz") as arrays:
        assert np.array_equal(arrays["mask"], mask) and "acceptance_rate" not in arrays


def test_load_run_uses_the_evaluation_weights(run_dir):
    run = load_run(run_dir)
    assert run.checkpoint.name == "best.pt" and not run.vae.training


def _write_npy(folder, name, array):
    np.save(folder / name, array)
    return folder / name


@pytest.mark.parametrize(
    "case, message",
    [
        ("zero_temperature", "--temperature must be a number > 0"),
        ("negative_temperature", "--temperature must be a number > 0"),
        ("zero_num", "--num must be a positive integer"),
        ("unknown_mask", "--mask must be one of center"),
        ("mask_shape", "expected shape [1, 28, 28]"),
        ("mask_type", "expected booleans"),
        ("mask_nothing_missing", "hides no pixel"),
        ("mask_nothing_observed", "observes no pixel"),
        ("zero_steps", "--steps must be a positive integer"),
        ("no_weights", "holds no best.pt or last.pt"),
    ],
)
def test_bad_input_is_one_error_line_and_writes_nothing(case, message, run_dir, tmp_path):
    before = sorted(p.name for p in run_dir.iterdir())
    args = {
        "zero_temperature": ["sample", run_dir, "--temperature", 0],
        "negative_temperature": ["sample", run_dir, "--temperature", -1],
        "zero_num": ["reconstruct", run_dir, "--num", 0],
        "unknown_mask": ["inpaint", run_dir, "--mask", "middle"],
        "mask_shape": ["inpaint", run_dir, "--mask", _write_npy(tmp_path, "a.npy", np.ones((28, 28), dtype=bool))],
        "mask_type": ["inpaint", run_dir, "--mask", _write_npy(tmp_path, "b.npy", np.ones((1, 28, 28)))],
        "mask_nothing_missing": ["inpaint", run_dir, "--mask", _write_npy(tmp_path, "c.npy", np.ones((1, 28, 28), dtype=bool))],
        "mask_nothing_observed": ["inpaint", run_dir, "--mask", _write_npy(tmp_path, "d.npy", np.zeros((1, 28, 28), dtype=bool))],
        "zero_steps": ["inpaint", run_dir, "--steps", 0],
        "no_weights": ["sample", tmp_path],
    }[case]
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1
    assert message in result.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == before
