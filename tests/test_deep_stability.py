"""bench/deep_stability.py: each variant switches off exactly its stabilizers, and the
table's numbers are those of the runs (steps whose batches the test poisons: a finite
gradient spike, non-finite losses)."""

import json
import math
import shutil
import sys

import numpy as np
import pytest
import torch
from benches import load_bench

from pyro_hvae.config import load_config
from pyro_hvae.train import evaluate_elbo

pytestmark = pytest.mark.usefixtures("one_thread")

#: a 2-group ladder at 7x7, small batches: the bench's path in seconds
TINY = ["model.scales=[7]", "model.groups_per_scale=[2]", "model.widths=8", "model.latent_channels=2",
        "data.val_size=50", "data.eval_batch_size=50"]


@pytest.fixture(scope="module")
def bench():
    return load_bench("deep_stability")


def test_the_schedule_keeps_the_configs_fractions_of_the_run(bench):
    # mnist_conv.yaml: 5000 steps, KL warm-up and spectral decay 1000, learning-rate warm-up 100
    assert bench.compressed_schedule(load_config(bench.CONFIG), 200) == [
        "train.steps=200", "train.kl_warmup_steps=40", "optim.warmup_steps=4", "train.spectral_reg.steps=40"]
    assert bench.compressed_schedule(load_config(bench.CONFIG), 10)[2] == "optim.warmup_steps=1"


def test_each_variant_switches_off_its_stabilizers_and_nothing_else(bench, data_root):
    def config(variant):
        return load_config(bench.CONFIG, bench.variant_overrides(variant, steps=200, batch=32, lr=1e-2, data_root=data_root))

    configs = {v: config(v) for v in bench.VARIANTS}
    switches = {v: (c.train.skip_factor, c.train.spectral_reg is not None, c.train.kl_warmup_steps)
                for v, c in configs.items()}
    assert switches == {"all": (10.0, True, 40), "no_skip": (None, True, 40), "no_spectral": (10.0, False, 40),
                        "no_warmup": (10.0, True, 0), "none": (None, False, 0), "only_skip": (10.0, False, 0),
                        "only_spectral": (None, True, 0), "only_warmup": (None, False, 40)}
    deep = configs["all"].model
    assert (deep.scales, deep.groups_per_scale, deep.latent_channels, deep.widths) == ([14, 7], [6, 24], 4, 16)
    for c in configs.values():
        assert (c.optim.lr, c.optim.warmup_steps, c.train.grad_clip, c.train.steps, c.seed) == (1e-2, 4, 200.0, 200, 0)
        assert c.model == deep and c.data == configs["all"].data
        assert c.train.ema_decay == 0.999 and c.train.log_every == 1 and c.train.eval_every == 200


def poison(trainer, scale_at: dict[int, float]) -> list:
    """Multiply the batch of step ``s`` by ``scale_at[s]`` (1000: a finite spike of the
    gradient; NaN: a non-finite loss); returns the list that collects every step's stats."""
    take_step, seen = trainer.take_step, []

    def poisoned(x):
        x = x * scale_at.get(trainer.step + 1, 1.0)
        seen.append(take_step(x))
        return seen[-1]

    trainer.take_step = poisoned
    return seen


def run(bench, data_root, variant, folder, steps, scale_at, batch=8):
    """One tiny run of ``variant`` in ``folder``, its batches poisoned by ``scale_at``:
    the trainer, the stats of its steps, where it stopped, the bench's row."""
    overrides = bench.variant_overrides(variant, steps=steps, batch=batch, lr=1e-2, data_root=data_root, extra=TINY)
    trainer = bench.build_trainer(overrides, folder / variant)
    seen = poison(trainer, scale_at)
    stop = bench.train(trainer)
    return trainer, seen, stop, bench.summarize(variant, trainer, stop)


@pytest.fixture(scope="module")
def spiked(bench, data_root, tmp_path_factory):
    """30 steps of ``all`` and ``no_skip``: step 28 a gradient spike, step 29 a NaN loss."""
    tmp = tmp_path_factory.mktemp("spiked")
    return {v: run(bench, data_root, v, tmp, 30, {28: 1000.0, 29: math.nan}) for v in ("all", "no_skip")}


