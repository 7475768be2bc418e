"""Training and evaluation in several processes (torch.distributed, gloo on the CPU): the
same numbers as one process, only rank 0 writes, and a rank that fails stops every rank.

Two processes per run, started by :func:`distrun.run_ranks` (or by torchrun itself), on
tiny synthetic 8x8 images; each run is killed and fails the test after
:data:`distrun.TIMEOUT_S` seconds, so a hang cannot pass.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from distrun import REPO, TIMEOUT_S, cli, run_ranks, torchrun
from pyro_hvae.config import ConfigError, load_config
from pyro_hvae.distributed import World, launch, synchronize_batch_norm
from pyro_hvae.nn import FeatureNet
from pyro_hvae.run import load_checkpoint, prepare_run_dir, read_metrics
from pyro_hvae.models.build import build_model
from pyro_hvae.train import Trainer, TrainingError, apply_speed_options

pytestmark = pytest.mark.usefixtures("one_thread")

MODELS = Path(__file__).with_name("dist_models.py")

#: Tolerance of the parameters of two processes against one: float32 sums of the same
#: per-image gradients in another order (two half-batch means averaged, one mean of all).
RTOL, ATOL = 1e-5, 1e-6


def _config(folder: Path, model: str) -> Path:
    """A config over 96 + 7 synthetic 8x8 images (8 of them for validation), dynamically
    binarized, with a global batch of 16."""
    generator = np.random.default_rng(0)
    np.savez(folder / "images.npz", train=generator.integers(0, 256, (96, 8, 8), dtype=np.uint8),
             test=generator.integers(0, 256, (7, 8, 8), dtype=np.uint8))
    path = folder / "tiny.yaml"
    path.write_text(
        f"""\
