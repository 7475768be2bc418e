"""``pyro-hvae evaluate``: progress lines when stderr is not a terminal, ``--chunk-size``, and
the chunk size chosen from a memory budget. A tiny run on a synthetic npz file."""

import json
import re

import numpy as np
import pyro
import pytest
import torch
from click.testing import CliRunner

from pyro_hvae import LadderVAE
from pyro_hvae.cli import main
from pyro_hvae.config import load_config
from pyro_hvae.evaluate import CPU_MEMORY_BUDGET, evaluate_checkpoint, fitting_chunk_size, particle_bytes
from pyro_hvae.train import Trainer

PROGRESS = re.compile(r"^evaluate: (\d+)/40 images \((\d+)%\), \d+:\d\d:\d\d elapsed, ETA \d+:\d\d:\d\d$")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """Six training steps on 6x6 synthetic strokes; a test split of 40 images."""
    folder = tmp_path_factory.mktemp("run")
    images = (np.random.default_rng(0).random((80, 6, 6)) < 0.3).astype(np.uint8) * 255
    np.savez(folder / "strokes.npz", train=images[:40], test=images[40:])
    cfg = load_config(
        None,
        [
            "device=cpu", "data.dataset=npz", f"data.path={folder / 'strokes.npz'}", "data.val_size=8",
            "data.batch_size=16", "data.eval_batch_size=8", "model.latent_dims=[4,2]", "model.hidden_dims=[16]",
            "train.steps=6", "train.log_every=6", "train.eval_every=6", "eval.batch_size=10",
        ],
    )
    (folder / "run").mkdir()
    Trainer(cfg, folder / "run", device=torch.device("cpu")).fit()
    return folder / "run"


def test_progress_lines_every_five_percent_when_stderr_is_not_a_terminal(run_dir, tmp_path, capsys):
    evaluate_checkpoint(run_dir, num_samples=3, batch_size=1, out=tmp_path / "a" / "results.json")
    lines = capsys.readouterr().err.splitlines()
    matches = [PROGRESS.match(line) for line in lines]
    assert all(matches), lines
    done = [int(m.group(1)) for m in matches]
    assert done == list(range(2, 41, 2))  # 5% of 40 images, one line per two images
    assert [int(m.group(2)) for m in matches] == list(range(5, 101, 5))
    # batches larger than 5%: one line per batch
    evaluate_checkpoint(run_dir, num_samples=3, batch_size=15, out=tmp_path / "b" / "results.json")
    assert [PROGRESS.match(line).group(1) for line in capsys.readouterr().err.splitlines()] == ["15", "30", "40"]


def test_cli_chunk_size_flag(run_dir, tmp_path):
    def evaluate(name, *extra):
        args = ["evaluate", run_dir, "-K", "20", "--device", "cpu", "--out", tmp_path / name, *extra]
        result = CliRunner().invoke(main, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        with np.load(tmp_path / name / "per_example.npz") as arrays:
            return json.loads(result.stdout), json.loads((tmp_path / name / "results.json").read_text()), arrays["log_likelihood"]

    (tmp_path / "c7").mkdir(), (tmp_path / "c7b").mkdir(), (tmp_path / "all").mkdir()
    printed, results, seven = evaluate("c7", "--chunk-size", "7")
    assert printed["chunk_size"] == results["chunk_size"] == 7
    _, _, again = evaluate("c7b", "--chunk-size", "7")
    np.testing.assert_array_equal(again, seven)  # same seed, same chunks: the same draws
    _, results, whole = evaluate("all")  # a tiny model: all K fit in the default budget
    assert results["chunk_size"] == 20 and not np.array_equal(whole, seven)
    refused = CliRunner().invoke(main, ["evaluate", str(run_dir), "--chunk-size", "0", "--device", "cpu"])
    assert refused.exit_code == 2 and refused.stderr.startswith("error: --chunk-size must be >= 1, got 0")


def test_chunk_size_from_a_memory_budget(run_dir, tmp_path):
    vae = LadderVAE((1, 28, 28), latent_dims=[64, 32, 16, 8, 4], hidden_dims=[512, 256], batch_norm=True).eval()
    x = torch.bernoulli(torch.full((100, 1, 28, 28), 0.3))
    with pyro.validation_enabled(False), pyro.settings.context(module_local_params=True):  # as evaluate runs
        per_particle = particle_bytes(vae, x)
        half = particle_bytes(vae, x[:50])
    # a particle of 100 images holds at least the 512-wide hidden activations and the [100, 784] logits
    assert per_particle > 100 * (512 + 784) * 4
    assert half == pytest.approx(per_particle / 2, rel=0.05)  # the tensors of each image, as it should
    # the default budget keeps a large model at K = 1000 to a fraction of its samples per pass
    with pyro.validation_enabled(False), pyro.settings.context(module_local_params=True):
        chunk = fitting_chunk_size(vae, x, 1000, CPU_MEMORY_BUDGET)
        assert chunk == CPU_MEMORY_BUDGET // per_particle and 1 <= chunk < 1000
        assert fitting_chunk_size(vae, x, 1000, 10 * per_particle) == 10
        assert fitting_chunk_size(vae, x, 1000, per_particle // 2) == 1  # never 0
        assert fitting_chunk_size(vae, x, 1000, 2000 * per_particle) == 1000  # never above K

    small = evaluate_checkpoint(run_dir, num_samples=50, out=tmp_path / "small" / "results.json", memory_budget=100_000)
    assert 1 <= small["chunk_size"] < 50
    big = evaluate_checkpoint(run_dir, num_samples=50, out=tmp_path / "big" / "results.json", memory_budget=1 << 40)
    assert big["chunk_size"] == 50
    given = evaluate_checkpoint(run_dir, num_samples=50, chunk_size=9, out=tmp_path / "given" / "results.json", memory_budget=1)
    assert given["chunk_size"] == 9  # an explicit chunk size is not second-guessed
