"""``train.max_minutes``: training stops on a wall-clock budget, evaluates the weights it
ends with so that best.pt is chosen among them, and counts the time over resumes.
Runs on a small synthetic npz file."""

import pytest
import torch

from pyro_hvae.config import ConfigError, load_config
from pyro_hvae.run import load_checkpoint, prepare_run_dir, read_metrics
from pyro_hvae.train import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = [
    "device=cpu", "data.dataset=npz", "data.val_size=16", "data.batch_size=16", "data.eval_batch_size=16",
    "model.latent_dims=[4,2]", "model.hidden_dims=[16]", "optim.warmup_steps=4",
    "train.steps=1000000", "train.log_every=1000000", "train.checkpoint_every=1000000",
]


def trainer(strokes, folder, *extra):
    cfg = load_config(None, [*BASE, f"data.path={strokes}", *extra])
    return Trainer(cfg, folder, device=torch.device("cpu"))


def test_training_stops_on_its_budget_after_evaluating_its_last_weights(strokes, tmp_path):
    folder = prepare_run_dir(tmp_path / "run")
    # no evaluation but the one the budget forces: eval_every is beyond reach
    summary = trainer(strokes, folder, "train.max_minutes=0.01", "train.eval_every=1000000").fit()
    assert summary["stopped_for_time"] and not summary["stopped_early"]
    assert 0.6 <= summary["train_seconds"] < 30 and 1 < summary["step"] < 1000000
    records = read_metrics(folder / "metrics.jsonl")
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [summary["step"]] and evals[0]["best"]
    assert evals[0]["elapsed_s"] == pytest.approx(summary["train_seconds"])
    assert records[-2]["kind"] == "train" and records[-2]["step"] == summary["step"]  # the last window is logged
    assert load_checkpoint(folder / "best.pt")["step"] == summary["step"]
    last = load_checkpoint(folder / "last.pt")
    assert last["step"] == summary["step"] and last["train_seconds"] == summary["train_seconds"]


def test_budget_is_counted_over_resumes(strokes, tmp_path):
    folder = prepare_run_dir(tmp_path / "run")
    first = trainer(strokes, folder, "train.eval_every=5")
    first.fit(stop_at=20)
    spent = first.train_seconds
    assert spent > 0 and load_checkpoint(folder / "last.pt")["train_seconds"] == spent

    # a budget already spent by the first part: the resumed run takes one step, then stops
    resumed = trainer(strokes, folder, "train.eval_every=5", f"train.max_minutes={spent / 60}")
    resumed.load_state_dict(load_checkpoint(folder / "last.pt"))
    summary = resumed.fit()
    assert summary["stopped_for_time"] and summary["step"] == 21 and summary["train_seconds"] > spent
    elapsed = [r["elapsed_s"] for r in read_metrics(folder / "metrics.jsonl") if r["kind"] == "eval"]
    assert elapsed == sorted(elapsed) and len(elapsed) == 5  # steps 5, 10, 15, 20, then 21


def test_without_a_budget_the_run_ends_at_its_steps(strokes, tmp_path):
    summary = trainer(strokes, prepare_run_dir(tmp_path / "run"), "train.steps=12", "train.eval_every=6").fit()
    assert summary["step"] == 12 and not summary["stopped_for_time"]


def test_a_budget_that_is_not_positive_is_refused(strokes):
    with pytest.raises(ConfigError, match="max_minutes"):
        load_config(None, [*BASE, f"data.path={strokes}", "train.max_minutes=0"])