name: dist
data: {{dataset: npz, path: {folder / 'images.npz'}, val_size: 8, batch_size: 16, eval_batch_size: 3}}
model: {model}
train: {{steps: 6, log_every: 2, eval_every: 3, checkpoint_every: 3, ema_decay: 0.5, grad_clip: 40.0}}
optim: {{lr: 0.01, warmup_steps: 2}}
"""
    )
    return path


@pytest.fixture
def config(tmp_path) -> Path:
    """With a point-mass posterior: no random draw but the pixels', so two processes and one
    must agree to float precision."""
    return _config(tmp_path, f'{{kind: custom, class_path: "{MODELS}:PointPosterior"}}')


@pytest.fixture
def ladder(tmp_path) -> Path:
    """With the built-in ladder, whose posterior noise each rank draws from its own stream."""
    return _config(tmp_path, "{kind: ladder, latent_dims: [3, 2], hidden_dims: [16]}")


def _fit(world, config, overrides, out, stop_at=None) -> Trainer:
    trainer = Trainer(load_config(config, overrides), Path(out), device=torch.device("cpu"), world=world)
    if world.is_main:
        prepare_run_dir(Path(out))
    trainer.fit(stop_at)
    return trainer


def _train(config, overrides, out):
    """Train in this process (one of a run's ranks or the only one); its weights and EMA."""
    with launch() as world:
        trainer = _fit(world, config, overrides, out)
        return {"model": trainer.vae.state_dict(), "ema": trainer.ema.shadow.state_dict(), "own_draws": trainer.noise.own_draws}


def test_two_processes_train_to_the_parameters_of_one(config, tmp_path):
    before = Trainer(load_config(config), tmp_path / "unused", device=torch.device("cpu")).vae.state_dict()
    one = _train(config, [], tmp_path / "one")
    ranks = run_ranks(_train, config, [], tmp_path / "two")
    for name, value in ranks[0]["model"].items():  # DDP keeps the ranks bit for bit together
        assert torch.equal(value, ranks[1]["model"][name]), name
    assert max(float((one["model"][k] - before[k]).abs().max()) for k in before) > 1000 * ATOL  # they trained
    for part in ("model", "ema"):
        for name, value in one[part].items():
            torch.testing.assert_close(ranks[0][part][name], value, rtol=RTOL, atol=ATOL, msg=f"{part} {name}")
    # the logs and the validation of the shared-out images are those of one process
    logged = [read_metrics(tmp_path / run / "metrics.jsonl") for run in ("one", "two")]
    assert [r["kind"] for r in logged[0]] == [r["kind"] for r in logged[1]]
    for single, shared in zip(*logged):
        for key in ("elbo", "grad_norm", "val_elbo"):
            if key in single:
                assert shared[key] == pytest.approx(single[key], rel=1e-5), (key, single["step"])
        assert shared.get("images_per_s", 0) > 0 or single["kind"] == "eval"


@pytest.mark.parametrize("flows", [0, 1], ids=["residual", "residual_iaf"])
def test_two_processes_train_the_ladder_to_the_parameters_of_one(ladder, tmp_path, flows):
    """The posterior noise is drawn per row of the global batch: 4 steps of the built-in
    ladder (residual posterior, with and without an IAF flow; no batch norm, which
    normalizes each process's rows alone) on two processes give one process's weights."""
    overrides = ["model.batch_norm=false", f"model.flows={flows}", "train.steps=4"]
    before = Trainer(load_config(ladder, overrides), tmp_path / "unused", device=torch.device("cpu")).vae.state_dict()
    one = _train(ladder, overrides, tmp_path / "one")
    ranks = run_ranks(_train, ladder, overrides, tmp_path / "two")
    assert one["own_draws"] == ranks[0]["own_draws"] == ranks[1]["own_draws"] == set()  # every site per row
    assert max(float((one["model"][k] - before[k]).abs().max()) for k in before) > 1000 * ATOL  # they trained
    for part in ("model", "ema"):
        for name, value in one[part].items():
            torch.testing.assert_close(ranks[0][part][name], value, rtol=RTOL, atol=ATOL, msg=f"{part} {name}")
            assert torch.equal(ranks[1][part][name], ranks[0][part][name]), (part, name)
    # validation batches (3, 3 and 2 images: one on rank 0, two on rank 1) draw from their own seeds
    logged = [[r["val_elbo"] for r in read_metrics(tmp_path / run / "metrics.jsonl") if r["kind"] == "eval"] for run in ("one", "two")]
    assert len(logged[0]) == 2 and logged[1] == pytest.approx(logged[0], rel=1e-6)


def test_rank_0_says_once_which_sites_draw_their_noise_per_process(config, tmp_path):
    model = f"model.class_path={MODELS}:LaplacePosterior"
    results = run_ranks(cli, "train", config, model, "train.steps=3", "--out", tmp_path / "run", "--device", "cpu")
    assert [code for code, _, _ in results] == [0, 0]
    said = "the posterior noise of latent site(s) z_1 is drawn by each process from its own stream"
    assert results[0][2].count(said) == 1 and "2 processes agree with one in distribution, not draw for draw" in results[0][2]
    assert results[1][2] == ""


def test_only_rank_0_writes_and_a_global_batch_that_does_not_split_is_refused(config, tmp_path):
    results = run_ranks(cli, "train", config, "--out", tmp_path / "run", "--device", "cpu")
    (code0, out0, err0), (code1, out1, err1) = results
    assert code0 == code1 == 0, err0 + err1
    assert json.loads(out0)["step"] == 6 and out1 == "" and err1 == ""
    assert "training into" in err0 and "on 2 processes (cpu)" in err0 and "posterior noise" not in err0  # a point mass draws none
    assert json.loads((tmp_path / "run" / "run.json").read_text())["processes"] == 2
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["best.pt", "config.yaml", "images", "kl_per_layer.png", "last.pt", "metrics.jsonl", "run.json"]

    results = run_ranks(cli, "train", config, "data.batch_size=15", "--out", tmp_path / "odd", "--device", "cpu")
    assert [code for code, _, _ in results] == [2, 2]
    assert results[0][2] == (
        "error: data.batch_size: 15 images do not split evenly over 2 processes (it is the global batch); "
        "use a multiple of 2 (e.g. 14 or 16) or another process count\n"
    )
    assert results[1][2] == "" and not (tmp_path / "odd").exists()


def _train_and_resume(config, overrides, out):
    """Train 6 steps straight, and 3 + 3 with a resume from last.pt in between."""
    with launch() as world:
        straight = _fit(world, config, overrides, Path(out) / "straight")
        _fit(world, config, overrides, Path(out) / "resumed", stop_at=3)
        trainer = Trainer(load_config(config, overrides), Path(out) / "resumed", device=torch.device("cpu"), world=world)
        trainer.load_state_dict(load_checkpoint(Path(out) / "resumed" / "last.pt"))
        trainer.fit()
        return straight.vae.state_dict(), trainer.vae.state_dict()


def test_a_resumed_two_process_run_continues_exactly(ladder, tmp_path):
    """last.pt keeps the random stream of every rank."""
    ranks = run_ranks(_train_and_resume, ladder, [], tmp_path)
    assert len(load_checkpoint(tmp_path / "resumed" / "last.pt")["rng"]["other_ranks"]) == 1
    for rank, (straight, resumed) in enumerate(ranks):
        for name, value in straight.items():
            assert torch.equal(resumed[name], value), (rank, name)
    # the weights are rank 0's everywhere, and so are the batch-norm statistics after a checkpoint
    for name, value in ranks[0][0].items():
        assert torch.equal(ranks[1][0][name], value), name


def test_resume_under_torchrun_continues_as_the_uninterrupted_run(ladder, tmp_path):
    """``torchrun ... train CONFIG`` for 3 steps, then ``torchrun ... train --resume RUN
    train.steps=6``, against 6 steps straight on two processes: the same weights, EMA
    and records. The learning rate stays at ``optim.lr`` after the warm-up
    (``optim.min_lr`` equal to it), so that the schedule does not depend on ``train.steps``."""
    flat = ["optim.min_lr=0.01", "train.log_every=3"]
    run = tmp_path / "run"
    first = torchrun("train", ladder, *flat, "train.steps=3", "--out", run, "--device", "cpu")
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads(first.stdout)["step"] == 3
    resumed = torchrun("train", "--resume", run, "train.steps=6", "--device", "cpu")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(resumed.stdout)["step"] == 6 and f"resuming {run} at step 3 on 2 processes (cpu)" in resumed.stderr
    (code, _, stderr), _ = run_ranks(cli, "train", ladder, *flat, "--out", tmp_path / "straight", "--device", "cpu")
    assert code == 0, stderr
    straight, continued = (load_checkpoint(tmp_path / name / "last.pt") for name in ("straight", "run"))
    assert continued["step"] == straight["step"] == 6
    for part in ("model", "ema"):
        for name, value in straight[part].items():
            assert torch.equal(continued[part][name], value), (part, name)
    # one record per step and kind, the resumed run's equal to the straight run's
    logged = [read_metrics(tmp_path / name / "metrics.jsonl") for name in ("straight", "run")]
    assert [(r["kind"], r["step"]) for r in logged[1]] == [("train", 3), ("eval", 3), ("train", 6), ("eval", 6)]
    for single, shared in zip(*logged, strict=True):
        timing = ("images_per_s", "elapsed_s")
        assert {k: v for k, v in shared.items() if k not in timing} == {k: v for k, v in single.items() if k not in timing}
    assert json.loads((run / "run.json").read_text())["resumes"][0]["step"] == 3


@pytest.mark.parametrize(
    "case",
    ["bad_data_path_on_rank_1", "nan_at_the_first_step_on_rank_1", "nan_from_step_3_on_rank_1", "sync_batch_norm_on_cpu"],
)
def test_a_failing_rank_stops_every_rank_with_one_error(config, tmp_path, case):
    """Rank 0 prints the one error line (naming the rank when it failed alone), rank 1 prints
    nothing, both exit 2, and no rank waits for the other (the run's timeout is TIMEOUT_S)."""
    out = tmp_path / "run"
    common = ["--out", out, "--device", "cpu"]
    per_rank = [("train", config, *common), ("train", config, *common)]
    if case == "bad_data_path_on_rank_1":  # e.g. the data missing on one node
        per_rank[1] = ("train", config, f"data.path={tmp_path / 'elsewhere.npz'}", *common)
        expected = f"error: rank 1: data.path: {tmp_path / 'elsewhere.npz'} does not exist; point data.path at a .npz"
    elif case == "nan_at_the_first_step_on_rank_1":
        model = f"model.class_path={MODELS}:NaNOnRank"
        per_rank = [("train", config, model, *common)] * 2
        expected = "error: rank 1: the first training step failed: Expected parameter logits"
    elif case == "nan_from_step_3_on_rank_1":  # averaged into every rank's gradient: all skip
        model = f"model.class_path={MODELS}:NaNOnRank"
        per_rank = [("train", config, model, "model.init_args={after: 2}", "train.steps=200", *common)] * 2
        expected = "error: 100 updates in a row were skipped (non-finite or exploding gradients) at step 102"
    else:
        per_rank = [("train", config, "train.sync_batch_norm=true", *common)] * 2
        expected = "error: train.sync_batch_norm needs CUDA devices"
    results = run_ranks(cli, per_rank_args=per_rank)
    assert [code for code, _, _ in results] == [2, 2]
    lines = results[0][2].splitlines()
    assert lines[-1].startswith(expected), lines
    assert sum(line.startswith("error:") for line in lines) == 1
    assert results[1][2] == ""  # rank 1 says nothing: rank 0 speaks for the run
    if case == "nan_from_step_3_on_rank_1":
        last = torch.load(out / "last.pt", weights_only=True)
        assert last["step"] == 99  # the last checkpoint before the stop, its weights those of step 2
        assert all(torch.isfinite(v).all() for v in last["model"].values() if v.dtype.is_floating_point)
    elif case == "nan_at_the_first_step_on_rank_1":  # as in one process: the run folder, no checkpoint
        assert not (out / "last.pt").exists()
    else:
        assert not out.exists()  # nothing written


def _evaluate(run, out, batch_size):
    code, stdout, stderr = cli("evaluate", run, "--out", Path(out) / "results.json", "-K", 4, "--batch-size", batch_size, "--device", "cpu")
    assert code == 0, stderr
    return stdout


@pytest.fixture
def trained(ladder, tmp_path) -> Path:
    """A 6-step run of the ladder (one process)."""
    run = tmp_path / "run"
    code, _, stderr = cli("train", ladder, "--out", run, "--device", "cpu")
    assert code == 0, stderr
    return run


def test_two_process_evaluation_gives_the_values_of_one_in_file_order(trained, tmp_path):
    """7 test images in batches of 3 (rank 0 takes one batch, rank 1 two) and of 2 (under
    torchrun itself: two batches each, the last of one image)."""
    for batch_size in (3, 2):
        _evaluate(trained, tmp_path / f"one-{batch_size}", batch_size)
    results = run_ranks(_evaluate, trained, tmp_path / "two-3", 3)
    assert results[1] == "" and json.loads(results[0])["results"] == str(tmp_path / "two-3" / "results.json")
    done = torchrun("evaluate", trained, "--out", tmp_path / "two-2" / "results.json", "-K", 4, "--batch-size", 2, "--device", "cpu")
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(done.stdout.strip().splitlines()) == 1  # rank 0 alone prints the summary
    for batch_size in (3, 2):
        one = np.load(tmp_path / f"one-{batch_size}" / "per_example.npz")
        two = np.load(tmp_path / f"two-{batch_size}" / "per_example.npz")
        assert set(one.files) == set(two.files) and list(two["index"]) == list(range(7))
        for key in one.files:
            assert np.array_equal(one[key], two[key], equal_nan=True), (batch_size, key)
        summary = json.loads((tmp_path / f"two-{batch_size}" / "results.json").read_text())
        assert summary["processes"] == 2 and summary["num_images"] == 7
        assert summary["log_likelihood"] == json.loads((tmp_path / f"one-{batch_size}" / "results.json").read_text())["log_likelihood"]


def test_python_dash_m_is_the_command_line():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "pyro_hvae", "--help"], env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0 and done.stdout.startswith("Usage: pyro-hvae ")
    assert "evaluate" in done.stdout and "train" in done.stdout


