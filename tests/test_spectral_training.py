"""`train.spectral_reg`: the spectral penalty in the training loss, logged, kept in last.pt
and continued exactly by --resume, for conv and MLP hierarchies alike."""

import pytest
import torch

from pyro_hvae.config import load_config
from pyro_hvae.data import load_splits
from pyro_hvae.models.build import build_model
from pyro_hvae.run import prepare_run_dir, read_metrics
from pyro_hvae.spectral import SpectralRegularizer
from pyro_hvae.train import Trainer
from clirun import run

CONV = [
    "model.kind=conv_ladder", "model.scales=[7]", "model.groups_per_scale=2", "model.latent_channels=2",
    "model.widths=16", "data.batch_size=16", "data.val_size=20", "data.eval_batch_size=20",
    "train.log_every=10", "train.kl_warmup_steps=10", "optim.warmup_steps=5",
]
LADDER = [
    "model.latent_dims=[8,4]", "model.hidden_dims=[64,32]", "data.batch_size=64", "data.val_size=100",
    "train.log_every=10", "optim.warmup_steps=5",
]
SPECTRAL = "train.spectral_reg={weight: 0.01, initial: 0.1, steps: 20}"




def train_records(run_dir):
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]


def test_a_resumed_run_with_the_regularizer_equals_an_uninterrupted_one(tiny, tmp_path):
    overrides = [*CONV, SPECTRAL, "train.steps=40", "train.eval_every=20", "train.checkpoint_every=20"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert run("train", tiny, *overrides, "--out", whole, "--device", "cpu").exit_code == 0
    cfg = load_config(tiny, overrides)
    Trainer(cfg, prepare_run_dir(split), device=torch.device("cpu")).fit(stop_at=20)
    stopped = torch.load(split / "last.pt", weights_only=True)["spectral"]
    assert int(stopped["num_updates"]) == 20  # the power iteration's state is in the checkpoint
    result = run("train", "--resume", split, "--device", "cpu")
    assert result.exit_code == 0, result.output
    a = torch.load(whole / "last.pt", weights_only=True)
    b = torch.load(split / "last.pt", weights_only=True)
    assert int(a["spectral"]["num_updates"]) == int(b["spectral"]["num_updates"]) == 40
    for part in ("model", "spectral"):
        for name, value in a[part].items():
            torch.testing.assert_close(b[part][name], value, rtol=1e-5, atol=1e-6, msg=f"{part}.{name}")
    for x, y in zip(train_records(whole), train_records(split), strict=True):
        assert x["spectral_reg"] == pytest.approx(y["spectral_reg"], rel=1e-5)


def test_the_penalty_is_logged_and_added_to_the_per_image_loss(tiny, tmp_path):
    out = tmp_path / "run"
    assert run("train", tiny, *LADDER, SPECTRAL, "train.steps=30", "train.eval_every=30", "--out", out, "--device", "cpu").exit_code == 0
    records = train_records(out)
    # lambda of the last step of each window: 0.1 -> 0.01 over 20 steps, then 0.01
    assert [r["spectral_lambda"] for r in records] == pytest.approx([0.1 - 0.09 * 9 / 20, 0.1 - 0.09 * 19 / 20, 0.01])
    for r in records:
        assert r["spectral_reg"] > 0
        assert r["loss"] == pytest.approx(-r["elbo"] + r["spectral_reg"], rel=1e-4)
    # the MLP hierarchy's Linear layers carry the power-iteration vectors
    state = torch.load(out / "last.pt", weights_only=True)["spectral"]
    assert any(name.endswith(".u") for name in state)


def sum_of_spectral_norms(run_dir) -> float:
    cfg = load_config(run_dir / "config.yaml")
    vae = build_model(cfg.model, load_splits(cfg.data).data_shape)
    vae.load_state_dict(torch.load(run_dir / "last.pt", weights_only=True)["model"])
    with torch.no_grad():
        return float(SpectralRegularizer(vae, 1.0, initial_iterations=100).singular_values().sum())


def test_a_strong_penalty_shrinks_the_spectral_norms(tiny, tmp_path):
    common = [*LADDER, "train.steps=30", "train.eval_every=30", "optim.lr=1e-2", "--device", "cpu"]
    assert run("train", tiny, *common, "--out", tmp_path / "plain").exit_code == 0
    assert run("train", tiny, *common, "train.spectral_reg={weight: 10.0}", "--out", tmp_path / "reg").exit_code == 0
    reg, plain = sum_of_spectral_norms(tmp_path / "reg"), sum_of_spectral_norms(tmp_path / "plain")
    assert reg < 0.9 * plain, (reg, plain)


@pytest.mark.parametrize("setting", ["null", "{weight: 0}"])
def test_null_or_zero_is_off(tiny, tmp_path, setting):
    out = tmp_path / "run"
    assert run("train", tiny, *LADDER, f"train.spectral_reg={setting}", "train.steps=10", "--out", out, "--device", "cpu").exit_code == 0
    assert "spectral_reg" not in train_records(out)[0]
    assert torch.load(out / "last.pt", weights_only=True)["spectral"] is None


def test_a_misspelt_option_lists_the_valid_ones(tiny):
    result = run("train", tiny, "train.spectral_reg={lambda: 0.1}", "--print-config")
    assert result.exit_code == 2
    missing, unknown = result.output.strip().splitlines()
    assert missing.startswith("error: train.spectral_reg.weight: Field required")
    assert unknown.startswith("error: train.spectral_reg.lambda: unknown option") and "weight, initial, steps, iterations" in unknown