def test_skipped_updates_and_the_first_nan_are_the_runs(spiked):
    # the spike (after the skipper's 25 finite-only steps) is skipped only with a skip factor;
    # the NaN step by both: the trainer never applies a non-finite update
    for variant, skipped in (("all", 2), ("no_skip", 1)):
        trainer, seen, stop, row = spiked[variant]
        assert stop is None and trainer.step == 30
        assert [i + 1 for i, s in enumerate(seen) if s.skipped] == ([28, 29] if variant == "all" else [29])
        assert row["skipped"] == skipped
        assert row["first_nonfinite"] == 29
        assert row["step"] == list(range(1, 31))


def test_curves_and_grad_norm_are_the_logged_steps(spiked):
    for trainer, seen, _, row in spiked.values():
        assert row["neg_elbo"][:28] == pytest.approx([-float(s.elbo) for s in seen[:28]], rel=1e-12)
        assert math.isnan(row["neg_elbo"][28])
        finite = [s.grad_norm for s in seen if not math.isnan(s.grad_norm)]
        assert row["max_grad_norm"] == pytest.approx(max(finite), rel=1e-12)
        assert row["max_grad_norm"] == pytest.approx(seen[27].grad_norm, rel=1e-12)  # the spike
    assert spiked["all"][3]["max_grad_norm"] == spiked["no_skip"][3]["max_grad_norm"]  # same steps until then


def test_final_val_elbo_is_an_evaluation_of_the_trained_weights(spiked):
    trainer, _, _, row = spiked["all"]
    with torch.random.fork_rng():
        seed = trainer.cfg.seed + trainer.step  # the trainer's validation seeds its batches from it
        again = evaluate_elbo(trainer.eval_vae, trainer.hierarchy, trainer.splits.val, trainer.cfg, trainer.device, seed=seed)
    assert row["val_elbo"] == pytest.approx(again["val_elbo"], rel=1e-9)


def test_a_nan_at_the_first_step_is_reported_there(bench, data_root, tmp_path):
    trainer, _, stop, row = run(bench, data_root, "all", tmp_path, 5, {1: math.nan})
    assert stop.step == 1 and "first" in stop.reason
    assert (row["first_nonfinite"], row["val_elbo"], row["step"]) == (1, None, [])
    kept = bench.summarize_folder("all", trainer.run_dir)
    assert (kept["stop"].step, kept["first_nonfinite"], kept["val_elbo"], kept["skipped"]) == (1, 1, None, 0)


def same_rows(a: dict, b: dict) -> None:
    curves = ("step", "neg_elbo", "grad_norm")
    assert {k: v for k, v in a.items() if k not in curves} == {k: v for k, v in b.items() if k not in curves}
    for curve in curves:
        np.testing.assert_array_equal(a[curve], b[curve])  # NaN where NaN


def test_a_kept_folder_gives_the_row_its_trainer_gave(bench, spiked):
    for variant, (trainer, _, _, row) in spiked.items():
        same_rows(bench.summarize_folder(variant, trainer.run_dir), row)


def test_a_kept_folder_whose_records_end_early_is_reported_stopped_after_them(bench, spiked, tmp_path):
    trainer = spiked["all"][0]
    folder = tmp_path / "all"
    shutil.copytree(trainer.run_dir, folder)
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["kind"] == "train" and json.loads(line)["step"] <= 28]
    (folder / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    row = bench.summarize_folder("all", folder)
    assert (row["stop"].step, row["skipped"], row["val_elbo"], row["step"][-1]) == (29, 1, None, 28)


def test_long_runs_are_drawn_per_window(bench):
    row = {"step": list(range(1, 8)), "neg_elbo": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0],
           "grad_norm": [5.0, math.nan, 1.0, math.nan, math.nan, math.nan, 9.0]}
    assert bench.windowed(row, 1) == (row["step"], row["neg_elbo"], row["grad_norm"])
    steps, loss, norm = bench.windowed(row, 3)  # the last, incomplete window is left out
    assert steps == [3, 6] and loss == [2.0, 5.0]
    assert norm[0] == 5.0 and math.isnan(norm[1])