def test_one_process_world_shares_and_refuses_as_documented():
    assert World().batch_rows(7) == slice(0, 7) and World().seed(5) == 5
    shares = [World(rank, 3).shard(7) for rank in range(3)]
    assert [i for share in shares for i in share] == list(range(7)) and [len(s) for s in shares] == [2, 2, 3]
    assert [World(rank, 2).batch_rows(16) for rank in range(2)] == [slice(0, 8), slice(8, 16)]
    # 8 items in batches of 3 (the last of 2), numbered as one process numbers them
    assert [World(rank, 2).batches(8, 3) for rank in range(2)] == [[(0, range(0, 3))], [(1, range(3, 6)), (2, range(6, 8))]]
    assert World(1, 2).seed(5) != 5
    with pytest.raises(ConfigError, match=r"data.batch_size: 6 images do not split evenly over 4 processes .*\(e.g. 4 or 8\)"):
        World(0, 4).batch_rows(6)


def test_synchronized_batch_norm_keeps_outputs_and_state_in_one_process():
    """Without a process group the synchronized layers normalize as the plain ones; their state
    dict is the same, so checkpoints load either way."""
    torch.manual_seed(0)
    plain = FeatureNet(5, [4, 3], batch_norm=True)
    synced = synchronize_batch_norm(FeatureNet(5, [4, 3], batch_norm=True))
    synced.load_state_dict(plain.state_dict())
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules()) == 2
    x = torch.randn(2, 6, 5)  # particles x images x features: statistics over both
    torch.testing.assert_close(synced(x), plain(x), rtol=0, atol=0)
    assert synced.state_dict().keys() == plain.state_dict().keys()
    for name, value in plain.state_dict().items():
        assert torch.equal(synced.state_dict()[name], value), name


