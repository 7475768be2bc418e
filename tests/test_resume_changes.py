"""``pyro-hvae train --resume``: optimizer overrides take effect, a crash leaves no duplicate
metrics, and changed data or optimizer is refused. Runs on a small synthetic npz file."""

import json

import numpy as np
import pytest
import torch

from pyro_hvae.config import load_config
from pyro_hvae.infer.step import warmup_cosine
from pyro_hvae.run import prepare_run_dir, read_metrics
from pyro_hvae.train import Trainer
from clirun import run

BASE = [
    "device=cpu", "data.dataset=npz", "data.val_size=16", "data.batch_size=16", "data.eval_batch_size=16",
    "model.latent_dims=[4,2]", "model.hidden_dims=[16]", "optim.warmup_steps=4", "optim.lr=2e-3",
    "train.log_every=5", "train.eval_every=10",
]


def train_to(strokes, folder, steps, stop_at, *extra):
    cfg = load_config(None, [*BASE, f"data.path={strokes}", f"train.steps={steps}", *extra])
    trainer = Trainer(cfg, prepare_run_dir(folder), device=torch.device("cpu"))
    trainer.fit(stop_at=stop_at)
    return trainer


def test_resumed_optimizer_uses_the_overridden_hyperparameters(strokes, tmp_path):
    folder = tmp_path / "run"
    train_to(strokes, folder, 40, 20)
    state = torch.load(folder / "last.pt", weights_only=True)
    new = ["optim.lr=1e-2", "optim.min_lr=1e-3", "optim.betas=[0.5,0.9]", "optim.weight_decay=0.01"]
    cfg = load_config(None, [*BASE, f"data.path={strokes}", "train.steps=40", *new])
    trainer = Trainer(cfg, folder, device=torch.device("cpu"))
    trainer.load_state_dict(state)
    expected = 1e-2 * warmup_cosine(20, warmup_steps=4, total_steps=40, min_ratio=0.1)
    old = 2e-3 * warmup_cosine(20, warmup_steps=4, total_steps=40, min_ratio=0.05)
    group = trainer.optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(expected) and abs(expected - old) > 1e-3
    assert group["betas"] == (0.5, 0.9) and group["weight_decay"] == 0.01
    assert trainer.scheduler.get_last_lr() == [pytest.approx(expected)]
    # the moment estimates are the saved ones
    saved = state["optimizer"]["state"][0]["exp_avg"]
    torch.testing.assert_close(trainer.optimizer.state_dict()["state"][0]["exp_avg"], saved)

    # from the command line: the logged rates after the resume follow the new schedule
    result = run("train", "--resume", folder, *new)
    assert result.exit_code == 0, result.output
    lrs = {r["step"]: r["lr"] for r in read_metrics(folder / "metrics.jsonl") if r["kind"] == "train"}
    assert lrs[15] == pytest.approx(2e-3 * warmup_cosine(15, warmup_steps=4, total_steps=40, min_ratio=0.05))
    for step in (25, 30, 35):
        assert lrs[step] == pytest.approx(1e-2 * warmup_cosine(step, warmup_steps=4, total_steps=40, min_ratio=0.1))
    group = torch.load(folder / "last.pt", weights_only=True)["optimizer"]["param_groups"][0]
    assert tuple(group["betas"]) == (0.5, 0.9) and group["weight_decay"] == 0.01
    assert json.loads((folder / "run.json").read_text())["resumes"][-1]["overrides"] == new


def test_resume_refuses_another_optimizer_or_other_images(strokes, tmp_path):
    folder = tmp_path / "run"
    train_to(strokes, folder, 20, 10)
    before = (folder / "last.pt").read_bytes()
    result = run("train", "--resume", folder, "optim.name=adam")
    assert result.exit_code == 2 and result.output.count("error:") == 1
    assert "error: --resume: optim.name cannot change (adamax -> adam)" in result.output
    images = (np.random.default_rng(1).random((80, 6, 6)) < 0.3).astype(np.uint8) * 255
    np.savez(strokes, train=images, test=images[:8])
    result = run("train", "--resume", folder)
    assert result.exit_code == 2 and result.output.count("error:") == 1
    assert "error: --resume: the images at data.path differ from those the run was trained on" in result.output
    assert (folder / "last.pt").read_bytes() == before


def test_a_crash_after_the_checkpoint_leaves_no_duplicate_metrics(strokes, tmp_path):
    whole = tmp_path / "whole"
    train_to(strokes, whole, 40, None, "train.checkpoint_every=1000")
    folder = tmp_path / "crashed"
    trainer = train_to(strokes, folder, 40, 20, "train.checkpoint_every=1000")  # last.pt at step 20

    def crash():
        raise RuntimeError("the machine went down")

    trainer.save_last = crash  # the process dies while writing its next checkpoint, at step 30
    with pytest.raises(RuntimeError, match="went down"):
        trainer.fit(stop_at=30)
    with (folder / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "train", "step": 3')  # and cut a line short
    assert torch.load(folder / "last.pt", weights_only=True)["step"] == 20
    assert max(r["step"] for r in read_metrics_lenient(folder)) == 30

    result = run("train", "--resume", folder)
    assert result.exit_code == 0, result.output
    records = read_metrics(folder / "metrics.jsonl")
    for kind in ("train", "eval"):
        steps = [r["step"] for r in records if r["kind"] == kind]
        assert steps == sorted(set(steps)), (kind, steps)
        assert steps == [r["step"] for r in read_metrics(whole / "metrics.jsonl") if r["kind"] == kind]


def read_metrics_lenient(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.endswith("}")]
