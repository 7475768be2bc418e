"""bench/gpu_fashion_conv.py, the prepared GPU run of issue 8, run on the CPU with tiny
settings: it plans, trains for its budget, evaluates and writes its files; bad input
stops it with one error line before anything is written."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import gpu_fashion_conv  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

#: examples/fashion_mnist_conv.yaml made tiny: its scales, binarization and likelihood, 8 channels, one group per scale
TINY = [
    "data.val_size=8", "data.batch_size=8", "data.eval_batch_size=8", "eval.batch_size=2",
    "model.widths=8", "model.latent_channels=2", "model.groups_per_scale=[1,1]",
    "train.log_every=2",
]


@pytest.fixture
def images(tmp_path):
    """40 training and 2 test 28x28 8-bit images."""
    pixels = (np.random.default_rng(0).random((42, 28, 28)) ** 3 * 255).astype(np.uint8)
    path = tmp_path / "tiny.npz"
    np.savez(path, train=pixels[:40], test=pixels[40:])
    return path


def args(images, tmp_path, *extra):
    return ["--device", "cpu", "--minutes", "0.02", "--calibration-steps", "2", "-K", "3",
            "--out", str(tmp_path / "out"), "--run-dir", str(tmp_path / "run"), *extra,
            "data.dataset=npz", f"data.path={images}", *TINY]


def test_main_trains_within_its_budget_evaluates_and_writes_its_files(images, tmp_path):
    results = gpu_fashion_conv.main(args(images, tmp_path))
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["results.json", "metrics.jsonl", "val_elbo_vs_time.png", "best.pt", "per_example.npz", "diagnostics.png"]
    )
    written = json.loads((out / "results.json").read_text())
    assert written["status"] == "done" and written["meets_target"] == (written["test"]["nll_nats"] <= 225)
    plan, train, test = written["plan"], written["train"], written["test"]
    assert plan["train_minutes"] == 0.02 and plan["steps"] >= 1 and plan["steps_per_second"] > 0
    # stopped by its budget or at the planned steps, and best.pt comes from a validation evaluation
    assert train["stopped_for_time"] or train["step"] == plan["steps"]
    assert train["best_step"] is not None and written["val_curve"]
    assert test["split"] == "test" and test["num_images"] == 2 and test["num_samples"] == 3
    assert np.isfinite(test["nll_nats"]) and test["nll_nats"] > 0
    assert torch.load(out / "best.pt", weights_only=True)["step"] == train["best_step"]
    assert results["test"]["nll_nats"] == test["nll_nats"]


def test_training_budget_shrinks_to_end_within_the_total():
    assert gpu_fashion_conv.training_minutes(8, 9.5, 30, 60) == (8, "")
    minutes, note = gpu_fashion_conv.training_minutes(8, 9.5, 30, 120)
    assert minutes == pytest.approx(9.5 - 0.5 - 2) and "cut from 8" in note
    with pytest.raises(gpu_fashion_conv.PlanError, match="lower -K or raise --total-minutes"):
        gpu_fashion_conv.training_minutes(8, 9.5, 30, 600)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["-K", "0"], "-K must be >= 1"),
        (["--minutes", "0"], "--minutes and --total-minutes must be positive"),
        (["model.groups_per_scale=[0,1]"], "model.groups_per_scale"),
    ],
)
def test_bad_input_is_one_error_line_and_nothing_is_written(images, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as stop:
        gpu_fashion_conv.main([*args(images, tmp_path), *extra])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where no CUDA device exists")
def test_cuda_without_a_device_is_refused(images, tmp_path, capsys):
    with pytest.raises(SystemExit):
        gpu_fashion_conv.main([*args(images, tmp_path), "--device", "cuda"])
    assert "no CUDA device is available here" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