@pytest.mark.parametrize(
    "model",
    ["{kind: ladder, latent_dims: [3, 2], hidden_dims: [16]}",
     "{kind: conv_ladder, scales: [4], groups_per_scale: 1, latent_channels: 2, widths: 8}"],
    ids=["ladder", "conv_ladder"],
)
def test_sync_batch_norm_converts_every_batch_norm_on_cuda_devices_of_several_processes(tmp_path, model):
    """The trainer's conversion (apply_speed_options), decided for a CUDA device without one:
    under torchrun every batch-norm layer of the built-in hierarchy becomes a
    torch.nn.SyncBatchNorm with the same state; one process keeps its layers; the CPU refuses."""
    cfg = load_config(_config(tmp_path, model), ["train.sync_batch_norm=true"])

    def norms(module):
        return [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]

    torch.manual_seed(0)
    plain = build_model(cfg.model, (1, 8, 8))
    state = {k: v.clone() for k, v in plain.state_dict().items()}
    count = len(norms(plain))
    assert count > 0
    one = apply_speed_options(cfg.train, plain, torch.device("cuda", 0), World())
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in one.modules())
    synced = apply_speed_options(cfg.train, one, torch.device("cuda", 1), World(1, 2, 1))
    assert len(norms(synced)) == count and all(isinstance(m, torch.nn.SyncBatchNorm) for m in norms(synced))
    assert synced.state_dict().keys() == state.keys()
    for name, value in state.items():
        assert torch.equal(synced.state_dict()[name], value), name
    for world in (World(), World(0, 2)):
        with pytest.raises(TrainingError, match="train.sync_batch_norm needs CUDA devices"):
            apply_speed_options(cfg.train, build_model(cfg.model, (1, 8, 8)), torch.device("cpu"), world)


def test_sync_batch_norm_on_the_cpu_of_one_process_is_one_error_line(config, tmp_path):
    code, out, err = cli("train", config, "train.sync_batch_norm=true", "--out", tmp_path / "run", "--device", "cpu")
    assert (code, out) == (2, "")
    assert err == (
        "error: train.sync_batch_norm needs CUDA devices (PyTorch's SyncBatchNorm synchronizes no CPU tensors), "
        "but training runs on the CPU; use --device cuda or set train.sync_batch_norm=false\n"
    )
    assert not (tmp_path / "run").exists()