@pytest.mark.slow
def test_a_run_the_trainer_stops_reports_where(bench, data_root, tmp_path):
    # NaN from step 3 on: the 100th skipped update in a row, at step 102, stops the run
    trainer, _, stop, row = run(bench, data_root, "none", tmp_path, 110, {s: math.nan for s in range(3, 111)}, batch=2)
    assert stop.step == 102 and "100 updates in a row" in stop.reason
    assert (row["first_nonfinite"], row["skipped"], row["val_elbo"]) == (3, 100, None)
    assert row["step"] == list(range(1, 102))  # the stopping step has no record


def test_table_rows(bench):
    rows = [
        {"variant": "all", "skip_factor": 10.0, "spectral_reg": True, "kl_warmup_steps": 40, "first_nonfinite": None,
         "skipped": 3, "max_grad_norm": 1234.5, "val_elbo": -150.123, "stop": None},
        {"variant": "none", "skip_factor": None, "spectral_reg": False, "kl_warmup_steps": 0, "first_nonfinite": 17,
         "skipped": 100, "max_grad_norm": math.inf, "val_elbo": None, "stop": bench.Stop(116, "diverged")},
    ]
    assert bench.table(rows).splitlines()[2:] == [
        "| all | ×10 | on | 40 steps | — | 3 | 1.23e+03 | -150.12 | — |",
        "| none | off | off | off | step 17 | 100 | inf | — | step 116 |",
    ]


def test_main_prints_a_row_per_variant_and_draws_the_figure(bench, data_root, tmp_path, monkeypatch, capsys):
    out = tmp_path / "fig" / "deep.png"
    monkeypatch.setattr(sys, "argv", ["deep_stability.py", "--steps", "3", "--batch", "4", "--data", str(data_root),
                                      "--runs", str(tmp_path / "runs"), "--out", str(out), "--set", *TINY])
    bench.main()
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if line.startswith("| ")][1:]
    assert [r.split(" | ")[0] for r in rows] == [f"| {v}" for v in bench.DEFAULT_VARIANTS]
    assert all(r.endswith("| — |") for r in rows)  # three steps: nothing stops
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted(bench.DEFAULT_VARIANTS)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the same table again from the kept folders, without training; a variant not kept is an error
    again = tmp_path / "again.png"
    monkeypatch.setattr(sys, "argv", ["deep_stability.py", "--from-runs", str(tmp_path / "runs"), "--out", str(again)])
    bench.main()
    assert [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:] == rows
    assert again.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setattr(sys, "argv", ["deep_stability.py", "--from-runs", str(tmp_path / "runs"),
                                      "--variants", "all", "only_skip"])
    with pytest.raises(SystemExit) as exit_:
        bench.main()
    assert exit_.value.code == 2
    assert "no run folder of only_skip in it; name the variants it holds with --variants" in capsys.readouterr().err


def test_undo_depth_scaling_restores_the_unscaled_initialisation(bench, data_root, tmp_path):
    # two scales (an up-sampling block between them) and 3 groups: the scaled layers start at sqrt(1 / 3)
    two_scales = [*TINY, "model.scales=[14,7]", "model.groups_per_scale=[1,2]"]
    overrides = bench.variant_overrides("all", steps=2, batch=4, lr=1e-2, data_root=data_root, extra=two_scales)
    trainer = bench.build_trainer(overrides, tmp_path / "run")
    before = {k: v.clone() for k, v in trainer.vae.state_dict().items()}
    bench.without_depth_scaling(trainer)
    after = trainer.vae.state_dict()
    changed = sorted(k for k in after if not torch.equal(after[k], before[k]))
    assert len([k for k in changed if k.endswith(".project.conv.weight")]) == 3  # every group's projection of z
    assert len([k for k in changed if ".enter." in k]) == 1  # the up-sampling block's output layer
    assert len(changed) == 4
    for k in changed:
        torch.testing.assert_close(after[k], before[k] * math.sqrt(3))
    scales = [m.residual_scale for m in trainer.vae.modules() if isinstance(m, (bench.EncoderCell, bench.DecoderCell))]
    assert len(scales) > 3 and set(scales) == {1.0}
    shadow = trainer.ema.shadow.state_dict()
    assert all(torch.equal(shadow[k], after[k]) for k in after)
    assert all(m.residual_scale == 1.0 for m in trainer.ema.shadow.modules() if hasattr(m, "residual_scale"))
