"""`pyro-hvae train` end to end on real MNIST, resume, and every bad input."""

import importlib.util
import json

import pytest
import torch

from pyro_hvae import __version__
from pyro_hvae.config import load_config
from pyro_hvae.data import load_splits
from pyro_hvae.run import prepare_run_dir, read_metrics
from pyro_hvae.train import Trainer, TrainingError
from clirun import run

TINY = [
    "model.latent_dims=[8,4]",
    "model.hidden_dims=[64,32]",
    "data.batch_size=64",
    "data.val_size=200",
    "data.eval_batch_size=200",
    "train.log_every=20",
    "train.kl_warmup_steps=20",
    "optim.warmup_steps=10",
]




def test_version_and_print_config(tiny):
    assert run("--version").output.strip().endswith(__version__)
    result = run("train", tiny, *TINY, "optim.lr=3e-4", "--print-config")
    assert result.exit_code == 0
    assert "  lr: 0.0003\n" in result.output and "  latent_dims: [8, 4]\n" in result.output


def test_train_end_to_end_writes_the_run_folder(tiny, tmp_path):
    out = tmp_path / "run"
    extra = ["train.steps=300", "train.eval_every=100", "train.ema_decay=0.9", "train.val_num_samples=10", "optim.lr=3e-3"]
    result = run("train", tiny, *TINY, *extra, "--out", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["step"] == 300 and summary["best_step"] is not None
    for name in ("config.yaml", "run.json", "metrics.jsonl", "last.pt", "best.pt"):
        assert (out / name).is_file(), name
    assert load_config(out / "config.yaml").model.latent_dims == [8, 4]
    info = json.loads((out / "run.json").read_text())
    assert {"python", "torch", "pyro", "pyro_hvae"} <= set(info["versions"])
    assert info["overrides"] == [*TINY, *extra]
    records = read_metrics(out / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert len(train) == 15 and len(evals) == 3
    assert {"elbo", "reconstruction", "kl", "beta", "lr", "grad_norm", "skipped_updates", "images_per_s"} <= set(train[0])
    assert set(train[0]["kl"]) == {"z_1", "z_2"}
    assert train[-1]["elbo"] > train[0]["elbo"] + 100  # nats per image
    assert evals[-1]["val_elbo"] > evals[0]["val_elbo"]
    # no model that ignores z beats independent pixels at the validation images' own means
    # (about -205 nats); 300 steps must (about -193)
    val = load_splits(load_config(out / "config.yaml").data).val
    x = val.batch(torch.arange(len(val)))
    p = x.mean(0).clamp(1e-6, 1 - 1e-6)
    factorized = float((x * p.log() + (1 - x) * (1 - p).log()).flatten(1).sum(1).mean())
    assert evals[-1]["val_elbo"] > factorized + 5, (evals[-1]["val_elbo"], factorized)
    assert all(r["val_iw_10"] > r["val_elbo"] for r in evals)  # the cheap IW bound is tighter
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["kind"] == "best" and best["ema"] is True
    last = torch.load(out / "last.pt", weights_only=True)
    assert last["step"] == 300
    assert len(list((out / "images").glob("samples_*.png"))) == 3
    assert len(list((out / "images").glob("reconstructions_*.png"))) == 3
    if importlib.util.find_spec("tensorboard") is not None:  # the optional extra
        assert list((out / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("flows", [0, 2], ids=["no_flows", "iaf_flows"])
def test_resumed_run_ends_with_the_same_parameters(tiny, tmp_path, flows):
    """Also with IAF flows, whose autoregressive orders are drawn when the network is built."""
    overrides = TINY + [
        "train.steps=60", "train.eval_every=20", "train.checkpoint_every=20", "train.ema_decay=0.9", f"model.flows={flows}",
    ]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert run("train", tiny, *overrides, "--out", whole, "--device", "cpu").exit_code == 0
    # the same run, killed after its checkpoint at step 40 ...
    cfg = load_config(tiny, overrides)
    Trainer(cfg, prepare_run_dir(split), device=torch.device("cpu")).fit(stop_at=40)
    assert torch.load(split / "last.pt", weights_only=True)["step"] == 40
    # ... and resumed from it
    result = run("train", "--resume", split, "--device", "cpu")
    assert result.exit_code == 0, result.output
    a = torch.load(whole / "last.pt", weights_only=True)
    b = torch.load(split / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 60
    for name, value in a["model"].items():
        torch.testing.assert_close(b["model"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    for name, value in a["ema"].items():
        torch.testing.assert_close(b["ema"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert a["best"] == b["best"]


def test_resume_refuses_architecture_changes_and_allows_longer_training(tiny, tmp_path):
    out = tmp_path / "run"
    assert run("train", tiny, *TINY, "train.steps=20", "--out", out, "--device", "cpu").exit_code == 0
    before = (out / "last.pt").read_bytes()
    result = run("train", "--resume", out, "model.latent_dims=[8,2]")
    assert result.exit_code == 2
    assert "change the architecture (model.latent_dims)" in result.output
    assert (out / "last.pt").read_bytes() == before
    message = one_error_line(run("train", "--resume", out, "data.batch_size=32", "data.split_seed=4"))
    assert "change the training batches (data.split_seed, data.batch_size)" in message
    assert (out / "last.pt").read_bytes() == before
    result = run("train", "--resume", out, "train.steps=30", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 30
    resumes = json.loads((out / "run.json").read_text())["resumes"]
    assert [(r["step"], r["overrides"]) for r in resumes] == [(20, ["train.steps=30"])]


def one_error_line(result):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines and all(line.startswith("error: ") for line in lines), result.output
    assert "Traceback" not in result.output
    return "\n".join(lines)


def test_bad_config_inputs_exit_2_with_clear_lines(tiny, tmp_path):
    message = one_error_line(run("train", tmp_path / "missing.yaml"))
    assert "missing.yaml" in message
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  latent_dimz: [4]\ntrain:\n  steps: many\n")
    message = one_error_line(run("train", bad, "optim.lr=abc"))
    assert "model.latent_dimz" in message and "train.steps" in message and "optim.lr" in message
    assert "from override 'optim.lr=abc'" in message and str(bad) in message
    assert not (tmp_path / "runs").exists()


def test_missing_data_folder_exits_2_naming_the_files(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  root: {tmp_path / 'nowhere'}\n  download: false\n")
    out = tmp_path / "run"
    message = one_error_line(run("train", config, "--out", out))
    assert "train-images-idx3-ubyte" in message and str(tmp_path / "nowhere") in message
    assert not out.exists()


def test_existing_run_is_not_overwritten_without_force(tiny, tmp_path):
    out = tmp_path / "run"
    assert run("train", tiny, *TINY, "train.steps=20", "--out", out, "--device", "cpu").exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    message = one_error_line(run("train", tiny, *TINY, "train.steps=20", "--out", out))
    assert "already holds a run" in message and "--resume" in message and "--force" in message
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert run("train", tiny, *TINY, "train.steps=20", "--out", out, "--force", "--device", "cpu").exit_code == 0


def test_corrupt_or_truncated_checkpoint_on_resume(tiny, tmp_path):
    out = tmp_path / "run"
    assert run("train", tiny, *TINY, "train.steps=20", "--out", out, "--device", "cpu").exit_code == 0
    data = (out / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(data[: len(data) // 2])
    assert "truncated, corrupt" in one_error_line(run("train", "--resume", out))
    torch.save({"weights": torch.zeros(2)}, out / "last.pt")
    assert "not a pyro-hvae checkpoint" in one_error_line(run("train", "--resume", out))
    assert "no last.pt" in one_error_line(run("train", "--resume", tmp_path / "empty"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_device_cuda_without_a_gpu(tiny, tmp_path):
    message = one_error_line(run("train", tiny, *TINY, "--out", tmp_path / "run", "--device", "cuda"))
    assert "no CUDA device" in message
    assert not (tmp_path / "run").exists()


def test_nan_loss_at_the_first_step_stops_with_the_likely_cause(tiny, tmp_path, data_root):
    cfg = load_config(tiny, TINY + ["train.steps=20"])
    trainer = Trainer(cfg, prepare_run_dir(tmp_path / "run"), device=torch.device("cpu"))
    with torch.no_grad():
        trainer.vae.model.decoder[-1].bias.fill_(float("nan"))
    with pytest.raises(TrainingError, match="the first training step failed: .*Bernoulli.*likely causes"):
        trainer.fit()
    assert not (tmp_path / "run" / "last.pt").exists()


def test_divergence_stops_and_keeps_a_good_checkpoint(tiny, tmp_path):
    cfg = load_config(tiny, TINY + ["train.steps=400", "train.checkpoint_every=10"])
    run_dir = prepare_run_dir(tmp_path / "run")
    trainer = Trainer(cfg, run_dir, device=torch.device("cpu"), splits=load_splits(cfg.data))
    healthy_step = trainer.take_step

    def diverging_step(x):  # from step 15 on, every loss is NaN
        return healthy_step(x * float("nan") if trainer.step >= 15 else x)

    trainer.take_step = diverging_step
    with pytest.raises(TrainingError, match="115 updates in a row were skipped|100 updates in a row were skipped"):
        trainer.fit()
    assert trainer.step == 115 and trainer.skipper.skipped == 100
    last = torch.load(run_dir / "last.pt", weights_only=True)
    assert last["step"] == 110
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.dtype.is_floating_point)


def test_without_a_validation_split_the_latest_weights_count_as_best(tiny, tmp_path):
    out = tmp_path / "run"
    result = run("train", tiny, *TINY, "data.val_size=0", "train.steps=40", "train.eval_every=20", "--out", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert torch.load(out / "best.pt", weights_only=True)["step"] == 40
    evals = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "eval"]
    assert [r["best"] for r in evals] == [True, True] and "val_elbo" not in evals[0]
