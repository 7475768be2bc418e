"""``evaluate_checkpoint`` and ``pyro-hvae evaluate`` on a tiny ladder VAE trained on real MNIST."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pyro_hvae.cli import main
from pyro_hvae.config import load_config
from pyro_hvae.evaluate import evaluate_checkpoint
from pyro_hvae.run import RunError
from pyro_hvae.train import Trainer

K = 50
SUMMARY_KEYS = {
    "checkpoint", "checkpoint_kind", "step", "ema", "split", "num_images", "first_images_only", "num_samples", "chunk_size",
    "batch_size", "seed", "marginal_samples", "device", "processes", "data", "likelihood_of", "num_dims", "elbo", "log_likelihood",
    "nll_nats", "nll_bits_per_dim",
    "elbo_bits_per_dim", "khat", "ess_fraction", "kl_per_layer", "active_units", "active_units_marginal",
    "active_unit_threshold", "collapsed_layers", "versions", "results",
}
PER_EXAMPLE_KEYS = {"elbo", "log_likelihood", "khat", "ess_fraction", "kl_z_1", "kl_z_2", "index"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_root):
    """A run folder of 60 steps on 28x28 MNIST: best.pt and last.pt both at step 60, with EMA weights."""
    folder = tmp_path_factory.mktemp("run")
    cfg = load_config(
        None,
        [
            f"data.root={data_root}", "data.val_size=100", "data.batch_size=64", "device=cpu",
            "model.latent_dims=[8,4]", "model.hidden_dims=[64]", "optim.lr=3e-3", "optim.warmup_steps=5",
            "train.steps=60", "train.eval_every=60", "train.log_every=60", "train.checkpoint_every=60",
            "train.ema_decay=0.9", "eval.split=val", "eval.num_samples=20",
        ],
    )
    Trainer(cfg, folder, device=torch.device("cpu")).fit()
    return folder


def evaluate(run_dir, tmp_path, name, **kwargs):
    """Evaluate on the validation split into ``tmp_path/name``; return the summary and per-image arrays."""
    kwargs = {"num_samples": K, "split": "val", **kwargs}
    results = evaluate_checkpoint(run_dir, out=tmp_path / name / "results.json", **kwargs)
    with np.load(tmp_path / name / "per_example.npz") as arrays:
        return results, dict(arrays)


@pytest.fixture(scope="module")
def baseline(run_dir, tmp_path_factory):
    return evaluate(run_dir, tmp_path_factory.mktemp("eval"), "seed0")


def test_summary_matches_per_image_values(baseline, run_dir):
    results, per_image = baseline
    assert set(results) == SUMMARY_KEYS and set(per_image) == PER_EXAMPLE_KEYS
    assert results["checkpoint"] == str(run_dir / "best.pt") and results["checkpoint_kind"] == "best"
    assert results["ema"] is True and results["step"] == 60
    assert results["num_images"] == 100 and all(v.shape == (100,) for v in per_image.values())
    assert results["chunk_size"] == K  # eval.chunk_size null: all K at once
    assert results["data"]["binarize"] == "dynamic" and results["data"]["binarize_seed"] == 0
    assert results["log_likelihood"] == pytest.approx(per_image["log_likelihood"].mean())
    assert results["nll_nats"] == pytest.approx(-results["log_likelihood"])
    assert results["nll_bits_per_dim"] == pytest.approx(results["nll_nats"] / (784 * math.log(2)))
    assert results["elbo"] == pytest.approx(per_image["elbo"].mean())
    assert results["khat"]["threshold"] == pytest.approx(min(1 - 1 / math.log10(K), 0.7))
    assert results["khat"]["fraction_above"] == pytest.approx((per_image["khat"] > results["khat"]["threshold"]).mean())
    assert 1 / K - 1e-6 <= results["ess_fraction"]["min"] <= results["ess_fraction"]["mean"] <= 1
    assert results["kl_per_layer"]["z_1"] == pytest.approx(per_image["kl_z_1"].mean())
    assert (per_image["kl_z_1"] >= 0).all() and (per_image["kl_z_2"] >= 0).all()  # analytic KL
    assert results["active_units"]["z_1"][1] == 8 and results["active_units"]["z_2"][1] == 4
    assert 0 <= results["active_units"]["z_2"][0] <= 4


def test_elbo_below_importance_weighted_estimate(baseline):
    _, per_image = baseline
    gap = per_image["log_likelihood"] - per_image["elbo"]
    assert gap.mean() > 4 * gap.std() / math.sqrt(len(gap))


def test_single_sample_estimate_is_the_elbo_in_expectation(run_dir, tmp_path):
    _, per_image = evaluate(run_dir, tmp_path, "K1", num_samples=1)
    diff = per_image["log_likelihood"] - per_image["elbo"]
    assert abs(diff.mean()) < 4 * diff.std() / math.sqrt(len(diff)) + 0.05
    assert np.isnan(per_image["khat"]).all() and (per_image["ess_fraction"] == 1).all()


def test_chunk_size_changes_draws_not_estimates(baseline, run_dir, tmp_path):
    results, per_image = baseline
    chunked, chunked_per_image = evaluate(run_dir, tmp_path, "chunked", chunk_size=7)
    assert chunked["chunk_size"] == 7
    assert not np.array_equal(chunked_per_image["log_likelihood"], per_image["log_likelihood"])
    diff = chunked_per_image["log_likelihood"] - per_image["log_likelihood"]
    assert abs(diff.mean()) < 4 * diff.std() / math.sqrt(len(diff)) + 0.05


def test_same_seed_same_results_other_seed_other_results(baseline, run_dir, tmp_path):
    results, per_image = baseline
    again, again_per_image = evaluate(run_dir, tmp_path, "again")
    assert {k: v for k, v in again.items() if k != "results"} == {k: v for k, v in results.items() if k != "results"}
    for key, value in per_image.items():
        np.testing.assert_array_equal(again_per_image[key], value, err_msg=key)
    _, other = evaluate(run_dir, tmp_path, "seed1", seed=1)
    assert not np.array_equal(other["log_likelihood"], per_image["log_likelihood"])


def test_first_images_are_those_of_the_whole_split(run_dir, tmp_path):
    """``--images N``: the first N images in file order, each with the draws it gets in a whole-split evaluation."""
    whole, whole_per_image = evaluate(run_dir, tmp_path, "whole", batch_size=20)
    first, first_per_image = evaluate(run_dir, tmp_path, "first", batch_size=20, num_images=40)
    assert (first["num_images"], first["first_images_only"], whole["first_images_only"]) == (40, True, False)
    for key, value in first_per_image.items():
        np.testing.assert_array_equal(value, whole_per_image[key][:40], err_msg=key)
    assert first["log_likelihood"] == pytest.approx(whole_per_image["log_likelihood"][:40].mean())
    result = CliRunner().invoke(main, ["evaluate", str(run_dir), "-K", "3", "--images", "10", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["results"] == str(run_dir / "eval-val-K3-first10" / "results.json")
    shutil.rmtree(run_dir / "eval-val-K3-first10")


def test_skipping_the_marginal_samples_changes_only_the_marginal_counts(baseline, run_dir, tmp_path):
    results, per_image = baseline
    skipped, skipped_per_image = evaluate(run_dir, tmp_path, "no-marginal", marginal_samples=0)
    for key, value in per_image.items():  # the marginal samples are drawn after each batch's importance samples
        np.testing.assert_array_equal(skipped_per_image[key], value, err_msg=key)
    assert results["marginal_samples"] == 100 and skipped["marginal_samples"] == 0
    assert results["active_units_marginal"] == {"z_1": [results["active_units_marginal"]["z_1"][0], 8],
                                                "z_2": [results["active_units_marginal"]["z_2"][0], 4]}
    assert skipped["active_units_marginal"] == {"z_1": [None, 8], "z_2": [None, 4]}
    assert skipped["active_units"] == results["active_units"]
    assert [r["layer"] for r in skipped["collapsed_layers"]] == [r["layer"] for r in results["collapsed_layers"]]
    fewer, _ = evaluate(run_dir, tmp_path, "few-marginal", marginal_samples=2)
    assert all(isinstance(fewer["active_units_marginal"][name][0], int) for name in ("z_1", "z_2"))


def test_run_without_best_uses_the_ema_of_last(baseline, run_dir, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    shutil.copy(run_dir / "last.pt", folder)  # EMA weights at step 60, the same as best.pt's
    results, per_image = evaluate(folder, tmp_path, "last")
    assert results["checkpoint_kind"] == "last" and results["ema"] is True
    np.testing.assert_array_equal(per_image["log_likelihood"], baseline[1]["log_likelihood"])


def test_cli_writes_results_then_refuses_to_overwrite(run_dir, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    shutil.copy(run_dir / "best.pt", folder)
    args = ["evaluate", str(folder), "--num-samples", str(K), "--split", "val", "--device", "cpu"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    printed = json.loads(first.stdout)
    out = folder / f"eval-val-K{K}"
    assert printed["results"] == str(out / "results.json") and printed["num_samples"] == K
    assert set(json.loads((out / "results.json").read_text())) == SUMMARY_KEYS
    with np.load(out / "per_example.npz") as arrays:
        assert set(arrays.files) == PER_EXAMPLE_KEYS
    assert (out / "diagnostics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 2
    assert refused.stderr.splitlines() == [refused.stderr.strip()] and refused.stderr.startswith("error: ")
    assert "already holds evaluation results" in refused.stderr and "--force" in refused.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    forced = CliRunner().invoke(main, [*args, "--force", "--seed", "1"])
    assert forced.exit_code == 0, forced.output
    assert (out / "results.json").read_bytes() != before["results.json"]
    assert sorted(p.name for p in out.iterdir()) == sorted(before)  # no temporary files left


def test_cli_out_names_the_results_file(run_dir, tmp_path):
    out = tmp_path / "reports" / "summary.json"
    result = CliRunner().invoke(main, ["evaluate", str(run_dir), "-K", "5", "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["split"] == "val"  # the run's eval.split
    assert sorted(p.name for p in out.parent.iterdir()) == ["diagnostics.png", "per_example.npz", "summary.json"]
    assert json.loads(out.read_text())["results"] == str(out)
    assert not any(run_dir.glob("eval-*"))


@pytest.fixture(scope="module")
def flows_run_dir(tmp_path_factory, data_root):
    """A run of 150 steps of a ladder with two IAF flows per layer (long enough for the posterior
    to leave the prior, about 3.5 nats of KL); its validation records the ELBO and a K-sample
    IW bound, computed with the network in memory, not a reloaded one."""
    folder = tmp_path_factory.mktemp("flows_run")
    cfg = load_config(
        None,
        [
            f"data.root={data_root}", "data.val_size=100", "data.batch_size=64", "device=cpu",
            "model.latent_dims=[8,4]", "model.hidden_dims=[64]", "model.flows=2", "optim.lr=3e-3",
            "optim.warmup_steps=5", "train.steps=150", "train.eval_every=150", "train.log_every=150",
            f"train.val_num_samples={K}", "data.eval_batch_size=100", "eval.split=val",
        ],
    )
    Trainer(cfg, folder, device=torch.device("cpu")).fit()
    return folder


def test_a_flows_run_evaluates_to_what_its_training_recorded(flows_run_dir, tmp_path):
    """Training's validation of step 150 drew its samples from seed ``seed + step``, all 100
    images in one batch, with the network in memory. Evaluating the reloaded checkpoint with
    that seed and batch draws the same samples: the ELBO, the KL per layer and the IW bound must
    be the numbers training recorded, so the flows' weights and autoregressive orders were
    restored and evaluation computes what training computed."""
    best = torch.load(flows_run_dir / "best.pt", weights_only=True)
    recorded, step = best["val"], best["step"]
    results, per_image = evaluate(flows_run_dir, tmp_path, "flows", seed=0 + step, batch_size=100)
    assert results["elbo"] == pytest.approx(recorded["val_elbo"], rel=1e-5)
    assert results["log_likelihood"] == pytest.approx(recorded[f"val_iw_{K}"], rel=1e-5)
    assert results["kl_per_layer"] == pytest.approx(recorded["val_kl"], rel=1e-4)
    assert sum(recorded["val_kl"].values()) > 2  # the posterior has left the prior: the flows matter
    n = len(per_image["elbo"])
    gap = per_image["log_likelihood"] - per_image["elbo"]
    assert gap.mean() > 4 * gap.std() / math.sqrt(n)
    _, single = evaluate(flows_run_dir, tmp_path, "flows_K1", num_samples=1)
    diff = single["log_likelihood"] - single["elbo"]
    assert abs(diff.mean()) < 4 * diff.std() / math.sqrt(n) + 0.05


def _foreign(path):
    torch.save({"a": 1}, path)
    return path


def _truncated(path, run_dir):
    data = (run_dir / "best.pt").read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize(
    "case, message",
    [
        ("zero_samples", "--num-samples must be >= 1, got 0"),
        ("zero_batch", "--batch-size must be >= 1, got 0"),
        ("zero_images", "--images must be >= 1, got 0"),
        ("too_many_images", "--images 101 is more than the 100 images of the val split; pass at most 100"),
        ("one_marginal_sample", "--marginal-samples must be 0 (skip the marginal counts) or at least 2, got 1"),
        ("foreign", "is not a pyro-hvae checkpoint"),
        ("truncated", "truncated, corrupt"),
        ("missing", "does not exist"),
        ("empty_folder", "holds no best.pt or last.pt"),
    ],
)
def test_cli_bad_input_is_one_error_line(case, message, run_dir, tmp_path):
    target, extra = run_dir, []
    if case == "zero_samples":
        extra = ["--num-samples", "0"]
    elif case == "zero_batch":
        extra = ["--batch-size", "0"]
    elif case == "one_marginal_sample":
        extra = ["--marginal-samples", "1"]
    elif case in ("zero_images", "too_many_images"):
        extra = ["--images", "0" if case == "zero_images" else "101"]
    elif case == "foreign":
        target = _foreign(tmp_path / "model.pt")
    elif case == "truncated":
        target = _truncated(tmp_path / "best.pt", run_dir)
    elif case == "missing":
        target = tmp_path / "nowhere"
    else:
        target = tmp_path
    result = CliRunner().invoke(main, ["evaluate", str(target), "--device", "cpu", *extra])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1
    assert message in result.stderr
    assert not any(run_dir.glob("eval-*"))


def test_library_raises_run_error(run_dir):
    with pytest.raises(RunError, match="--num-samples must be >= 1"):
        evaluate_checkpoint(run_dir, num_samples=-3)
