"""``model.output_bias: data_mean``: the decoder starts at the training set's mean image."""

import pytest
import torch

from clirun import run
from pyro_hvae.config import ConfigError, load_config
from pyro_hvae.data import load_splits
from pyro_hvae.likelihoods import Bernoulli, Categorical
from pyro_hvae.run import prepare_run_dir
from pyro_hvae.train import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["model.latent_dims=[8]", "model.hidden_dims=[32,32]", "data.batch_size=64", "data.val_size=64",
         "data.eval_batch_size=64", "train.steps=1"]


def test_bernoulli_features_for_mean_are_the_logits_of_the_mean():
    mean = torch.tensor([[[0.0, 0.25], [0.5, 1.0]]])
    logits = Bernoulli().features_for_mean(mean)
    assert logits.shape == (4,)
    assert torch.sigmoid(logits).tolist() == pytest.approx([1e-3, 0.25, 0.5, 1 - 1e-3], rel=1e-4)
    with pytest.raises(NotImplementedError, match="use the Bernoulli likelihood"):
        Categorical(4).features_for_mean(mean)


def test_dataset_mean_is_the_expected_binary_image(data_root):
    cfg = load_config(None, [f"data.root={data_root}", "data.val_size=64"])
    train = load_splits(cfg.data).train
    draws = torch.stack([train.batch(torch.arange(len(train)), torch.Generator().manual_seed(s)) for s in range(4)])
    assert train.mean().shape == (1, 28, 28)
    assert (draws.mean((0, 1)) - train.mean()).abs().max() < 0.02


def _decoder_start(tiny, tmp_path, output_bias: str):
    cfg = load_config(tiny, SMALL + [f"model.output_bias={output_bias}"])
    splits = load_splits(cfg.data)
    trainer = Trainer(cfg, prepare_run_dir(tmp_path / output_bias), device=torch.device("cpu"), splits=splits)
    return trainer, splits


def test_data_mean_sets_the_output_bias_and_lowers_the_first_reconstruction_loss(tiny, tmp_path):
    started, splits = _decoder_start(tiny, tmp_path, "data_mean")
    default, _ = _decoder_start(tiny, tmp_path, "default")
    bias = started.vae.model.decoder[-1].bias
    assert torch.allclose(bias, Bernoulli().features_for_mean(splits.train.mean()))
    assert not torch.allclose(default.vae.model.decoder[-1].bias, bias)
    x = splits.train.batch(torch.arange(256), torch.Generator().manual_seed(1))
    z_1 = torch.zeros(256, 8)

    def nll(trainer):  # -log p(x | z_1 = 0), per image, before any training
        with torch.no_grad():
            return -trainer.vae.model.observation(z_1).log_prob(x).mean().item()

    # at the mean image: the entropy of the mean pixels, far below 784 log 2 = 543 nats
    assert nll(started) < 0.8 * nll(default)


def test_data_mean_with_another_likelihood_is_one_error_line(tiny, tmp_path):
    with pytest.raises(ConfigError, match="output_bias 'data_mean'.*'categorical'"):
        load_config(tiny, ["model.output_bias=data_mean", "model.likelihood=categorical", "data.binarize=none"])
    result = run("train", tiny, "model.output_bias=data_mean", "model.likelihood=categorical",
                 "data.binarize=none", "--out", tmp_path / "run")
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "model.output_bias: default" in lines[0]
    assert not (tmp_path / "run").exists()
