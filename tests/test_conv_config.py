"""`model.kind: conv_ladder`: the config maps onto ConvLadderVAE, bad geometry is one line
per problem naming the option, and the conv ladder trains and evaluates from the CLI."""

import json

import pytest
import torch

from pyro_hvae import ConvLadderVAE
from pyro_hvae.cells import BOTTLENECK_RATIO
from pyro_hvae.config import CONV_WIDTH_MULTIPLE, ConfigError, ConvLadderConfig, config_from_yaml, load_config
from pyro_hvae.likelihoods import CoupledLogisticMixture
from pyro_hvae.models.build import build_model
from pyro_hvae.run import read_metrics
from clirun import run

#: A small conv ladder on binarized MNIST: two groups at 7x7 (4x down-sampling).
TINY_CONV = [
    "model.kind=conv_ladder",
    "model.scales=[7]",
    "model.groups_per_scale=2",
    "model.latent_channels=2",
    "model.widths=16",
    "data.batch_size=16",
    "data.val_size=20",
    "data.eval_batch_size=20",
    "train.log_every=10",
    "train.kl_warmup_steps=10",
    "optim.warmup_steps=5",
    "optim.lr=3e-3",
    "eval.split=val",
]


@pytest.fixture
def tiny(data_root, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(f"name: tiny_conv\ndata:\n  root: {data_root}\n")
    return config



def error_lines(result) -> list[str]:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert all(line.startswith("error: ") for line in lines), lines
    return lines


def conv_config(model: str, data: str = "binarize: dynamic") -> str:
    return f"data: {{{data}}}\nmodel: {{kind: conv_ladder, {model}}}\n"


def test_the_width_multiple_is_the_bottleneck_ratio():
    assert CONV_WIDTH_MULTIPLE == BOTTLENECK_RATIO


def test_every_option_is_the_constructors_argument():
    cfg = config_from_yaml(
        conv_config(
            "scales: [16, 8, 4], groups_per_scale: [1, 2, 3], latent_channels: 4, widths: [32, 48, 64], "
            "encoder_cells: 2, likelihood: coupled_logistic_mixture, num_mixtures: 3",
            "dataset: cifar10, binarize: none",
        ),
        "test",
    ).model
    assert isinstance(cfg, ConvLadderConfig)
    vae = build_model(cfg, (3, 32, 32))
    assert isinstance(vae, ConvLadderVAE)
    layout = vae.layout
    assert (layout.scales, layout.groups, layout.latent_channels, layout.widths) == ([16, 8, 4], [1, 2, 3], [4] * 3, [32, 48, 64])
    assert [len(scale) - 1 for scale in vae.guide.encoder.scales] == [2, 2, 2]  # a down-sampling, then the cells
    likelihood = vae.model.likelihood
    assert isinstance(likelihood, CoupledLogisticMixture) and likelihood.num_mixtures == 3
    # the output head gives the coupled mixture its 10 * M features per RGB pixel
    assert vae.model.head.out[-1].out_channels == 30


def test_static_problems_are_one_line_each(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(conv_config("scales: [14, 7], groups_per_scale: [1, 0], latent_channels: [2, 2, 2], widths: 30"))
    lines = error_lines(run("train", config, "--print-config"))
    assert len(lines) == 3
    groups, channels, widths = lines
    assert groups.startswith("error: model.groups_per_scale: ") and "at least one latent group" in groups
    assert channels.startswith("error: model.latent_channels: ") and "has 3 entries but model.scales has 2" in channels
    assert widths.startswith("error: model.widths: ") and "multiples of 4" in widths
    config.write_text(conv_config("scales: [14, 7], widths: abc, latent_channels: [1.5, 2]"))
    channels, widths = error_lines(run("train", config, "--print-config"))  # one line each, not one per union member
    assert channels.startswith("error: model.latent_channels: expected an integer or a list of integers")
    assert widths.startswith("error: model.widths: expected an integer or a list of integers")
    config.write_text(conv_config("scales: [7, 14]"))
    (line,) = error_lines(run("train", config, "--print-config"))
    assert line.startswith("error: model.scales: ") and "strictly decreasing" in line


@pytest.mark.parametrize(
    "likelihood, data, keys, fix",
    [
        ("coupled_logistic_mixture", "binarize: dynamic", "data.binarize", "set data.binarize: none"),
        ("logistic_mixture", "binarize: threshold", "data.binarize", "set data.binarize: none"),
        ("bernoulli", "binarize: none", "model.likelihood", "or set data.binarize: dynamic"),
    ],
)
def test_the_likelihood_must_fit_the_pixels(tmp_path, likelihood, data, keys, fix):
    config = tmp_path / "bad.yaml"
    config.write_text(conv_config(f"scales: [14, 7], likelihood: {likelihood}", data))
    (line,) = error_lines(run("train", config, "--print-config"))
    assert line.startswith(f"error: {keys}: ") and fix in line


@pytest.mark.parametrize(
    "scales, key, problem",
    [
        ("[5]", "model.scales", "5 does not divide the image height 28"),
        ("[14, 4]", "model.scales", "4 does not divide the scale below it, 14"),
    ],
)
def test_scales_that_do_not_fit_the_images_fail_before_anything_is_written(tiny, tmp_path, scales, key, problem):
    out = tmp_path / "run"
    (line,) = error_lines(run("train", tiny, *TINY_CONV, f"model.scales={scales}", "model.groups_per_scale=1", "--out", out))
    assert line.startswith(f"error: {key}: ") and problem in line and "(the images are 1x28x28)" in line
    assert not out.exists()


def test_a_shape_error_of_the_builder_is_a_config_error():
    cfg = config_from_yaml(conv_config("scales: [16, 8]"), "test").model
    with pytest.raises(ConfigError, match=r"^model\.scales: 16 does not divide the image height 28"):
        build_model(cfg, (1, 28, 28))


def test_a_tiny_conv_ladder_trains_and_evaluates_from_the_cli(tiny, tmp_path):
    out = tmp_path / "run"
    result = run("train", tiny, *TINY_CONV, "train.steps=40", "train.eval_every=40", "--out", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert load_config(out / "config.yaml").model.kind == "conv_ladder"
    train = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in train] == [10, 20, 30, 40]
    assert set(train[0]["kl"]) == {"z_1", "z_2"}
    assert train[-1]["elbo"] > train[0]["elbo"] + 50  # nats per image: it learns (about -395 -> -240)
    result = run("evaluate", out, "-K", "5", "--device", "cpu")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["num_samples"] == 5 and summary["split"] == "val"
    results = json.loads((out / "eval-val-K5" / "results.json").read_text())
    assert results["num_images"] == 20
    # the importance-weighted bound is at least the ELBO: -log p(x) <= -ELBO
    assert summary["nll_nats"] <= -summary["elbo"] + 1e-3
    assert summary["nll_nats"] < -train[0]["elbo"]  # better than the model at step 10
